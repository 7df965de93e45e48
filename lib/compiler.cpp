#include "compiler.hpp"

#include <bulkhead/types.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <arpa/inet.h>
#include <functional>

namespace bulkhead::detail {
namespace {

constexpr int kWorld = -1;  // workload index of addresses no identity covers
constexpr int kHost = -2;   // workload index of this machine's addresses
constexpr int kV4Base = 96; // IPv4 prefixes live under ::ffff:0:0/96

IpAddr masked(const IpAddr& addr, int len)
{
    IpAddr out = addr;
    for (int bit = len; bit < 128; ++bit)
        out.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80u >> (bit % 8)));
    return out;
}

// Prefixes grouped by length, for "longest prefix containing this one"
// queries: one hash lookup per distinct length, not per prefix.
template <typename V>
class PrefixIndex {
public:
    void add(const Prefix& p, V value) { by_len_[p.len].emplace(key_bytes(p.addr.bytes), value); }

    bool has(const Prefix& p) const
    {
        auto it = by_len_.find(p.len);
        return it != by_len_.end() && it->second.count(key_bytes(p.addr.bytes)) > 0;
    }

    // Calls fn(prefix, value) for every prefix of length <= max_len that
    // contains addr, longest first; stops when fn returns false. An IPv6
    // prefix shorter than /96 never contains an IPv4 address (Prefix::contains).
    void each_containing(const IpAddr& addr, int max_len,
                         const std::function<bool(const Prefix&, const V&)>& fn) const
    {
        const int min_len = addr.is_v4() ? kV4Base : 0;
        for (const auto& [len, entries] : by_len_) {
            if (len > max_len || len < min_len)
                continue;
            Prefix p{masked(addr, len), static_cast<std::uint8_t>(len)};
            auto it = entries.find(key_bytes(p.addr.bytes));
            if (it != entries.end() && !fn(p, it->second))
                return;
        }
    }

private:
    std::map<int, std::unordered_map<KeyBytes<16>, V, KeyHash>, std::greater<>> by_len_;
};

// Gives `key` its number from `table`, or the next free one from `first` on.
std::uint32_t allocate(std::map<std::string, std::uint32_t>& table, const std::string& key,
                       std::uint32_t first)
{
    if (auto it = table.find(key); it != table.end())
        return it->second;

    std::uint32_t next = first;
    for (const auto& [name, id] : table)
        next = std::max(next, id + 1);
    table.emplace(key, next);
    return next;
}

// Rule counters are a fixed array: a rule keeps its index while it exists,
// and a new rule takes the lowest free one.
std::vector<std::uint32_t> allocate_rules(const Policy& policy, Allocations& alloc,
                                          const CompileLimits& limits)
{
    if (policy.rules.size() > limits.max_rules)
        throw Error(fmt::format(
            "cannot compile policy: it has {} rules but map 'bh_rule_cnt' counts at most {}; "
            "recreate the pinned state with a larger --max-rules (bulkhead detach all, then "
            "apply with --max-rules)",
            policy.rules.size(), limits.max_rules));

    std::map<std::string, std::uint32_t> kept;
    std::set<std::uint32_t> used;
    for (const Rule& rule : policy.rules) {
        auto it = alloc.rules.find(rule.name);
        if (it != alloc.rules.end() && it->second < limits.max_rules) {
            kept.emplace(rule.name, it->second);
            used.insert(it->second);
        }
    }

    std::vector<std::uint32_t> ids;
    std::uint32_t next_free = 0;
    for (const Rule& rule : policy.rules) {
        if (auto it = kept.find(rule.name); it != kept.end()) {
            ids.push_back(it->second);
            continue;
        }
        while (used.count(next_free))
            ++next_free;
        used.insert(next_free);
        kept.emplace(rule.name, next_free);
        ids.push_back(next_free);
    }
    alloc.rules = std::move(kept);
    return ids;
}

std::string class_key(std::uint32_t workload_id, const std::vector<Prefix>& cidrs)
{
    std::string key = fmt::format("{}|", workload_id);
    for (const Prefix& c : cidrs)
        key += c.str() + ",";
    return key;
}

