#include "compiler.hpp"

#include <bulkhead/types.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <arpa/inet.h>
#include <functional>

namespace bulkhead::detail {
namespace {

constexpr int kWorld = -1;   // workload index of addresses no identity covers
constexpr int kHost = -2;    // workload index of this machine's addresses
constexpr int kV4Base = 96;  // IPv4 prefixes live under ::ffff:0:0/96

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

// Gives each key its number from `table`, or the next unused one from
// `first` on. Numbers are never reused while the table remembers them.
class IdAllocator {
public:
    IdAllocator(std::map<std::string, std::uint32_t>& table, std::uint32_t first)
        : table_(table), next_(first)
    {
        for (const auto& [name, id] : table_)
            next_ = std::max(next_, id + 1);
    }

    std::uint32_t operator()(const std::string& key)
    {
        auto [it, inserted] = table_.try_emplace(key, next_);
        if (inserted)
            ++next_;
        return it->second;
    }

private:
    std::map<std::string, std::uint32_t>& table_;
    std::uint32_t next_;
};

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
    info.flags = d.workload_id == BH_ID_HOST ? BH_IDENTITY_HOST : 0;
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
        : policy_(policy),
          alloc_(alloc),
          out_(out),
          workload_id_(alloc.workloads, BH_ID_FIRST_WORKLOAD),
          class_id_(alloc.classes, BH_ID_FIRST_CLASS)
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
            std::uint32_t id = workload_id_(format_labels(ident.labels));
            workload_ids_.push_back(id);
            out_.identities[id] =
                DatapathIdentity{id, id, static_cast<int>(i), {}, ident.ingress, ident.egress};
        }
    }

    void add_reserved(std::uint32_t id, int workload)
    {
        out_.identities[id] =
            DatapathIdentity{id, id, workload, {}, policy_.default_ingress, policy_.default_egress};
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
        std::uint32_t base = workload >= 0       ? workload_ids_[static_cast<std::size_t>(workload)]
                             : workload == kHost ? std::uint32_t{BH_ID_HOST}
                                                 : std::uint32_t{BH_ID_WORLD};
        if (cidrs.empty())
            return out_.identities.at(base);

        std::string key = class_key(base, cidrs);
        std::uint32_t id = class_id_(key);
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
    IdAllocator workload_id_;
    IdAllocator class_id_;
    std::vector<std::uint32_t> workload_ids_;
    PrefixIndex<int> workloads_;
    PrefixIndex<bool> selector_cidrs_;
    std::set<Prefix> entry_prefixes_;
    std::set<std::string> used_classes_;
};

bool has_any_term(const Selector& sel)
{
    return std::any_of(sel.terms.begin(), sel.terms.end(),
                       [](const SelectorTerm& t) { return t.kind == SelectorTerm::Kind::any; });
}

// Which datapath identities a selector matches, without scanning every
// identity for every rule: identities are indexed by each label of their
// workload, by reserved identity and by each selector CIDR they carry.
class SelectorIndex {
public:
    SelectorIndex(const Compiled& out, const Policy& policy) : out_(out), policy_(policy)
    {
        for (const auto& [id, d] : out.identities) {
            all_.push_back(id);
            if (d.workload >= 0)
                for (const auto& label : labels_of(d))
                    by_label_[label].push_back(id);
            else
                by_reserved_[d.workload_id].push_back(id);
            for (const Prefix& c : d.cidrs)
                by_cidr_[c].push_back(id);
        }
    }

    // Sorted datapath ids.
    std::vector<std::uint32_t> matching(const Selector& sel) const
    {
        std::vector<std::uint32_t> ids;
        for (const SelectorTerm& term : sel.terms)
            add_matches(term, ids);
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        return ids;
    }

private:
    const Labels& labels_of(const DatapathIdentity& d) const
    {
        return policy_.identities[static_cast<std::size_t>(d.workload)].labels;
    }

    void add_matches(const SelectorTerm& term, std::vector<std::uint32_t>& ids) const
    {
        using Kind = SelectorTerm::Kind;
        auto append = [&](const auto& index, const auto& key) {
            if (auto it = index.find(key); it != index.end())
                ids.insert(ids.end(), it->second.begin(), it->second.end());
        };
        switch (term.kind) {
        case Kind::any:
            ids.insert(ids.end(), all_.begin(), all_.end());
            return;
        case Kind::world:
            append(by_reserved_, std::uint32_t{BH_ID_WORLD});
            return;
        case Kind::host:
            append(by_reserved_, std::uint32_t{BH_ID_HOST});
            return;
        case Kind::cidr:
            append(by_cidr_, term.cidr);
            return;
        case Kind::labels:
            break;
        }
        // candidates carry the first key with one of its values; the whole
        // term is then checked on them alone
        std::vector<std::uint32_t> candidates;
        if (term.match.empty()) {
            candidates = all_;
        } else {
            const auto& [key, values] = *term.match.begin();
            for (const std::string& value : values)
                if (auto it = by_label_.find({key, value}); it != by_label_.end())
                    candidates.insert(candidates.end(), it->second.begin(), it->second.end());
        }
        for (std::uint32_t id : candidates) {
            const DatapathIdentity& d = out_.identities.at(id);
            const Labels* labels = d.workload >= 0 ? &labels_of(d) : nullptr;
            if (term_matches_labels(term, Subject{d.workload_id, labels}))
                ids.push_back(id);
        }
    }

    const Compiled& out_;
    const Policy& policy_;
    std::vector<std::uint32_t> all_;
    std::map<std::pair<std::string, std::string>, std::vector<std::uint32_t>> by_label_;
    std::map<std::uint32_t, std::vector<std::uint32_t>> by_reserved_;
    std::map<Prefix, std::vector<std::uint32_t>> by_cidr_;
};

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
    const SelectorIndex index(out, policy);

    for (std::size_t r = 0; r < policy.rules.size(); ++r) {
        const Rule& rule = policy.rules[r];
        rule_blocks.push_back(port_blocks(rule.ports));

        std::vector<std::uint32_t> srcs{BH_ID_ANY};
        if (!has_any_term(rule.from))
            srcs = index.matching(rule.from);
        for (std::uint32_t dst : index.matching(rule.to))
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
        for (const std::string& path :
             policy.identities[static_cast<std::size_t>(d.workload)].cgroups) {
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
                        add_failsafe_entry(v4_all, proto, static_cast<std::uint16_t>(port), 0, out);
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

std::uint32_t class_workload(const std::string& class_key)
{
    return static_cast<std::uint32_t>(std::stoul(class_key.substr(0, class_key.find('|'))));
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
