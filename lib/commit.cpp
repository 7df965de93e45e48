// The commit protocol: DESIGN.md "Atomic policy updates".
#include "dataplane_impl.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <sys/stat.h>

namespace bulkhead {

using detail::Fd;
using detail::throw_errno;
using namespace detail;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string full_table_message(const TableSpec& t, std::size_t needed, std::uint32_t size)
{
    return fmt::format(
        "cannot commit policy: table '{}' needs {} entries but holds {}; raise "
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
                spdlog::warn(
                    "cgroup '{}' of identity '{}' does not exist ({}); its processes "
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
}  // namespace

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

    // the slot was left by the switch to `gen`; unless a grace period has
    // been seen since (a commit that died before its wait), wait for it now
    if (gen_ctl(BH_GEN_CTL_QUIESCED) != gen)
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
    set_gen_ctl(BH_GEN_CTL_CURRENT, gen + 1);

    // the new policy is in force; now pay the grace period that frees the
    // old slot, so the next commit can write it at once
    wait_for_readers(static_cast<std::uint32_t>(gen & 1));
    set_gen_ctl(BH_GEN_CTL_QUIESCED, gen + 1);

    result.generation = gen + 1;
    result.ipcache_entries = counts[kHostsTable] + counts[kPrefixesTable];
    result.policy_entries = counts[kPolicyTable];
    return result;
}

}  // namespace bulkhead