bh_identity_info identity_info(const DatapathIdentity& d)
{
    bh_identity_info info{};
    info.id = d.id;
    info.ingress_mode = static_cast<std::uint8_t>(d.ingress);
    info.egress_mode = static_cast<std::uint8_t>(d.egress);
    return info;
}

// Builds the address classes and the IP cache. Every prefix that a policy
// identity lists or a selector names becomes an entry; its class is the
// workload identity of its longest enclosing workload prefix together with
// every selector CIDR that encloses it. Because each entry prefix carries
// both, one identity lookup per address answers label and CIDR selectors.
class IdentityBuilder {
public:
    IdentityBuilder(const Policy& policy, Allocations& alloc, Compiled& out)
        : policy_(policy), alloc_(alloc), out_(out)
    {
    }

    void build(const std::vector<Prefix>& host_addrs)
    {
        assign_workload_ids();
        index_prefixes(host_addrs);
        shield_ipv4();
        for (const Prefix& p : entry_prefixes_)
            add_entry(p);
        prune_classes();
    }

private:
    void assign_workload_ids()
    {
        add_reserved(BH_ID_WORLD, kWorld);
        add_reserved(BH_ID_HOST, kHost);
        for (std::size_t i = 0; i < policy_.identities.size(); ++i) {
            const Identity& ident = policy_.identities[i];
            std::uint32_t id =
                allocate(alloc_.workloads, format_labels(ident.labels), BH_ID_FIRST_WORKLOAD);
            workload_ids_.push_back(id);
            out_.identities[id] = DatapathIdentity{id, id, static_cast<int>(i), {},
                                                   ident.ingress, ident.egress};
        }
    }

    void add_reserved(std::uint32_t id, int workload)
    {
        out_.identities[id] = DatapathIdentity{id, id, workload, {}, policy_.default_ingress,
                                               policy_.default_egress};
    }

    void index_prefixes(const std::vector<Prefix>& host_addrs)
    {
        for (std::size_t i = 0; i < policy_.identities.size(); ++i) {
            for (const Prefix& p : policy_.identities[i].cidrs) {
                workloads_.add(p, static_cast<int>(i));
                entry_prefixes_.insert(p);
            }
        }
        // a policy identity that lists a host address itself wins over `host`
        for (const Prefix& h : host_addrs) {
            if (!workloads_.has(h)) {
                workloads_.add(h, kHost);
                entry_prefixes_.insert(h);
            }
        }
        for (const Rule& rule : policy_.rules) {
            for (const Selector* sel : {&rule.from, &rule.to}) {
                for (const SelectorTerm& term : sel->terms) {
                    if (term.kind == SelectorTerm::Kind::cidr && !selector_cidrs_.has(term.cidr)) {
                        selector_cidrs_.add(term.cidr, true);
                        entry_prefixes_.insert(term.cidr);
                    }
                }
            }
        }
    }

    // The trie is one 128-bit space, so an IPv6 prefix such as ::/0 also
    // spans the IPv4-mapped range. IPv6 prefixes must not claim IPv4
    // addresses: give the IPv4 range an entry of its own, which the trie
    // prefers, so an IPv4 address never falls through to an IPv6 prefix.
    void shield_ipv4()
    {
        const Prefix v4_all = *Prefix::parse("0.0.0.0/0");
        for (const Prefix& p : entry_prefixes_) {
            if (p.len < kV4Base && (masked(v4_all.addr, p.len) == p.addr)) {
                entry_prefixes_.insert(v4_all);
                return;
            }
        }
    }

    void add_entry(const Prefix& p)
    {
        int workload = kWorld;
        workloads_.each_containing(p.addr, p.len, [&](const Prefix&, const int& w) {
            workload = w;
            return false;  // the longest is enough
        });

        std::vector<Prefix> cidrs;
        selector_cidrs_.each_containing(p.addr, p.len, [&](const Prefix& c, const bool&) {
            cidrs.push_back(c);
            return true;
        });
        std::sort(cidrs.begin(), cidrs.end());

        const DatapathIdentity& d = class_of(workload, cidrs);
        if (p.is_host()) {
            bh_ipcache_host_key key{};
            std::memcpy(key.addr.bytes, p.addr.bytes.data(), 16);
            out_.hosts[key_bytes(key)] = identity_info(d);
        } else {
            bh_ipcache_lpm_key key{};
            key.prefixlen = p.len;
            std::memcpy(key.addr.bytes, p.addr.bytes.data(), 16);
            out_.prefixes[key_bytes(key)] = identity_info(d);
        }
    }

