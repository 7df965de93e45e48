#include <bulkhead/dataplane.hpp>

#include "bpf_util.hpp"
#include "compiler.hpp"
#include "policy_json.hpp"

#include "bulkhead_bpf.skel.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fmt/format.h>
#include <fmt/std.h>
#include <spdlog/spdlog.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <linux/if_link.h>
#include <linux/magic.h>
#include <net/if.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace bulkhead {

using detail::Fd;
using detail::throw_errno;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr std::uint32_t kDefaultMaxRules = 16384;
constexpr std::uint32_t kDefaultMaxConnections = 262144;
constexpr const char* kBpfFsRoot = "/sys/fs/bpf";

// One per-generation table: an outer map whose two slots hold inner maps.
struct TableSpec {
    const char* name;
    bpf_map_type type;
    std::uint32_t key_size;
    std::uint32_t value_size;
    std::optional<std::uint32_t> Options::*option;
    std::uint32_t default_size;
    const char* flag;         // the CLI option that sets the size
    const char* option_name;  // the library option
};

enum TableIndex {
    kHostsTable = 0,
    kPrefixesTable = 1,
    kPolicyTable = 2,
    kCgroupsTable = 3,
    kFailsafeTable = 4,
};

const std::array<TableSpec, 5> kTables{{
    {"bh_ipc_host", BPF_MAP_TYPE_HASH, sizeof(bh_ipcache_host_key), sizeof(bh_identity_info),
     &Options::max_ipcache_hosts, 1u << 20, "--max-ipcache-hosts",
     "Options::max_ipcache_hosts"},
    {"bh_ipc_lpm", BPF_MAP_TYPE_LPM_TRIE, sizeof(bh_ipcache_lpm_key), sizeof(bh_identity_info),
     &Options::max_ipcache_prefixes, 1u << 16, "--max-ipcache-prefixes",
     "Options::max_ipcache_prefixes"},
    {"bh_policy", BPF_MAP_TYPE_LPM_TRIE, sizeof(bh_policy_key), sizeof(bh_policy_value),
     &Options::max_policy_entries, 1u << 20, "--max-policy-entries",
     "Options::max_policy_entries"},
    {"bh_cgroups", BPF_MAP_TYPE_HASH, sizeof(bh_cgroup_key), sizeof(bh_identity_info),
     &Options::max_cgroups, 1u << 16, "--max-cgroups", "Options::max_cgroups"},
    // failsafe lists are short: the parser bounds them
    {"bh_failsafe", BPF_MAP_TYPE_LPM_TRIE, sizeof(bh_failsafe_key), sizeof(std::uint32_t),
     nullptr, 1u << 14, "", ""},
}};

std::uint32_t wanted_size(const Options& o, const TableSpec& t, std::uint32_t fallback)
{
    return t.option ? (o.*t.option).value_or(fallback) : fallback;
}

const std::array<const char*, BH_REASON_MAX> kReasonNames{
    "allow-rule",   "deny-rule",     "audit-rule", "allow-default",
    "deny-default", "audit-default", "not-ip",     "neighbour-discovery",
    "malformed",    "no-policy",     "tracked",    "failsafe",
    "ct-miss",      "revoked",       nullptr,      nullptr,
};

std::string pin_name(const std::string& map_name)
{
    return fmt::format("{}_v{}", map_name, BH_ABI_VERSION);
}

// Serializes commits and attachments of every process on one pin directory.
class DirLock {
public:
    explicit DirLock(const fs::path& dir)
        : fd_(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC))
    {
        if (!fd_)
            throw_errno(fmt::format("open pin directory '{}'", dir.string()), errno);
        if (::flock(fd_.get(), LOCK_EX) != 0)
            throw_errno(fmt::format("lock pin directory '{}'", dir.string()), errno);
    }

private:
    Fd fd_;
};

bool has_capability(int cap)
{
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.rfind("CapEff:", 0) == 0) {
            std::uint64_t caps = std::stoull(line.substr(7), nullptr, 16);
            return (caps >> cap) & 1;
        }
    }
    return false;
}

void check_privileges()
{
    constexpr int kCapSysAdmin = 21;
    constexpr int kCapBpf = 39;
    if (!has_capability(kCapSysAdmin) && !has_capability(kCapBpf))
        throw Error("cannot open the dataplane: bulkhead needs root (CAP_BPF, CAP_NET_ADMIN "
                    "and CAP_SYS_ADMIN); run it with sudo",
                    EPERM);
}

void probe_kernel()
{
    const std::pair<bpf_map_type, const char*> maps[] = {
        {BPF_MAP_TYPE_LPM_TRIE, "LPM trie maps (Linux 4.11)"},
        {BPF_MAP_TYPE_ARRAY_OF_MAPS, "array-of-maps (Linux 4.12)"},
        {BPF_MAP_TYPE_PERCPU_ARRAY, "per-CPU arrays (Linux 4.6)"},
    };
    for (const auto& [type, what] : maps) {
        int ok = libbpf_probe_bpf_map_type(type, nullptr);
        if (ok == 0)
            throw Error(fmt::format("this kernel lacks {}, which bulkhead needs; use Linux "
                                    "5.15 or later with BPF enabled",
                                    what),
                        EOPNOTSUPP);
        if (ok < 0)
            throw_errno(fmt::format("probe the kernel for {}", what), -ok);
    }
    if (libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_XDP, nullptr) == 0)
        throw Error("this kernel lacks XDP programs, which bulkhead needs; use Linux 5.15 or "
                    "later with BPF enabled",
                    EOPNOTSUPP);
}

// The pin directory must be on a BPF filesystem; mount the usual one if it
// is the parent and nobody has yet (as Cilium and systemd do).
void prepare_pin_dir(const fs::path& dir)
{
    fs::path parent = dir.parent_path();
    struct statfs st {};

    if (::statfs(parent.c_str(), &st) != 0)
        throw_errno(fmt::format("use pin directory '{}'", dir.string()), errno,
                    fmt::format("'{}' must exist", parent.string()));
    if (st.f_type != BPF_FS_MAGIC) {
        if (parent != kBpfFsRoot)
            throw Error(fmt::format("cannot use pin directory '{}': '{}' is not a BPF "
                                    "filesystem; mount one with `mount -t bpf bpf {}` or "
                                    "choose a --pin-dir under {}",
                                    dir.string(), parent.string(), parent.string(), kBpfFsRoot),
                        EINVAL);
        if (::mount("bpf", kBpfFsRoot, "bpf", 0, "mode=0700") != 0)
            throw_errno(fmt::format("mount the BPF filesystem at {}", kBpfFsRoot), errno);
    }
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
        throw_errno(fmt::format("create pin directory '{}'", dir.string()), errno);
    if (!fs::is_directory(dir))
        throw Error(fmt::format("cannot use pin directory '{}': it exists and is not a "
                                "directory; remove it or choose another --pin-dir",
                                dir.string()),
                    ENOTDIR);
    fs::path links = dir / "links";
    if (::mkdir(links.c_str(), 0700) != 0 && errno != EEXIST)
        throw_errno(fmt::format("create '{}'", links.string()), errno);
}

