#include "dataplane_impl.hpp"

#include <fmt/std.h>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <linux/magic.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <fstream>

namespace bulkhead {

using detail::Fd;
using detail::throw_errno;
using namespace detail;
using nlohmann::json;
namespace fs = std::filesystem;

namespace detail {

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

}  // namespace detail

namespace {

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
        throw Error(
            "cannot open the dataplane: bulkhead needs root (CAP_BPF, CAP_NET_ADMIN "
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
        throw Error(
            "this kernel lacks XDP programs, which bulkhead needs; use Linux 5.15 or "
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

    // only once the maps are known good: a refused open leaves nothing new
    fs::path links = options.pin_dir / "links";
    if (::mkdir(links.c_str(), 0700) != 0 && errno != EEXIST)
        throw_errno(fmt::format("create '{}'", links.string()), errno);
    return Dataplane(std::move(impl));
}

ApplyResult Dataplane::apply(const Policy& policy, const std::string& source)
{
    DirLock lock(impl_->options.pin_dir);
    return impl_->commit(policy, source);
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
                s.rules.push_back(
                    RuleCounter{rule.name, rule.action, read_percpu(rules, it->second)});
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
    return bh_identity_info{BH_ID_WORLD, cfg.world_ingress_mode, cfg.world_egress_mode, 0, 0};
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

std::pair<std::string, Labels> describe(
    const std::map<std::uint32_t, std::pair<std::string, Labels>>& identities, std::uint32_t id)
{
    if (auto it = identities.find(id); it != identities.end())
        return it->second;
    return {fmt::format("#{}", id), Labels{}};
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

    const Impl::Names& names = impl_->names_of(gen);
    auto rule_name = [&]() -> std::optional<std::string> {
        auto it = names.rules.find(rule.rule_id);
        return it != names.rules.end() ? it->second : fmt::format("#{}", rule.rule_id);
    };

    Verdict& v = out.verdict;
    v.src_identity = src.id;
    v.dst_identity = dst.id;
    const auto mode = static_cast<Mode>(dst.ingress_mode);
    if ((dst.flags & BH_IDENTITY_HOST) && flow.has_port &&
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

    std::tie(out.from_name, out.from_labels) = describe(names.identities, src.id);
    std::tie(out.to_name, out.to_labels) = describe(names.identities, dst.id);
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