    const DatapathIdentity& class_of(int workload, const std::vector<Prefix>& cidrs)
    {
        std::uint32_t base = workload >= 0 ? workload_ids_[static_cast<std::size_t>(workload)]
                             : workload == kHost ? std::uint32_t{BH_ID_HOST}
                                                 : std::uint32_t{BH_ID_WORLD};
        if (cidrs.empty())
            return out_.identities.at(base);

        std::string key = class_key(base, cidrs);
        std::uint32_t id = allocate(alloc_.classes, key, BH_ID_FIRST_CLASS);
        used_classes_.insert(key);
        auto [it, inserted] = out_.identities.try_emplace(id, out_.identities.at(base));
        if (inserted) {
            it->second.id = id;
            it->second.cidrs = cidrs;
        }
        return it->second;
    }

    void prune_classes()
    {
        std::erase_if(alloc_.classes,
                      [&](const auto& entry) { return !used_classes_.count(entry.first); });
    }

    const Policy& policy_;
    Allocations& alloc_;
    Compiled& out_;
    std::vector<std::uint32_t> workload_ids_;
    PrefixIndex<int> workloads_;
    PrefixIndex<bool> selector_cidrs_;
    std::set<Prefix> entry_prefixes_;
    std::set<std::string> used_classes_;
};

bool term_matches(const SelectorTerm& term, const DatapathIdentity& d, const Policy& policy)
{
    switch (term.kind) {
    case SelectorTerm::Kind::any:
        return true;
    case SelectorTerm::Kind::cidr:
        return std::binary_search(d.cidrs.begin(), d.cidrs.end(), term.cidr);
    default: {
        const Labels* labels =
            d.workload >= 0 ? &policy.identities[static_cast<std::size_t>(d.workload)].labels
                            : nullptr;
        return term_matches_labels(term, Subject{d.workload_id, labels});
    }
    }
}

bool has_any_term(const Selector& sel)
{
    return std::any_of(sel.terms.begin(), sel.terms.end(),
                       [](const SelectorTerm& t) { return t.kind == SelectorTerm::Kind::any; });
}

std::vector<std::uint32_t> matching_identities(const Selector& sel, const Compiled& out,
                                               const Policy& policy)
{
    std::vector<std::uint32_t> ids;
    for (const auto& [id, d] : out.identities) {
        if (std::any_of(sel.terms.begin(), sel.terms.end(),
                        [&](const SelectorTerm& t) { return term_matches(t, d, policy); }))
            ids.push_back(id);
    }
    return ids;
}

// A block of the 32-bit space {protocol, pad, port}: `len` leading bits fixed.
struct Block {
    std::uint32_t start = 0;
    int len = 0;
    std::uint64_t key() const { return std::uint64_t{start} << 6 | static_cast<unsigned>(len); }
};

std::uint32_t block_mask(int len)
{
    return len == 0 ? 0u : ~0u << (32 - len);
}

// Splits [lo, hi] into the fewest aligned blocks.
void decompose(std::uint64_t lo, std::uint64_t hi, std::vector<Block>& out)
{
    while (lo <= hi) {
        int len = 32;
        while (len > 0) {
            std::uint64_t size = std::uint64_t{1} << (32 - (len - 1));
            if (lo % size != 0 || lo + size - 1 > hi)
                break;
            --len;
        }
        out.push_back(Block{static_cast<std::uint32_t>(lo), len});
        lo += std::uint64_t{1} << (32 - len);
    }
}