std::vector<Prefix> local_addresses()
{
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) != 0)
        throw_errno("list this host's addresses", errno);

    std::vector<Prefix> out;
    for (ifaddrs* a = list; a; a = a->ifa_next) {
        if (!a->ifa_addr)
            continue;
        char text[INET6_ADDRSTRLEN] = {};
        if (a->ifa_addr->sa_family == AF_INET)
            inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, text,
                      sizeof(text));
        else if (a->ifa_addr->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ifa_addr)->sin6_addr, text,
                      sizeof(text));
        if (auto p = Prefix::parse(text))
            out.push_back(*p);
    }
    ::freeifaddrs(list);
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
}

std::uint64_t netns_inode()
{
    struct stat st {};
    // thread-self: the caller may have switched only its own thread
    if (::stat("/proc/thread-self/ns/net", &st) != 0)
        throw_errno("identify the current network namespace", errno);
    return st.st_ino;
}

// Pin names: the BPF filesystem refuses '.' in a name, and '/' cannot be in
// one, while interface names and cgroup paths hold both. They are escaped as
// %2e, %2f and %25 ('%' itself); ':' separates fields.
std::string escape_pin(std::string_view text)
{
    std::string out;
    for (char c : text)
        out += c == '.' ? "%2e" : c == '/' ? "%2f" : c == '%' ? "%25" : std::string(1, c);
    return out;
}

std::string unescape_pin(std::string_view text)
{
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        std::string_view code = text.substr(i, 3);
        char c = code == "%2e" ? '.' : code == "%2f" ? '/' : code == "%25" ? '%' : '\0';
        if (c != '\0') {
            out += c;
            i += 2;
        } else {
            out += text[i];
        }
    }
    return out;
}

// "a:b:c:rest" split at the first three colons; nullopt if fewer.
std::optional<std::array<std::string, 4>> split_pin(const std::string& name)
{
    auto a = name.find(':');
    auto b = a == std::string::npos ? a : name.find(':', a + 1);
    auto c = b == std::string::npos ? b : name.find(':', b + 1);
    if (c == std::string::npos)
        return std::nullopt;
    return std::array<std::string, 4>{name.substr(0, a), name.substr(a + 1, b - a - 1),
                                      name.substr(b + 1, c - b - 1), name.substr(c + 1)};
}

