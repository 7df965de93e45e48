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
const Rule* first_match(const Policy& policy, Action action, const Flow& flow, const Endpoint& src,
                        const Endpoint& dst)
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

// Failsafe: a host port that stays reachable from the management prefixes
// whatever the rules say, so that a wrong policy cannot lock the operator
// out. Only at ingress points, only for ports: `any` means every port of
// TCP, UDP and SCTP.
bool failsafe_opens(const Policy& policy, const Flow& flow, Direction direction,
                    const Endpoint& src, const Endpoint& dst)
{
    const Failsafe& failsafe = policy.failsafe;
    if (!failsafe.enabled || direction != Direction::ingress || dst.identity != host_index ||
        !flow.has_port)
        return false;

    bool port =
        std::any_of(failsafe.ports.begin(), failsafe.ports.end(), [&](const PortSpec& spec) {
            if (spec.proto == PortSpec::Proto::any)
                return flow.proto == 6 || flow.proto == 17 || flow.proto == 132;
            return port_matches(spec, flow);
        });
    // Prefix::contains keeps IPv4 out of IPv6 prefixes shorter than /96
    bool from = std::any_of(failsafe.from.begin(), failsafe.from.end(),
                            [&](const Prefix& prefix) { return prefix.contains(src.addr); });
    return port && from;
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

    if (failsafe_opens(policy, flow, direction, src, dst))
        return Verdict{VerdictKind::allow, Reason::failsafe, std::nullopt, 0, 0};
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

// ---------------------------------------------------------------------------
// Connection tracking
// ---------------------------------------------------------------------------

namespace {

constexpr std::uint8_t kIcmp = 1;
constexpr std::uint8_t kTcp = 6;
constexpr std::uint8_t kIcmpv6 = 58;
constexpr std::uint8_t kTcpSyn = 0x02;
constexpr std::uint8_t kTcpAck = 0x10;

bool is_icmp(std::uint8_t proto)
{
    return proto == kIcmp || proto == kIcmpv6;
}

// Echo request and reply, by type (the high byte of Flow::port).
bool is_echo_request(const Flow& flow)
{
    std::uint8_t type = static_cast<std::uint8_t>(flow.port >> 8);
    return flow.proto == kIcmp ? type == 8 : type == 128;
}

bool is_echo_reply(const Flow& flow)
{
    std::uint8_t type = static_cast<std::uint8_t>(flow.port >> 8);
    return flow.proto == kIcmp ? type == 0 : type == 129;
}

Verdict tracked_verdict(std::optional<std::string> rule)
{
    return Verdict{VerdictKind::allow, Reason::tracked, std::move(rule), 0, 0};
}

}  // namespace

ReferenceTracker::ReferenceTracker(std::vector<Prefix> host_addrs)
    : host_addrs_(std::move(host_addrs))
{
}

void ReferenceTracker::commit(const Policy& policy)
{
    policy_ = policy;
    generation_++;
}

void ReferenceTracker::forget()
{
    flows_.clear();
    trains_.clear();
}

bool ReferenceTracker::trackable(const TrackedPacket& packet)
{
    const Flow& flow = packet.flow;
    if (!flow.has_port || flow.neighbour_discovery)
        return false;
    if (is_icmp(flow.proto))
        return is_echo_request(flow) || is_echo_reply(flow);
    return true;
}

// The tuple of the packet's own direction, or reversed. ICMP echo has the id
// in both ports, so a request and its reply have mirror tuples.
ReferenceTracker::Tuple ReferenceTracker::tuple_of(const TrackedPacket& packet, bool reverse)
{
    const Flow& flow = packet.flow;
    Tuple t{reverse ? flow.dst : flow.src, reverse ? flow.src : flow.dst, flow.proto, 0, 0};
    if (is_icmp(flow.proto)) {
        t.sport = packet.sport;
        t.dport = packet.sport;
    } else {
        t.sport = reverse ? flow.port : packet.sport;
        t.dport = reverse ? packet.sport : flow.port;
    }
    return t;
}

// Finds the packet's tracked flow (as its opening direction at the same kind
// of point, else as its reply at any point) and re-checks it when it was
// allowed by an older generation. With `update`, a flow that passes the
// re-check is marked current and a revoked one forgotten.
ReferenceTracker::Lookup ReferenceTracker::lookup_flow(const TrackedPacket& packet,
                                                       Direction direction, bool update,
                                                       std::optional<std::string>* rule)
{
    // the opening direction at this kind of point, then a reply to a flow of
    // the other kind, then of this kind (the datapath's order)
    const Direction other =
        direction == Direction::ingress ? Direction::egress : Direction::ingress;
    const std::pair<bool, Direction> tries[] = {
        {false, direction}, {true, other}, {true, direction}};
    for (const auto& [reply, opened_at] : tries) {
        auto it = flows_.find({tuple_of(packet, reply), opened_at});
        if (it == flows_.end())
            continue;

        TrackedFlow& tracked = it->second;
        if (tracked.generation != generation_) {
            // judge the flow again as it opened: its opening direction, at its opening point
            Flow opening = packet.flow;
            if (reply) {
                opening.src = packet.flow.dst;
                opening.dst = packet.flow.src;
                opening.port = packet.sport;
            }
            // an echo flow opened with a request, whichever packet asks now
            if (is_icmp(opening.proto))
                opening.port = opening.proto == kIcmp ? 8 << 8 : 128 << 8;
            if (!reference_verdict(*policy_, opening, tracked.direction, host_addrs_).passes()) {
                if (update)
                    flows_.erase(it);
                return Lookup::revoked;
            }
            if (update)
                tracked.generation = generation_;
        }
        if (rule != nullptr)
            *rule = tracked.rule;
        return Lookup::pass;
    }
    return Lookup::none;
}

// Steps 2 to 4 of judge(). With `update`, the state changes as the packet
// says (flows re-checked, revoked, opened); without, nothing changes.
TrackedVerdict ReferenceTracker::decide(const TrackedPacket& packet, Direction direction,
                                        bool update)
{
    TrackedVerdict out;
    const Flow& flow = packet.flow;

    // 2. an error about a tracked flow
    if (packet.quoted) {
        const TrackedPacket::Quote& q = *packet.quoted;
        const Tuple as_sent{q.src, q.dst, q.proto, q.sport, q.dport};
        const Tuple reversed{q.dst, q.src, q.proto, q.dport, q.sport};
        bool related = false;
        for (Direction at : {Direction::ingress, Direction::egress})
            related = related || flows_.count({as_sent, at}) || flows_.count({reversed, at});
        if (related) {
            out.verdict = tracked_verdict(std::nullopt);
            return out;
        }
    }

    // 3. a packet of a tracked flow
    bool can_track = trackable(packet);
    if (can_track) {
        std::optional<std::string> rule;
        Lookup found = lookup_flow(packet, direction, update, &rule);
        if (found == Lookup::pass) {
            out.verdict = tracked_verdict(std::move(rule));
            return out;
        }
        out.revoked = found == Lookup::revoked;
        bool opening_syn = (packet.tcp_flags & (kTcpSyn | kTcpAck)) == kTcpSyn;
        out.ct_miss = found == Lookup::none && flow.proto == kTcp && !opening_syn;
    }

    // 4. policy; a flow that passes is tracked from now on
    out.verdict = reference_verdict(*policy_, flow, direction, host_addrs_);
    bool opens = can_track && !(is_icmp(flow.proto) && is_echo_reply(flow));
    if (update && opens && out.verdict.passes())
        flows_[{tuple_of(packet, false), direction}] =
            TrackedFlow{generation_, direction, out.verdict.rule};
    return out;
}

TrackedVerdict ReferenceTracker::judge(const TrackedPacket& packet, Direction direction)
{
    if (!policy_) {
        TrackedVerdict out;
        out.verdict = Verdict{VerdictKind::allow, Reason::not_policed, std::nullopt, 0, 0};
        return out;
    }
    const Flow& flow = packet.flow;

    // 1. a later fragment follows its first fragment, if that would still pass
    if (!flow.has_port) {
        auto it = trains_.find(TrainKey{flow.src, flow.dst, flow.proto, packet.frag_id});
        if (it != trains_.end()) {
            Train& train = it->second;
            if (train.generation == generation_ ||
                decide(train.first, train.direction, false).verdict.passes()) {
                train.generation = generation_;
                TrackedVerdict out;
                out.verdict = tracked_verdict(std::nullopt);
                return out;
            }
        }
    }

    // a first fragment that passes, for whatever reason, starts a train
    TrackedVerdict out = decide(packet, direction, true);
    if (packet.first_fragment && out.verdict.passes())
        trains_[TrainKey{flow.src, flow.dst, flow.proto, packet.frag_id}] =
            Train{generation_, direction, packet};
    return out;
}

}  // namespace bulkhead