std::vector<Block> port_blocks(const std::vector<PortSpec>& ports)
{
    std::vector<Block> blocks;
    for (const PortSpec& spec : ports) {
        if (spec.proto == PortSpec::Proto::any) {
            blocks.push_back(Block{0, 0});
            continue;
        }
        std::uint64_t base = std::uint64_t{static_cast<std::uint8_t>(spec.proto)} << 24;
        decompose(base | spec.lo, base | spec.hi, blocks);
    }
    return blocks;
}

// Writes the entries of one (destination, source) set. Each distinct block
// of any rule in the set becomes one entry, holding the verdict of all rules
// whose blocks enclose it: the trie's longest match then lands on a block
// whose enclosing rules are exactly the rules matching the packet, so deny
// precedence is settled here and not by extra lookups.
void emit_set(std::uint32_t dst, std::uint32_t src, const std::vector<std::size_t>& rule_indices,
              const std::vector<std::vector<Block>>& rule_blocks, const Policy& policy,
              Compiled& out)
{
    std::unordered_map<std::uint64_t, std::vector<std::size_t>> blocks;
    std::vector<Block> order;
    for (std::size_t r : rule_indices) {
        for (const Block& b : rule_blocks[r]) {
            auto [it, inserted] = blocks.try_emplace(b.key());
            if (inserted)
                order.push_back(b);
            it->second.push_back(r);
        }
    }

    for (const Block& b : order) {
        std::size_t first_deny = SIZE_MAX;
        std::size_t first_allow = SIZE_MAX;
        for (int len = b.len; len >= 0; --len) {
            auto it = blocks.find(Block{b.start & block_mask(len), len}.key());
            if (it == blocks.end())
                continue;
            for (std::size_t r : it->second) {
                std::size_t& slot =
                    policy.rules[r].action == Action::deny ? first_deny : first_allow;
                slot = std::min(slot, r);
            }
        }
        std::size_t decider = first_deny != SIZE_MAX ? first_deny : first_allow;

        bh_policy_key key{};
        key.prefixlen = static_cast<std::uint32_t>(BH_POLICY_PREFIX_IDS + b.len);
        key.dst_id = htonl(dst);
        key.src_id = htonl(src);
        key.proto = static_cast<std::uint8_t>(b.start >> 24);
        key.pad = static_cast<std::uint8_t>(b.start >> 16);
        key.port = htons(static_cast<std::uint16_t>(b.start & 0xffff));

        bh_policy_value value{};
        value.rule_id = out.rule_ids[decider];
        value.action = static_cast<std::uint8_t>(policy.rules[decider].action);
        out.policy[key_bytes(key)] = value;
    }
}

void compile_rules(const Policy& policy, Compiled& out)
{
    // destination -> source (BH_ID_ANY for any) -> rules, in file order
    std::map<std::uint32_t, std::map<std::uint32_t, std::vector<std::size_t>>> sets;
    std::vector<std::vector<Block>> rule_blocks;

    for (std::size_t r = 0; r < policy.rules.size(); ++r) {
        const Rule& rule = policy.rules[r];
        rule_blocks.push_back(port_blocks(rule.ports));

        std::vector<std::uint32_t> srcs{BH_ID_ANY};
        if (!has_any_term(rule.from))
            srcs = matching_identities(rule.from, out, policy);
        for (std::uint32_t dst : matching_identities(rule.to, out, policy))
            for (std::uint32_t src : srcs)
                sets[dst][src].push_back(r);
    }

    for (auto& [dst, by_src] : sets) {
        const auto any_it = by_src.find(BH_ID_ANY);
        for (auto& [src, rules] : by_src) {
            // fold the any-source rules into every specific source's set, so
            // a hit there is final and needs no second lookup
            if (src != BH_ID_ANY && any_it != by_src.end()) {
                rules.insert(rules.end(), any_it->second.begin(), any_it->second.end());
                std::sort(rules.begin(), rules.end());
                rules.erase(std::unique(rules.begin(), rules.end()), rules.end());
            }
            emit_set(dst, src, rules, rule_blocks, policy, out);
        }
    }
}