std::optional<std::uint64_t> parse_u64(const std::string& text)
{
    try {
        std::size_t used = 0;
        std::uint64_t v = std::stoull(text, &used);
        return used == text.size() ? std::optional(v) : std::nullopt;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

// A pinned XDP link: xdp:<mode>:<netns inode>:<interface>. Interface names
// are per network namespace, so the namespace is part of the name.
struct XdpPin {
    std::string mode;
    std::uint64_t netns = 0;
    std::string interface;

    std::string file_name() const
    {
        return fmt::format("xdp:{}:{}:{}", mode, netns, escape_pin(interface));
    }

    static std::optional<XdpPin> parse(const std::string& name)
    {
        auto parts = split_pin(name);
        if (!parts || (*parts)[0] != "xdp")
            return std::nullopt;
        auto netns = parse_u64((*parts)[2]);
        if (!netns)
            return std::nullopt;
        return XdpPin{(*parts)[1], *netns, unescape_pin((*parts)[3])};
    }
};

// A pinned cgroup link: cg:<hook>:<cgroup id>:<path>.
struct CgroupPin {
    std::string hook;
    std::uint64_t cgroup_id = 0;
    std::string path;

    std::string file_name() const
    {
        return fmt::format("cg:{}:{}:{}", hook, cgroup_id, escape_pin(path));
    }

    static std::optional<CgroupPin> parse(const std::string& name)
    {
        auto parts = split_pin(name);
        if (!parts || (*parts)[0] != "cg")
            return std::nullopt;
        auto id = parse_u64((*parts)[2]);
        if (!id)
            return std::nullopt;
        return CgroupPin{(*parts)[1], *id, unescape_pin((*parts)[3])};
    }
};

struct CgroupHook {
    const char* program;
    bpf_attach_type type;
    const char* name;
};

const std::array<CgroupHook, 6> kCgroupHooks{{
    {"bh_cg_ingress", BPF_CGROUP_INET_INGRESS, "ingress"},
    {"bh_cg_egress", BPF_CGROUP_INET_EGRESS, "egress"},
    {"bh_connect4", BPF_CGROUP_INET4_CONNECT, "connect4"},
    {"bh_connect6", BPF_CGROUP_INET6_CONNECT, "connect6"},
    {"bh_sendmsg4", BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"},
    {"bh_sendmsg6", BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"},
}};

Counter read_percpu(int fd, std::uint32_t index)
{
    static const int cpus = detail::possible_cpus();
    // per-CPU values come back one per possible CPU, each rounded up to 8 bytes
    std::vector<bh_counter> values(static_cast<std::size_t>(cpus));
    Counter total;

    if (bpf_map_lookup_elem(fd, &index, values.data()) != 0)
        return total;
    for (const bh_counter& v : values) {
        total.packets += v.packets;
        total.bytes += v.bytes;
    }
    return total;
}

void zero_percpu(int fd, std::uint32_t index, const std::string& name)
{
    std::vector<bh_counter> zeros(static_cast<std::size_t>(detail::possible_cpus()));
    detail::map_update(fd, &index, zeros.data(), name);
}

std::string full_table_message(const TableSpec& t, std::size_t needed, std::uint32_t size)
{
    return fmt::format("cannot commit policy: table '{}' needs {} entries but holds {}; raise "
                       "it with {} ({}); the policy in force is unchanged",
                       t.name, needed, size, t.flag, t.option_name);
}

// Writes key/value pairs, in batches where the map type supports them.
template <std::size_t K, typename V>
void write_entries(int fd, const TableSpec& t, const std::vector<detail::KeyBytes<K>>& keys,
                   const std::vector<V>& values, std::uint32_t size)
{
    constexpr std::size_t kBatch = 8192;
    std::size_t done = 0;

    while (done < keys.size()) {
        __u32 count = static_cast<__u32>(std::min(kBatch, keys.size() - done));
        LIBBPF_OPTS(bpf_map_batch_opts, opts, .elem_flags = BPF_ANY);
        if (bpf_map_update_batch(fd, keys[done].data(), &values[done], &count, &opts) != 0)
            break;  // not supported by this map type, or failed: go one by one
        done += count;
    }
    for (; done < keys.size(); ++done) {
        if (bpf_map_update_elem(fd, keys[done].data(), &values[done], BPF_ANY) == 0)
            continue;
        if (errno == E2BIG || errno == ENOSPC || errno == ENOMEM)
            throw Error(full_table_message(t, keys.size(), size), errno);
        throw_errno(fmt::format("write an entry of table '{}'", t.name), errno);
    }
}

// Brings one inner table from `prev` (what it holds now, or null if unknown)
// to `target`. Deletes first, so a nearly full table never overflows midway.
template <std::size_t K, typename Value>
using RawTable = std::unordered_map<detail::KeyBytes<K>, Value, detail::KeyHash>;

template <std::size_t K, typename Value>
std::pair<std::size_t, std::size_t> sync_table(int fd, const TableSpec& t, std::uint32_t size,
                                               const RawTable<K, Value>& target,
                                               const RawTable<K, Value>* prev)
{
    std::size_t deleted = 0;
    if (prev) {
        for (const auto& [key, value] : *prev) {
            if (!target.count(key)) {
                detail::map_delete(fd, key.data(), t.name);
                ++deleted;
            }
        }
    } else {
        deleted = detail::map_clear(fd, K, t.name);
    }

    std::vector<detail::KeyBytes<K>> keys;
    std::vector<Value> values;
    for (const auto& [key, value] : target) {
        if (prev) {
            auto it = prev->find(key);
            if (it != prev->end() && std::memcmp(&it->second, &value, sizeof(Value)) == 0)
                continue;
        }
        keys.push_back(key);
        values.push_back(value);
    }
    write_entries(fd, t, keys, values, size);
    return {keys.size(), deleted};
}

// The bookkeeping of one generation, as stored in bh_meta.
struct GenerationMeta {
    json raw;
    Policy policy;
    detail::Allocations alloc;
    detail::HostFacts host;

    static GenerationMeta from_json(json j)
    {
        GenerationMeta m;
        m.policy = detail::policy_from_json(j.at("policy"));
        m.alloc = detail::Allocations::from_json(j.at("alloc"));
        for (const json& h : j.at("host_addrs"))
            m.host.addresses.push_back(*Prefix::parse(h.get<std::string>()));
        m.host.cgroup_ids = j.at("cgroup_ids").get<std::map<std::string, std::uint64_t>>();
        m.raw = std::move(j);
        return m;
    }
};

json prefixes_json(const std::vector<Prefix>& prefixes)
{
    json out = json::array();
    for (const Prefix& p : prefixes)
        out.push_back(p.str());
    return out;
}

}  // namespace

std::string_view to_string(XdpMode mode)
{
    switch (mode) {
    case XdpMode::native:
        return "native";
    case XdpMode::generic:
        return "generic";
    default:
        return "auto";
    }
}

std::optional<XdpMode> parse_xdp_mode(std::string_view text)
{
    if (text == "auto")
        return XdpMode::automatic;
    if (text == "native")
        return XdpMode::native;
    if (text == "generic")
        return XdpMode::generic;
    return std::nullopt;
}

struct Dataplane::Impl {
    struct SkelDeleter {
        void operator()(bulkhead_bpf* s) const { bulkhead_bpf__destroy(s); }
    };

    Options options;
    std::unique_ptr<bulkhead_bpf, SkelDeleter> skel;   // the maps
    mutable std::unique_ptr<bulkhead_bpf, SkelDeleter> progs;  // the programs, once needed
    std::uint32_t max_rules = kDefaultMaxRules;

    explicit Impl(Options o) : options(std::move(o)) {}

    fs::path pin_path(const std::string& map_name) const
    {
        return options.pin_dir / pin_name(map_name);
    }

    int fd_of(bpf_map* map) const { return bpf_map__fd(map); }

    int outer_fd(const TableSpec& t) const
    {
        return bpf_object__find_map_fd_by_name(skel->obj, t.name);
    }

    // Opens the object's maps, reusing every pinned one, and pins new ones.
    // Programs are not loaded here: the verifier costs a good fraction of a
    // second, and status, stats, explain and apply need only the maps.
    void load()
    {
        skel.reset(bulkhead_bpf__open());
        if (!skel)
            throw_errno("open the embedded BPF object", errno);

        bpf_map* map = nullptr;
        bpf_object__for_each_map(map, skel->obj)
        {
            if (!bpf_map__is_internal(map))
                reuse_pinned(map);
        }
        bpf_program* prog = nullptr;
        bpf_object__for_each_program(prog, skel->obj)
        {
            bpf_program__set_autoload(prog, false);
        }

        int err = bulkhead_bpf__load(skel.get());
        if (err)
            throw_errno("create the BPF maps", -err, "run with -v for libbpf's log");

        bpf_object__for_each_map(map, skel->obj)
        {
            if (bpf_map__is_internal(map))
                continue;
            fs::path path = pin_path(bpf_map__name(map));
            if (!fs::exists(path) && bpf_obj_pin(bpf_map__fd(map), path.c_str()) != 0)
                throw_errno(fmt::format("pin map at '{}'", path.string()), errno);
        }
        max_rules = bpf_map__max_entries(skel->maps.bh_rule_cnt);
    }

    // The programs, loaded on first use over the same maps.
    bulkhead_bpf* programs() const
    {
        if (progs)
            return progs.get();

        std::unique_ptr<bulkhead_bpf, SkelDeleter> loaded(bulkhead_bpf__open());
        if (!loaded)
            throw_errno("open the embedded BPF object", errno);
        bpf_map* map = nullptr;
        bpf_object__for_each_map(map, loaded->obj)
        {
            if (bpf_map__is_internal(map))
                continue;
            int fd = bpf_object__find_map_fd_by_name(skel->obj, bpf_map__name(map));
            if (int err = bpf_map__reuse_fd(map, fd))
                throw_errno(fmt::format("reuse map '{}'", bpf_map__name(map)), -err);
        }
        if (int err = bulkhead_bpf__load(loaded.get()))
            throw_errno("load the BPF programs", -err, "run with -v to see the verifier's log");
        progs = std::move(loaded);
        return progs.get();
    }

    void reuse_pinned(bpf_map* map)
    {
        std::string name = bpf_map__name(map);
        fs::path path = pin_path(name);
        Fd fd(bpf_obj_get(path.c_str()));

        if (!fd) {
            if (errno != ENOENT)
                throw_errno(fmt::format("open pinned map '{}'", path.string()), errno);
            if (map == skel->maps.bh_rule_cnt)
                bpf_map__set_max_entries(map, options.max_rules.value_or(kDefaultMaxRules));
            if (map == skel->maps.bh_ct)
                bpf_map__set_max_entries(
                    map, options.max_connections.value_or(kDefaultMaxConnections));
            return;
        }

        detail::MapInfo info = detail::map_info(fd.get(), name);
        if (info.type != bpf_map__type(map) || info.key_size != bpf_map__key_size(map) ||
            info.value_size != bpf_map__value_size(map))
            throw Error(fmt::format(
                "cannot reuse pinned map '{}': its layout (type {}, key {} B, value {} B) is "
                "not this version's; remove the old state with `bulkhead --pin-dir {} detach "
                "all` and `rm -r {}`",
                path.string(), info.type, info.key_size, info.value_size,
                options.pin_dir.string(), options.pin_dir.string()));
        if (int err = bpf_map__reuse_fd(map, fd.get()))
            throw_errno(fmt::format("reuse pinned map '{}'", path.string()), -err);
    }

    // Gives every empty generation slot its inner tables.
    void ensure_slots()
    {
        for (const TableSpec& t : kTables) {
            for (std::uint32_t slot = 0; slot < BH_GENERATION_SLOTS; ++slot) {
                if (!detail::inner_map(outer_fd(t), slot, t.name))
                    replace_inner(t, slot, wanted_size(options, t, t.default_size));
            }
        }
    }

    Fd replace_inner(const TableSpec& t, std::uint32_t slot, std::uint32_t size)
    {
        Fd inner = detail::map_create(t.type, fmt::format("{}_g{}", t.name, slot), t.key_size,
                                      t.value_size, size, BPF_F_NO_PREALLOC);
        int inner_fd = inner.get();
        detail::map_update(outer_fd(t), &slot, &inner_fd, t.name);
        return inner;
    }

    Fd inner(const TableSpec& t, std::uint32_t slot) const
    {
        Fd fd = detail::inner_map(outer_fd(t), slot, t.name);
        if (!fd)
            throw Error(fmt::format("the pinned state under '{}' is incomplete: slot {} of '{}' "
                                    "is empty; reopen it to repair",
                                    options.pin_dir.string(), slot, t.name));
        return fd;
    }

    // An update of a map-in-map returns only after every BPF program that
    // was running has finished (the kernel waits an RCU grace period), so
    // after this no packet still uses the tables in `slot`.
    void wait_for_readers(std::uint32_t slot)
    {
        const TableSpec& t = kTables[kHostsTable];
        Fd fd = inner(t, slot);
        int inner_fd = fd.get();
        detail::map_update(outer_fd(t), &slot, &inner_fd, t.name);
    }

    std::uint64_t generation() const
    {
        std::uint32_t zero = 0;
        bh_gen_ctl ctl{};
        detail::map_lookup(fd_of(skel->maps.bh_gen_ctl), &zero, &ctl);
        return ctl.generation;
    }

    // --- generation bookkeeping (bh_meta) ---

    int meta_fd() const { return fd_of(skel->maps.bh_meta); }

    void clear_meta(std::uint32_t slot)
    {
        // chunk 0 first: a half-deleted blob is then already invalid
        for (std::uint32_t chunk = 0;; ++chunk) {
            bh_meta_key key{slot, chunk};
            if (bpf_map_delete_elem(meta_fd(), &key) != 0 && errno == ENOENT && chunk > 0)
                break;
        }
    }

    void write_meta(std::uint32_t slot, const json& j)
    {
        std::string blob = j.dump();
        std::uint32_t chunks = static_cast<std::uint32_t>(
            std::max<std::size_t>(1, (blob.size() + BH_META_CHUNK_BYTES - 1) /
                                         BH_META_CHUNK_BYTES));
        // chunk 0 last: the blob becomes valid only when complete
        for (std::uint32_t c = chunks; c-- > 0;) {
            bh_meta_key key{slot, c};
            bh_meta_value value{};
            std::size_t off = std::size_t{c} * BH_META_CHUNK_BYTES;
            std::size_t len = std::min<std::size_t>(BH_META_CHUNK_BYTES, blob.size() - off);
            value.len = static_cast<std::uint32_t>(len);
            value.chunks = chunks;
            std::memcpy(value.data, blob.data() + off, len);
            detail::map_update(meta_fd(), &key, &value, "bh_meta");
        }
    }

    std::optional<GenerationMeta> read_meta(std::uint32_t slot) const
    {
        bh_meta_key key{slot, 0};
        bh_meta_value value{};
        if (!detail::map_lookup(meta_fd(), &key, &value))
            return std::nullopt;

        std::string blob(reinterpret_cast<const char*>(value.data), value.len);
        for (std::uint32_t c = 1; c < value.chunks; ++c) {
            bh_meta_key k{slot, c};
            bh_meta_value v{};
            if (!detail::map_lookup(meta_fd(), &k, &v))
                return std::nullopt;
            blob.append(reinterpret_cast<const char*>(v.data), v.len);
        }
        try {
            return GenerationMeta::from_json(json::parse(blob));
        } catch (const std::exception& e) {
            spdlog::warn("ignoring unreadable bookkeeping of generation slot {}: {}", slot,
                         e.what());
            return std::nullopt;
        }
    }

    std::optional<GenerationMeta> active_meta() const
    {
        std::uint64_t gen = generation();
        if (gen == 0)
            return std::nullopt;
        return read_meta(static_cast<std::uint32_t>(gen & 1));
    }

    detail::Compiled recompile(GenerationMeta& meta) const
    {
        return detail::compile(meta.policy, meta.alloc, meta.host, {max_rules});
    }

    std::vector<MapFill> fills(const std::optional<GenerationMeta>& meta) const
    {
        std::vector<MapFill> out;
        std::uint32_t slot = static_cast<std::uint32_t>(generation() & 1);
        for (const TableSpec& t : kTables) {
            Fd fd = inner(t, slot);
            std::uint64_t entries = meta ? meta->raw["counts"].value(t.name, 0ull) : 0;
            out.push_back(MapFill{t.name, entries, detail::map_info(fd.get(), t.name).max_entries,
                                  t.flag});
        }
        std::uint64_t rules = meta ? meta->policy.rules.size() : 0;
        out.push_back(MapFill{"bh_rule_cnt", rules, max_rules, "--max-rules"});
        int ct = fd_of(skel->maps.bh_ct);
        out.push_back(MapFill{"bh_ct", count_entries(ct, sizeof(bh_ct_key)),
                              bpf_map__max_entries(skel->maps.bh_ct), "--max-connections"});
        return out;
    }

    // Walks the keys: the kernel keeps no count for hash maps.
    static std::uint64_t count_entries(int fd, std::size_t key_size)
    {
        std::vector<std::uint8_t> key(key_size), next(key_size);
        std::uint64_t n = 0;
        const void* cursor = nullptr;
        while (bpf_map_get_next_key(fd, cursor, next.data()) == 0) {
            ++n;
            key.swap(next);
            cursor = key.data();
        }
        return n;
    }

    // True when no table size option asks for a change in the slot in force.
    bool sizes_unchanged(std::uint64_t gen) const
    {
        const auto slot = static_cast<std::uint32_t>(gen & 1);
        return std::all_of(kTables.begin(), kTables.end(), [&](const TableSpec& t) {
            std::uint32_t have = detail::map_info(inner(t, slot).get(), t.name).max_entries;
            return wanted_size(options, t, have) == have;
        });
    }

    static ApplyResult unchanged_result(std::uint64_t gen, const GenerationMeta& current)
    {
        const json& counts = current.raw["counts"];
        ApplyResult r;
        r.generation = gen;
        r.unchanged = true;
        r.ipcache_entries = counts.value("bh_ipc_host", 0ull) + counts.value("bh_ipc_lpm", 0ull);
        r.policy_entries = counts.value("bh_policy", 0ull);
        return r;
    }

    ApplyResult commit(const Policy& policy, const std::string& source);
    std::vector<Attachment> attachments() const;
};

Dataplane::Dataplane(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Dataplane::Dataplane(Dataplane&&) noexcept = default;
Dataplane& Dataplane::operator=(Dataplane&&) noexcept = default;
Dataplane::~Dataplane() = default;

Dataplane Dataplane::open(const Options& options)
{
    check_privileges();
    prepare_pin_dir(options.pin_dir);
    probe_kernel();

    DirLock lock(options.pin_dir);
    auto impl = std::make_unique<Impl>(options);
    impl->load();
    impl->ensure_slots();
    return Dataplane(std::move(impl));
}

ApplyResult Dataplane::apply(const Policy& policy, const std::string& source)
{
    DirLock lock(impl_->options.pin_dir);
    return impl_->commit(policy, source);
}

// The machine facts a commit compiles against: this namespace's addresses
// (unless given) and the ids of the policy's cgroups that exist now.
detail::HostFacts gather_host_facts(const Policy& policy, const Options& options)
{
    detail::HostFacts facts;
    facts.addresses = options.host_addresses.value_or(local_addresses());
    for (const Identity& ident : policy.identities) {
        for (const std::string& path : ident.cgroups) {
            struct stat st {};
            fs::path resolved = resolve_cgroup_path(path);
            if (::stat(resolved.c_str(), &st) == 0)
                facts.cgroup_ids[path] = st.st_ino;  // a cgroup v2 id is its inode
            else
                spdlog::warn("cgroup '{}' of identity '{}' does not exist ({}); its processes "
                             "get no identity until it exists and the policy is applied again",
                             resolved.string(), ident.name, detail::errno_text(errno));
        }
    }
    return facts;
}

json host_facts_json(const detail::HostFacts& facts)
{
    return {{"host_addrs", prefixes_json(facts.addresses)}, {"cgroup_ids", facts.cgroup_ids}};
}

// Entry counts per table, in kTables order.
std::array<std::size_t, kTables.size()> table_sizes(const detail::Compiled& c)
{
    return {c.hosts.size(), c.prefixes.size(), c.policy.size(), c.cgroups.size(),
            c.failsafe.size()};
}

// The commit protocol: build the new generation in the slot no packet uses,
// then make it current with one store. See DESIGN.md "Atomic policy updates".
ApplyResult Dataplane::Impl::commit(const Policy& policy, const std::string& source)
{
    const std::uint64_t gen = generation();
    const auto slot = static_cast<std::uint32_t>((gen + 1) & 1);
    std::optional<GenerationMeta> current = active_meta();
    const detail::HostFacts facts = gather_host_facts(policy, options);
    const json policy_json = detail::policy_to_json(policy);

    if (current && current->raw["policy"] == policy_json &&
        host_facts_json(current->host) == host_facts_json(facts) && sizes_unchanged(gen))
        return unchanged_result(gen, *current);

    detail::Allocations alloc = current ? current->alloc : detail::Allocations{};
    const detail::Allocations before = alloc;
    detail::Compiled target = detail::compile(policy, alloc, facts, {max_rules});
    const auto counts = table_sizes(target);

    wait_for_readers(slot);

    // size every table before writing anything, so an overflow changes nothing
    std::array<Fd, kTables.size()> fds;
    std::array<std::uint32_t, kTables.size()> sizes{};
    std::array<bool, kTables.size()> fresh{};
    for (std::size_t i = 0; i < kTables.size(); ++i) {
        const TableSpec& t = kTables[i];
        fds[i] = inner(t, slot);
        std::uint32_t have = detail::map_info(fds[i].get(), t.name).max_entries;
        sizes[i] = wanted_size(options, t, have);
        if (counts[i] > sizes[i])
            throw Error(full_table_message(t, counts[i], sizes[i]), ENOSPC);
        if (sizes[i] != have) {
            fds[i] = replace_inner(t, slot, sizes[i]);
            fresh[i] = true;
        }
    }

    // what the slot holds now: the generation before the current one, or
    // unknown (then each table is cleared and written in full)
    std::optional<GenerationMeta> old = read_meta(slot);
    detail::Compiled prev;
    bool known = old && old->raw.value("compiler", 0) == detail::kCompilerVersion;
    if (known)
        prev = recompile(*old);
    clear_meta(slot);

    ApplyResult result;
    auto sync = [&](TableIndex i, const auto& want, const auto& had) {
        // a fresh table is empty: `had` is then an empty table of the same type
        std::remove_cvref_t<decltype(had)> empty;
        const auto* from = fresh[i] ? &empty : known ? &had : nullptr;
        auto [written, deleted] = sync_table(fds[i].get(), kTables[i], sizes[i], want, from);
        result.written += written;
        result.deleted += deleted;
    };
    sync(kHostsTable, target.hosts, prev.hosts);
    sync(kPrefixesTable, target.prefixes, prev.prefixes);
    sync(kPolicyTable, target.policy, prev.policy);
    sync(kCgroupsTable, target.cgroups, prev.cgroups);
    sync(kFailsafeTable, target.failsafe, prev.failsafe);
    detail::map_update(fd_of(skel->maps.bh_gen_cfg), &slot, &target.config, "bh_gen_cfg");

    // a rule id new to its name starts counting from zero
    for (const auto& [name, id] : alloc.rules) {
        auto it = before.rules.find(name);
        if (it == before.rules.end() || it->second != id)
            zero_percpu(fd_of(skel->maps.bh_rule_cnt), id, "bh_rule_cnt");
    }

    json counts_json;
    for (std::size_t i = 0; i < kTables.size(); ++i)
        counts_json[kTables[i].name] = counts[i];
    write_meta(slot, {{"compiler", detail::kCompilerVersion},
                      {"generation", gen + 1},
                      {"source", source},
                      {"policy", policy_json},
                      {"alloc", alloc.to_json()},
                      {"host_addrs", prefixes_json(facts.addresses)},
                      {"cgroup_ids", facts.cgroup_ids},
                      {"counts", counts_json}});

    // the switch: one aligned 8-byte store that every packet reads once
    std::uint32_t zero = 0;
    bh_gen_ctl ctl{gen + 1};
    detail::map_update(fd_of(skel->maps.bh_gen_ctl), &zero, &ctl, "bh_gen_ctl");

    result.generation = gen + 1;
    result.ipcache_entries = counts[kHostsTable] + counts[kPrefixesTable];
    result.policy_entries = counts[kPolicyTable];
    return result;
}

Attachment Dataplane::attach_xdp(const std::string& interface, XdpMode mode)
{
    DirLock lock(impl_->options.pin_dir);
    unsigned ifindex = ::if_nametoindex(interface.c_str());
    if (ifindex == 0)
        throw Error(fmt::format("cannot attach XDP to '{}': no such interface in this network "
                                "namespace; check `ip link`",
                                interface),
                    ENODEV);

    int prog_fd = bpf_program__fd(impl_->programs()->progs.bh_xdp);
    fs::path links = impl_->options.pin_dir / "links";
    std::uint64_t ns = netns_inode();

    // already ours: swap the program inside the link, no gap in enforcement
    for (const auto& entry : fs::directory_iterator(links)) {
        auto pin = XdpPin::parse(entry.path().filename());
        if (!pin || pin->netns != ns || pin->interface != interface)
            continue;
        Fd link(bpf_obj_get(entry.path().c_str()));
        bpf_link_info info{};
        __u32 len = sizeof(info);
        if (link && bpf_obj_get_info_by_fd(link.get(), &info, &len) == 0 &&
            info.xdp.ifindex == ifindex &&
            (mode == XdpMode::automatic || to_string(mode) == pin->mode)) {
            if (bpf_link_update(link.get(), prog_fd, nullptr) != 0)
                throw_errno(fmt::format("update the XDP program on '{}'", interface), errno);
            return Attachment{"xdp", interface, pin->mode, ifindex, 0, info.id, false};
        }
        if (link && info.xdp.ifindex == ifindex)
            bpf_link_detach(link.get());  // re-attach in the mode asked for
        fs::remove(entry.path());
    }

    std::vector<XdpMode> tries{mode};
    if (mode == XdpMode::automatic)
        tries = {XdpMode::native, XdpMode::generic};

    int err = 0;
    for (XdpMode m : tries) {
        LIBBPF_OPTS(bpf_link_create_opts, opts,
                    .flags = m == XdpMode::native ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE);
        Fd link(bpf_link_create(prog_fd, static_cast<int>(ifindex), BPF_XDP, &opts));
        if (!link) {
            err = errno;
            spdlog::debug("XDP {} mode on '{}' refused: {}", to_string(m), interface,
                          detail::errno_text(err));
            if (err == EBUSY || err == EEXIST)
                break;
            continue;
        }
        XdpPin pin{std::string(to_string(m)), ns, interface};
        fs::path path = links / pin.file_name();
        if (bpf_obj_pin(link.get(), path.c_str()) != 0)
            throw_errno(fmt::format("pin the XDP link of '{}' at '{}'", interface, path.string()),
                        errno);
        bpf_link_info info{};
        __u32 len = sizeof(info);
        bpf_obj_get_info_by_fd(link.get(), &info, &len);
        return Attachment{"xdp", interface, pin.mode, ifindex, info.prog_id, info.id, false};
    }

    if (err == EBUSY || err == EEXIST) {
        __u32 other = 0;
        bpf_xdp_query_id(static_cast<int>(ifindex), 0, &other);
        throw Error(fmt::format("cannot attach XDP to '{}': it already has an XDP program "
                                "(id {}) that bulkhead did not attach; remove it first, e.g. "
                                "`ip link set dev {} xdp off`",
                                interface, other, interface),
                    err);
    }
    throw_errno(fmt::format("attach XDP to '{}' in {} mode", interface, to_string(mode)), err,
                mode == XdpMode::native ? "the driver may lack native XDP; try --mode generic"
                                        : "run with -v for details");
}

void Dataplane::detach_xdp(const std::string& interface)
{
    DirLock lock(impl_->options.pin_dir);
    std::uint64_t ns = netns_inode();

    for (const auto& entry : fs::directory_iterator(impl_->options.pin_dir / "links")) {
        auto pin = XdpPin::parse(entry.path().filename());
        if (!pin || pin->netns != ns || pin->interface != interface)
            continue;
        Fd link(bpf_obj_get(entry.path().c_str()));
        if (link)
            bpf_link_detach(link.get());
        fs::remove(entry.path());
        return;
    }
    throw Error(fmt::format("cannot detach XDP from '{}': bulkhead has no XDP link on it in "
                            "this network namespace; see `bulkhead status`",
                            interface),
                ENOENT);
}

fs::path cgroup_v2_root()
{
    std::ifstream mounts("/proc/self/mountinfo");
    std::string line;
    std::optional<fs::path> found;
    while (std::getline(mounts, line)) {
        // "id parent major:minor root mount-point options ... - fstype source options"
        auto dash = line.find(" - ");
        if (dash == std::string::npos || line.compare(dash + 3, 8, "cgroup2 ") != 0)
            continue;
        std::istringstream fields(line.substr(0, dash));
        std::string id, parent, dev, root, mount_point;
        fields >> id >> parent >> dev >> root >> mount_point;
        if (!found || mount_point == "/sys/fs/cgroup")
            found = mount_point;
    }
    if (!found)
        throw Error("cannot find a cgroup v2 mount in /proc/self/mountinfo; mount one with "
                    "`mount -t cgroup2 none /sys/fs/cgroup/unified`",
                    ENOENT);
    return *found;
}

fs::path resolve_cgroup_path(const fs::path& path)
{
    const fs::path root = cgroup_v2_root();
    const fs::path normal = path.lexically_normal();
    auto under = [](const fs::path& p, const fs::path& base) {
        auto rel = p.lexically_relative(base);
        return !rel.empty() && *rel.begin() != "..";
    };
    if (normal == root || under(normal, root))
        return normal;
    if (under(normal, "/sys/fs/cgroup"))  // written for a unified host, read on a hybrid one
        return root / normal.lexically_relative("/sys/fs/cgroup");
    return root / normal.relative_path();
}

Attachment Dataplane::attach_cgroup(const fs::path& path)
{
    DirLock lock(impl_->options.pin_dir);
    const fs::path resolved = resolve_cgroup_path(path);
    Fd cgroup(::open(resolved.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    struct statfs fs_info {};
    struct stat st {};

    if (!cgroup)
        throw_errno(fmt::format("attach to cgroup '{}'", resolved.string()), errno,
                    fmt::format("cgroup v2 is mounted at {}; create the cgroup first",
                                cgroup_v2_root().string()));
    if (::fstatfs(cgroup.get(), &fs_info) != 0 || fs_info.f_type != CGROUP2_SUPER_MAGIC ||
        ::fstat(cgroup.get(), &st) != 0)
        throw Error(fmt::format("cannot attach to '{}': not a cgroup v2 directory (cgroup v2 is "
                                "mounted at {})",
                                resolved.string(), cgroup_v2_root().string()),
                    EINVAL);

    const fs::path links = impl_->options.pin_dir / "links";
    std::vector<fs::path> created;
    try {
        for (const CgroupHook& hook : kCgroupHooks) {
            int prog_fd = program_fd(hook.program);
            fs::path pin = links / CgroupPin{hook.name, st.st_ino, resolved.string()}.file_name();
            Fd existing(bpf_obj_get(pin.c_str()));
            // already ours: swap the program inside the link, one program per hook
            if (existing && bpf_link_update(existing.get(), prog_fd, nullptr) == 0)
                continue;
            fs::remove(pin);
            Fd link(bpf_link_create(prog_fd, cgroup.get(), hook.type, nullptr));
            if (!link)
                throw_errno(fmt::format("attach the {} program to cgroup '{}'", hook.name,
                                        resolved.string()),
                            errno);
            if (bpf_obj_pin(link.get(), pin.c_str()) != 0)
                throw_errno(fmt::format("pin the {} link at '{}'", hook.name, pin.string()),
                            errno);
            created.push_back(pin);
        }
    } catch (...) {
        // all hooks or none: a half-attached cgroup would police one way only
        for (const fs::path& pin : created) {
            Fd link(bpf_obj_get(pin.c_str()));
            if (link)
                bpf_link_detach(link.get());
            fs::remove(pin);
        }
        throw;
    }
    return Attachment{"cgroup", resolved.string(),
                      "ingress,egress,connect4,connect6,sendmsg4,sendmsg6", 0, 0, 0, false};
}

void Dataplane::detach_cgroup(const fs::path& path)
{
    DirLock lock(impl_->options.pin_dir);
    const std::string resolved = resolve_cgroup_path(path).string();
    std::size_t removed = 0;

    for (const auto& entry : fs::directory_iterator(impl_->options.pin_dir / "links")) {
        auto pin = CgroupPin::parse(entry.path().filename());
        if (!pin || pin->path != resolved)
            continue;
        Fd link(bpf_obj_get(entry.path().c_str()));
        if (link)
            bpf_link_detach(link.get());
        fs::remove(entry.path());
        ++removed;
    }
    if (removed == 0)
        throw Error(fmt::format("cannot detach from cgroup '{}': bulkhead has no links there; "
                                "see `bulkhead status`",
                                resolved),
                    ENOENT);
}

namespace {

std::size_t detach_links(const fs::path& links)
{
    std::size_t n = 0;
    if (!fs::exists(links))
        return 0;
    for (const auto& entry : fs::directory_iterator(links)) {
        Fd link(bpf_obj_get(entry.path().c_str()));
        if (link)
            bpf_link_detach(link.get());
        fs::remove(entry.path());
        ++n;
    }
    return n;
}

}  // namespace

std::size_t Dataplane::detach_all()
{
    DirLock lock(impl_->options.pin_dir);
    return detach_links(impl_->options.pin_dir / "links");
}

void Dataplane::destroy(const fs::path& pin_dir)
{
    if (!fs::exists(pin_dir))
        return;
    {
        DirLock lock(pin_dir);
        detach_links(pin_dir / "links");
    }
    std::error_code ec;
    fs::remove_all(pin_dir, ec);
    if (ec)
        throw Error(fmt::format("cannot remove pin directory '{}': {}", pin_dir.string(),
                                ec.message()),
                    ec.value());
}

std::vector<Attachment> Dataplane::Impl::attachments() const
{
    std::vector<Attachment> out;
    std::map<std::string, Attachment> cgroups;  // one entry per cgroup, hooks listed

    for (const auto& entry : fs::directory_iterator(options.pin_dir / "links")) {
        const std::string name = entry.path().filename();
        Fd link(bpf_obj_get(entry.path().c_str()));
        bpf_link_info info{};
        __u32 len = sizeof(info);
        bool live = link && bpf_obj_get_info_by_fd(link.get(), &info, &len) == 0;

        if (auto pin = XdpPin::parse(name)) {
            Attachment a{"xdp", pin->interface, pin->mode, 0, 0, 0, true};
            if (live) {
                a.ifindex = info.xdp.ifindex;
                a.prog_id = info.prog_id;
                a.link_id = info.id;
                a.defunct = info.xdp.ifindex == 0;  // the interface went away
            }
            out.push_back(a);
        } else if (auto cg = CgroupPin::parse(name)) {
            auto [it, fresh] = cgroups.try_emplace(
                cg->path, Attachment{"cgroup", cg->path, "", 0, 0, 0, false});
            Attachment& a = it->second;
            a.mode += (fresh ? "" : ",") + cg->hook;
            a.prog_id = live ? info.prog_id : a.prog_id;
            a.link_id = live ? info.id : a.link_id;
            a.defunct = a.defunct || !live || info.cgroup.cgroup_id == 0;  // cgroup removed
        }
    }
    for (auto& [path, a] : cgroups)
        out.push_back(std::move(a));
    return out;
}

Status Dataplane::status() const
{
    Status s;
    std::optional<GenerationMeta> meta = impl_->active_meta();

    s.pin_dir = impl_->options.pin_dir;
    s.generation = impl_->generation();
    if (meta) {
        s.policy_source = meta->raw.value("source", "");
        s.identities = meta->policy.identities.size();
        s.rules = meta->policy.rules.size();
    }
    s.attachments = impl_->attachments();
    s.maps = impl_->fills(meta);
    return s;
}

Stats Dataplane::stats() const
{
    Stats s;
    int reasons = bpf_map__fd(impl_->skel->maps.bh_reason_cnt);
    int rules = bpf_map__fd(impl_->skel->maps.bh_rule_cnt);
    std::optional<GenerationMeta> meta = impl_->active_meta();

    for (std::uint32_t r = 0; r < BH_REASON_MAX; ++r) {
        if (kReasonNames[r])
            s.reasons.emplace_back(kReasonNames[r], read_percpu(reasons, r));
    }
    if (meta) {
        for (const Rule& rule : meta->policy.rules) {
            auto it = meta->alloc.rules.find(rule.name);
            if (it != meta->alloc.rules.end())
                s.rules.push_back(RuleCounter{rule.name, rule.action, read_percpu(rules, it->second)});
        }
    }
    s.maps = impl_->fills(meta);
    return s;
}

std::optional<Policy> Dataplane::current_policy() const
{
    auto meta = impl_->active_meta();
    if (!meta)
        return std::nullopt;
    return meta->policy;
}

namespace {

bh_identity_info lookup_identity(int host_fd, int lpm_fd, const IpAddr& addr,
                                 const bh_gen_config& cfg)
{
    bh_identity_info info{};
    bh_ipcache_host_key host{};
    std::memcpy(host.addr.bytes, addr.bytes.data(), 16);
    if (detail::map_lookup(host_fd, &host, &info))
        return info;

    bh_ipcache_lpm_key key{};
    key.prefixlen = 128;
    std::memcpy(key.addr.bytes, addr.bytes.data(), 16);
    if (detail::map_lookup(lpm_fd, &key, &info))
        return info;
    return bh_identity_info{BH_ID_WORLD, cfg.world_ingress_mode, cfg.world_egress_mode, {}};
}

bool failsafe_open(int fd, const Flow& flow)
{
    bh_failsafe_key key{};
    key.prefixlen = 32 + 128;
    key.proto = flow.proto;
    key.port = htons(flow.port);
    std::memcpy(key.src.bytes, flow.src.bytes.data(), 16);
    std::uint32_t open = 0;
    return detail::map_lookup(fd, &key, &open) && open;
}

void describe(const detail::Compiled& compiled, const Policy& policy, std::uint32_t id,
              std::string& name, Labels& labels)
{
    auto it = compiled.identities.find(id);
    int workload = it == compiled.identities.end() ? -1 : it->second.workload;
    std::uint32_t base = it == compiled.identities.end() ? id : it->second.workload_id;

    if (workload >= 0) {
        name = policy.identities[static_cast<std::size_t>(workload)].name;
        labels = policy.identities[static_cast<std::size_t>(workload)].labels;
    } else {
        name = base == BH_ID_HOST ? "host" : "world";
        labels = {{"reserved", name}};
    }
}

}  // namespace

Explanation Dataplane::explain(const Flow& flow) const
{
    Explanation out;
    std::uint64_t gen = impl_->generation();
    if (gen == 0) {
        out.verdict = Verdict{VerdictKind::allow, Reason::not_policed, std::nullopt, 0, 0};
        out.from_name = out.to_name = "world";
        return out;
    }

    const auto slot = static_cast<std::uint32_t>(gen & 1);
    Fd hosts = impl_->inner(kTables[kHostsTable], slot);
    Fd prefixes = impl_->inner(kTables[kPrefixesTable], slot);
    Fd policy = impl_->inner(kTables[kPolicyTable], slot);
    bh_gen_config cfg{};
    detail::map_lookup(bpf_map__fd(impl_->skel->maps.bh_gen_cfg), &slot, &cfg);

    // the same lookups, in the same order, as bh_decide() in BPF
    bh_identity_info src = lookup_identity(hosts.get(), prefixes.get(), flow.src, cfg);
    bh_identity_info dst = lookup_identity(hosts.get(), prefixes.get(), flow.dst, cfg);
    bh_policy_key key{};
    key.prefixlen = flow.has_port ? BH_POLICY_PREFIX_FULL : BH_POLICY_PREFIX_PROTO;
    key.dst_id = htonl(dst.id);
    key.src_id = htonl(src.id);
    key.proto = flow.proto;
    key.port = flow.has_port ? htons(flow.port) : 0;
    bh_policy_value rule{};
    bool found = detail::map_lookup(policy.get(), &key, &rule);
    if (!found) {
        key.src_id = htonl(BH_ID_ANY);
        found = detail::map_lookup(policy.get(), &key, &rule);
    }

    std::optional<GenerationMeta> meta = impl_->read_meta(slot);
    std::optional<detail::Compiled> compiled;
    if (meta)
        compiled = impl_->recompile(*meta);
    auto rule_name = [&]() -> std::optional<std::string> {
        if (meta)
            for (const auto& [name, id] : meta->alloc.rules)
                if (id == rule.rule_id)
                    return name;
        return fmt::format("#{}", rule.rule_id);
    };

    Verdict& v = out.verdict;
    v.src_identity = src.id;
    v.dst_identity = dst.id;
    const auto mode = static_cast<Mode>(dst.ingress_mode);
    if (dst.id == BH_ID_HOST && flow.has_port &&
        failsafe_open(impl_->inner(kTables[kFailsafeTable], slot).get(), flow)) {
        v.kind = VerdictKind::allow;
        v.reason = Reason::failsafe;
    } else if (found && rule.action == BH_ACTION_DENY) {
        v.kind = mode == Mode::audit ? VerdictKind::audit : VerdictKind::deny;
        v.reason = Reason::rule;
        v.rule = rule_name();
    } else if (flow.neighbour_discovery) {
        v.kind = VerdictKind::allow;
        v.reason = Reason::not_policed;
    } else if (found) {
        v.kind = VerdictKind::allow;
        v.reason = Reason::rule;
        v.rule = rule_name();
    } else {
        v.reason = Reason::default_mode;
        v.kind = mode == Mode::allow   ? VerdictKind::allow
                 : mode == Mode::audit ? VerdictKind::audit
                                       : VerdictKind::deny;
    }

    if (compiled) {
        describe(*compiled, meta->policy, src.id, out.from_name, out.from_labels);
        describe(*compiled, meta->policy, dst.id, out.to_name, out.to_labels);
    }
    return out;
}

int Dataplane::program_fd(const std::string& name) const
{
    bpf_program* prog = bpf_object__find_program_by_name(impl_->programs()->obj, name.c_str());
    if (!prog)
        throw Error(fmt::format("no BPF program named '{}' in bulkhead's object", name));
    return bpf_program__fd(prog);
}

int Dataplane::map_fd(const std::string& name) const
{
    int fd = bpf_object__find_map_fd_by_name(impl_->skel->obj, name.c_str());
    if (fd < 0)
        throw Error(fmt::format("no map named '{}' in bulkhead's object", name));
    return fd;
}

}  // namespace bulkhead
