// The reference evaluator: DESIGN.md "Concepts" and "Verdict of a packet"
// read literally, one rule at a time, with no tables. Slow on purpose: it is
// the oracle the compiler and the BPF programs are tested against, so it must
// be obviously right rather than fast.
#include <bulkhead/reference.hpp>

#include "shared/bulkhead_abi.h"

#include <algorithm>

namespace bulkhead {

namespace {

constexpr int world_index = -1;
constexpr int host_index = -2;

// One end of a flow: the address itself, for cidr selectors, and the
// workload identity that address resolves to, for every other selector.
struct Endpoint {
    IpAddr addr;
    int identity = world_index;
};

Subject subject_of(const Policy& policy, int identity)
{
    if (identity == world_index)
        return {BH_ID_WORLD, nullptr};
    if (identity == host_index)
        return {BH_ID_HOST, nullptr};
    return {BH_ID_FIRST_WORKLOAD + static_cast<std::uint32_t>(identity),
            &policy.identities[static_cast<std::size_t>(identity)].labels};
}

bool term_matches(const Policy& policy, const SelectorTerm& term, const Endpoint& end)
{
    // a cidr selector covers its addresses whatever identity they also have
    if (term.kind == SelectorTerm::Kind::cidr)
        return term.cidr.contains(end.addr);
    return term_matches_labels(term, subject_of(policy, end.identity));
}

bool selector_matches(const Policy& policy, const Selector& selector, const Endpoint& end)
{
    return std::any_of(selector.terms.begin(), selector.terms.end(),
                       [&](const SelectorTerm& term) { return term_matches(policy, term, end); });
}

bool port_matches(const PortSpec& spec, const Flow& flow)
{
    if (spec.proto == PortSpec::Proto::any)
        return true;
    if (static_cast<std::uint8_t>(spec.proto) != flow.proto)
        return false;
    // a flow without a port could be on any port, so only a spec covering
    // every port of the protocol can be sure to apply
    if (!flow.has_port)
        return spec.lo == 0 && spec.hi == 0xffff;
    return spec.lo <= flow.port && flow.port <= spec.hi;
}

// The first rule of `action` in file order that matches the flow.
const Rule* first_match(const Policy& policy, Action action, const Flow& flow,
                        const Endpoint& src, const Endpoint& dst)
{
    for (const Rule& rule : policy.rules) {
        if (rule.action != action)
            continue;
        bool ports = std::any_of(rule.ports.begin(), rule.ports.end(),
                                 [&](const PortSpec& spec) { return port_matches(spec, flow); });
        if (ports && selector_matches(policy, rule.from, src) &&
            selector_matches(policy, rule.to, dst))
            return &rule;
    }
    return nullptr;
}

// At an ingress point the destination protects itself, at an egress point
// the source does; addresses of no workload identity use the defaults.
Mode enforcing_mode(const Policy& policy, Direction direction, const Endpoint& src,
                    const Endpoint& dst)
{
    if (direction == Direction::ingress) {
        return dst.identity >= 0 ? policy.identities[static_cast<std::size_t>(dst.identity)].ingress
                                 : policy.default_ingress;
    }
    return src.identity >= 0 ? policy.identities[static_cast<std::size_t>(src.identity)].egress
                             : policy.default_egress;
}

// A deny, explicit or default, becomes a counted pass in audit mode.
Verdict refuse(Mode mode, Reason reason, std::optional<std::string> rule)
{
    VerdictKind kind = mode == Mode::audit ? VerdictKind::audit : VerdictKind::deny;
    return Verdict{kind, reason, std::move(rule), 0, 0};
}

}  // namespace

int reference_identity_of(const Policy& policy, const IpAddr& addr,
                          const std::vector<Prefix>& host_addrs)
{
    int best = world_index;
    int best_len = -1;
    for (std::size_t i = 0; i < policy.identities.size(); i++) {
        for (const Prefix& prefix : policy.identities[i].cidrs) {
            if (prefix.len > best_len && prefix.contains(addr)) {
                best = static_cast<int>(i);
                best_len = prefix.len;
            }
        }
    }

    // host addresses yield to a policy prefix at least as long as theirs
    for (const Prefix& prefix : host_addrs) {
        if (prefix.len > best_len && prefix.contains(addr)) {
            best = host_index;
            best_len = prefix.len;
        }
    }
    return best;
}

Verdict reference_verdict(const Policy& policy, const Flow& flow, Direction direction,
                          const std::vector<Prefix>& host_addrs)
{
    Endpoint src{flow.src, reference_identity_of(policy, flow.src, host_addrs)};
    Endpoint dst{flow.dst, reference_identity_of(policy, flow.dst, host_addrs)};
    Mode mode = enforcing_mode(policy, direction, src, dst);

    // Failsafe ports are not part of this evaluator yet.
    if (const Rule* deny = first_match(policy, Action::deny, flow, src, dst))
        return refuse(mode, Reason::rule, deny->name);
    if (flow.neighbour_discovery)
        return Verdict{VerdictKind::allow, Reason::not_policed, std::nullopt, 0, 0};
    if (const Rule* allow = first_match(policy, Action::allow, flow, src, dst))
        return Verdict{VerdictKind::allow, Reason::rule, allow->name, 0, 0};

    if (mode == Mode::allow)
        return Verdict{VerdictKind::allow, Reason::default_mode, std::nullopt, 0, 0};
    return refuse(mode, Reason::default_mode, std::nullopt);
}

}  // namespace bulkhead