// A registered cgroup stands for its workload identity; it has no address,
// so CIDR selectors never narrow it.
void compile_cgroups(const Policy& policy, const std::map<std::string, std::uint64_t>& ids,
                     Compiled& out)
{
    for (const auto& [datapath_id, d] : out.identities) {
        if (d.workload < 0 || !d.cidrs.empty())
            continue;
        for (const std::string& path : policy.identities[static_cast<std::size_t>(d.workload)].cgroups) {
            auto it = ids.find(path);
            if (it == ids.end())
                continue;
            bh_cgroup_key key{it->second};
            out.cgroups[key_bytes(key)] = identity_info(d);
        }
    }
}

void add_failsafe_entry(const Prefix& from, std::uint8_t proto, std::uint16_t port,
                        std::uint32_t open, Compiled& out)
{
    bh_failsafe_key key{};
    key.prefixlen = 32u + from.len;
    key.proto = proto;
    key.port = htons(port);
    std::memcpy(key.src.bytes, from.addr.bytes.data(), 16);
    out.failsafe.emplace(key_bytes(key), open);  // an opening entry is never overwritten
}

// One trie entry per (port, management prefix). Ranges are spelled out port
// by port; the parser keeps failsafe lists short.
void compile_failsafe(const Failsafe& failsafe, Compiled& out)
{
    if (!failsafe.enabled)
        return;
    const Prefix v4_all = *Prefix::parse("0.0.0.0/0");
    for (const PortSpec& spec : failsafe.ports) {
        std::vector<std::uint8_t> protos{static_cast<std::uint8_t>(spec.proto)};
        if (spec.proto == PortSpec::Proto::any)
            protos = {6, 17, 132};
        for (std::uint8_t proto : protos) {
            for (std::uint32_t port = spec.lo; port <= spec.hi; ++port) {
                for (const Prefix& from : failsafe.from)
                    add_failsafe_entry(from, proto, static_cast<std::uint16_t>(port), 1, out);
                // the trie would let an IPv6 prefix such as ::/0 cover IPv4:
                // close IPv4 unless an IPv4 prefix opened it
                for (const Prefix& from : failsafe.from)
                    if (from.len < kV4Base && masked(v4_all.addr, from.len) == from.addr)
                        add_failsafe_entry(v4_all, proto, static_cast<std::uint16_t>(port), 0,
                                           out);
            }
        }
    }
}

}  // namespace

nlohmann::json Allocations::to_json() const
{
    return {{"workloads", workloads}, {"classes", classes}, {"rules", rules}};
}

Allocations Allocations::from_json(const nlohmann::json& j)
{
    Allocations a;
    a.workloads = j.at("workloads").get<std::map<std::string, std::uint32_t>>();
    a.classes = j.at("classes").get<std::map<std::string, std::uint32_t>>();
    a.rules = j.at("rules").get<std::map<std::string, std::uint32_t>>();
    return a;
}

Compiled compile(const Policy& policy, Allocations& alloc, const HostFacts& host,
                 const CompileLimits& limits)
{
    Compiled out;

    out.rule_ids = allocate_rules(policy, alloc, limits);
    out.config.world_ingress_mode = static_cast<std::uint8_t>(policy.default_ingress);
    out.config.world_egress_mode = static_cast<std::uint8_t>(policy.default_egress);
    IdentityBuilder(policy, alloc, out).build(host.addresses);
    compile_cgroups(policy, host.cgroup_ids, out);
    compile_failsafe(policy.failsafe, out);
    compile_rules(policy, out);
    return out;
}

std::uint32_t compiled_identity_of(const Compiled& compiled, const IpAddr& addr)
{
    bh_ipcache_host_key host{};
    std::memcpy(host.addr.bytes, addr.bytes.data(), 16);
    if (auto it = compiled.hosts.find(key_bytes(host)); it != compiled.hosts.end())
        return it->second.id;

    for (int len = 127; len >= 0; --len) {
        bh_ipcache_lpm_key key{};
        key.prefixlen = static_cast<std::uint32_t>(len);
        IpAddr m = masked(addr, len);
        std::memcpy(key.addr.bytes, m.bytes.data(), 16);
        if (auto it = compiled.prefixes.find(key_bytes(key)); it != compiled.prefixes.end())
            return it->second.id;
    }
    return BH_ID_WORLD;
}

}  // namespace bulkhead::detail
