// Internals of Dataplane shared by its source files: the table layout, the
// pinned-state handle (Dataplane::Impl) and the bookkeeping of generations.
// Not installed.
#pragma once

#include <bulkhead/dataplane.hpp>

#include "bpf_util.hpp"
#include "compiler.hpp"
#include "policy_json.hpp"

#include "bulkhead_bpf.skel.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/file.h>

#include <array>
#include <map>
#include <cerrno>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

namespace bulkhead {
namespace detail {

namespace fs = std::filesystem;
using nlohmann::json;

inline constexpr std::uint32_t kDefaultMaxRules = 16384;
inline constexpr std::uint32_t kDefaultMaxConnections = 262144;
inline constexpr const char* kBpfFsRoot = "/sys/fs/bpf";

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

inline const std::array<TableSpec, 5> kTables{{
    {"bh_ipc_host", BPF_MAP_TYPE_HASH, sizeof(bh_ipcache_host_key), sizeof(bh_identity_info),
     &Options::max_ipcache_hosts, 1u << 20, "--max-ipcache-hosts", "Options::max_ipcache_hosts"},
    {"bh_ipc_lpm", BPF_MAP_TYPE_LPM_TRIE, sizeof(bh_ipcache_lpm_key), sizeof(bh_identity_info),
     &Options::max_ipcache_prefixes, 1u << 16, "--max-ipcache-prefixes",
     "Options::max_ipcache_prefixes"},
    {"bh_policy", BPF_MAP_TYPE_LPM_TRIE, sizeof(bh_policy_key), sizeof(bh_policy_value),
     &Options::max_policy_entries, 1u << 20, "--max-policy-entries", "Options::max_policy_entries"},
    {"bh_cgroups", BPF_MAP_TYPE_HASH, sizeof(bh_cgroup_key), sizeof(bh_identity_info),
     &Options::max_cgroups, 1u << 16, "--max-cgroups", "Options::max_cgroups"},
    // failsafe lists are short: the parser bounds them
    {"bh_failsafe", BPF_MAP_TYPE_LPM_TRIE, sizeof(bh_failsafe_key), sizeof(std::uint32_t), nullptr,
     1u << 14, "", ""},
}};

inline std::uint32_t wanted_size(const Options& o, const TableSpec& t, std::uint32_t fallback)
{
    return t.option ? (o.*t.option).value_or(fallback) : fallback;
}

inline const std::array<const char*, BH_REASON_MAX> kReasonNames{
    "allow-rule",   "deny-rule",     "audit-rule", "allow-default",
    "deny-default", "audit-default", "not-ip",     "neighbour-discovery",
    "malformed",    "no-policy",     "tracked",    "failsafe",
    "ct-miss",      "revoked",       nullptr,      nullptr,
};

inline std::string pin_name(const std::string& map_name)
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

inline json prefixes_json(const std::vector<Prefix>& prefixes)
{
    json out = json::array();
    for (const Prefix& p : prefixes)
        out.push_back(p.str());
    return out;
}

Counter read_percpu(int fd, std::uint32_t index);
void zero_percpu(int fd, std::uint32_t index, const std::string& name);

}  // namespace detail

namespace fs = std::filesystem;
using detail::DirLock;
using detail::Fd;
using detail::GenerationMeta;
using detail::kDefaultMaxConnections;
using detail::kDefaultMaxRules;
using detail::kHostsTable;
using detail::kTables;
using detail::pin_name;
using detail::TableSpec;
using detail::throw_errno;
using detail::wanted_size;
using nlohmann::json;

// The handle on the pinned state: maps always, programs once needed.
struct Dataplane::Impl {
    struct SkelDeleter {
        void operator()(bulkhead_bpf* s) const { bulkhead_bpf__destroy(s); }
    };

    Options options;
    std::unique_ptr<bulkhead_bpf, SkelDeleter> skel;           // the maps
    mutable std::unique_ptr<bulkhead_bpf, SkelDeleter> progs;  // the programs, once needed

    // Names of the identities and rules of one generation, for explain();
    // rebuilt only when the generation in force changes.
    struct Names {
        std::uint64_t generation = 0;
        std::map<std::uint32_t, std::pair<std::string, Labels>> identities;
        std::map<std::uint32_t, std::string> rules;
    };
    mutable Names names;

    const Names& names_of(std::uint64_t gen) const
    {
        if (names.generation == gen)
            return names;

        Names fresh;
        fresh.generation = gen;
        fresh.identities[BH_ID_WORLD] = {"world", Labels{{"reserved", "world"}}};
        fresh.identities[BH_ID_HOST] = {"host", Labels{{"reserved", "host"}}};
        if (auto meta = read_meta(static_cast<std::uint32_t>(gen & 1))) {
            for (const Identity& ident : meta->policy.identities) {
                auto it = meta->alloc.workloads.find(format_labels(ident.labels));
                if (it != meta->alloc.workloads.end())
                    fresh.identities[it->second] = {ident.name, ident.labels};
            }
            // an address class is named after the workload identity it narrows
            for (const auto& [key, id] : meta->alloc.classes) {
                auto it = fresh.identities.find(detail::class_workload(key));
                if (it != fresh.identities.end())
                    fresh.identities[id] = it->second;
            }
            for (const auto& [name, id] : meta->alloc.rules)
                fresh.rules[id] = name;
        }
        names = std::move(fresh);
        return names;
    }
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
                bpf_map__set_max_entries(map,
                                         options.max_connections.value_or(kDefaultMaxConnections));
            return;
        }

        detail::MapInfo info = detail::map_info(fd.get(), name);
        if (info.type != bpf_map__type(map) || info.key_size != bpf_map__key_size(map) ||
            info.value_size != bpf_map__value_size(map))
            throw Error(fmt::format(
                "cannot reuse pinned map '{}': its layout (type {}, key {} B, value {} B) is "
                "not this version's; remove the old state with `bulkhead --pin-dir {} detach "
                "all` and `rm -r {}`",
                path.string(), info.type, info.key_size, info.value_size, options.pin_dir.string(),
                options.pin_dir.string()));
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
            throw Error(
                fmt::format("the pinned state under '{}' is incomplete: slot {} of '{}' "
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

    std::uint64_t gen_ctl(std::uint32_t index) const
    {
        bh_gen_ctl ctl{};
        detail::map_lookup(fd_of(skel->maps.bh_gen_ctl), &index, &ctl);
        return ctl.generation;
    }

    void set_gen_ctl(std::uint32_t index, std::uint64_t generation)
    {
        bh_gen_ctl ctl{generation};
        detail::map_update(fd_of(skel->maps.bh_gen_ctl), &index, &ctl, "bh_gen_ctl");
    }

    // The generation in force.
    std::uint64_t generation() const { return gen_ctl(BH_GEN_CTL_CURRENT); }

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
        std::uint32_t chunks = static_cast<std::uint32_t>(std::max<std::size_t>(
            1, (blob.size() + BH_META_CHUNK_BYTES - 1) / BH_META_CHUNK_BYTES));
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
            out.push_back(
                MapFill{t.name, entries, detail::map_info(fd.get(), t.name).max_entries, t.flag});
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

}  // namespace bulkhead
