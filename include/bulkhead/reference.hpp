// The reference evaluator: DESIGN.md's verdict semantics written straight
// from the text, in plain C++, with no tables. It is the oracle against which
// the compiler and the BPF programs are tested; it is also readable
// documentation of what a policy means.
#pragma once

#include <bulkhead/policy.hpp>
#include <bulkhead/types.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace bulkhead {

// Which end enforces: at an ingress point (XDP, cgroup ingress) the
// destination's ingress mode applies, at an egress point the source's egress
// mode.
enum class Direction : std::uint8_t { ingress, egress };

// The workload identity an address belongs to: the identity with the longest
// prefix containing it, `host` for `host_addrs` not covered by a longer or
// equal policy prefix, else `world`. Returns the index into
// policy.identities, or -1 for world and -2 for host.
int reference_identity_of(const Policy& policy, const IpAddr& addr,
                          const std::vector<Prefix>& host_addrs = {});

// The verdict for one flow, stateless (no connection tracking):
//   0. at an ingress point, a failsafe port of identity `host` (destination
//      in `host_addrs`) from a management prefix passes (Reason::failsafe),
//      whatever the rules say; a failsafe spec `any` means every TCP, UDP
//      and SCTP port, and a flow without a port never matches;
//   1. a matching deny rule denies (the first in file order is reported);
//   2. else a matching allow rule allows (the first in file order);
//   3. else the enforcing identity's mode decides.
// Audit mode of the enforcing identity turns a deny of either kind into
// VerdictKind::audit. A flow without a port (non-first fragment) matches only
// port specs that cover every port of its protocol. Neighbour discovery
// passes as not_policed unless a deny rule matches it.
// Verdict::src_identity/dst_identity are left 0: the reference evaluator has
// no datapath numbering.
Verdict reference_verdict(const Policy& policy, const Flow& flow,
                          Direction direction = Direction::ingress,
                          const std::vector<Prefix>& host_addrs = {});

// One packet as connection tracking sees it: the flow that policy judges,
// and the fields that tie packets of one flow together.
struct TrackedPacket {
    // flow.has_port false: a later fragment (offset > 0), which has no
    // transport header; flow.port is then 0.
    Flow flow;
    // TCP, UDP and SCTP: the source port. ICMP and ICMPv6 echo request and
    // reply: the echo id (flows are keyed on it; type and code are for
    // policy only).
    std::uint16_t sport = 0;
    std::uint8_t tcp_flags = 0;  // TCP only: FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10
    // The first fragment of several (offset 0, more fragments set). An
    // atomic fragment (offset 0, none following) is a whole packet.
    bool first_fragment = false;
    // Fragments: the IPv4 id, or the IPv6 fragment header's id.
    std::uint32_t frag_id = 0;

    // An ICMP or ICMPv6 error (destination unreachable, packet too big, time
    // exceeded, parameter problem): the packet it quotes, as that packet was
    // sent. Echo quotes carry the echo id in both ports.
    struct Quote {
        IpAddr src;
        IpAddr dst;
        std::uint8_t proto = 0;
        std::uint16_t sport = 0;
        std::uint16_t dport = 0;
    };
    std::optional<Quote> quoted;
};

// What the tracker says about one packet.
struct TrackedVerdict {
    // Reason::tracked for a packet of a tracked flow (either direction), a
    // later fragment of a first fragment that passed, and an error quoting a
    // tracked flow; `rule` then names the rule that let the flow in, if any.
    Verdict verdict;
    // A TCP packet other than a connection's first SYN (SYN without ACK)
    // found no tracked flow: counted besides the verdict.
    bool ct_miss = false;
    // The packet's flow was tracked, but the policy in force no longer allows
    // it: the flow is forgotten and the packet judged by policy.
    bool revoked = false;
};

// Connection tracking, written straight from DESIGN.md and issue 3, as the
// oracle for the stateful datapath. No clocks: entries never expire, so
// tests must not outlive the datapath's shortest lifetime (10 s after a
// FIN or RST).
//
// For each packet, in this order:
//   1. a later fragment passes (tracked) if the first fragment of the same
//      (source, destination, protocol, id) passed, and, after a commit, a
//      first fragment like it would still pass; otherwise it meets policy
//      without a port (only rules for every port of its protocol apply);
//   2. an ICMP error passes (tracked) if the packet it quotes belongs to a
//      tracked flow, in either direction;
//   3. a packet of TCP, UDP, SCTP (any port-bearing protocol) or an ICMP echo
//      request or reply belongs to a tracked flow if its tuple is the flow's
//      opening tuple, judged at the same kind of point (ingress or egress)
//      the flow opened at, or the opening tuple reversed (a reply, at any
//      point). A flow opened under an older policy is judged again, in its
//      opening direction and at its opening point, by the policy in force
//      (a reply's opening flow has the reply's source port as destination
//      port; an echo reply's opening flow is an echo request, code 0): if
//      that no longer passes, the flow is forgotten (revoked) and the
//      packet meets policy; else the packet passes (tracked);
//   4. otherwise the stateless verdict (reference_verdict). A packet that
//      passes opens a flow keyed by its own tuple (an echo reply opens none,
//      nor does any other ICMP message but an echo request).
// A first fragment that passes, by any of 2 to 4, starts a fragment train.
// A commit whose policy equals the one in force changes nothing for the
// datapath (no new generation); commit() may be called for it all the same:
// every re-check then passes as before.
class ReferenceTracker {
public:
    explicit ReferenceTracker(std::vector<Prefix> host_addrs = {});

    // Puts `policy` in force as a new generation. Tracked flows and fragment
    // trains stay; each is re-checked at its next packet.
    void commit(const Policy& policy);

    // Judges one packet at a point of `direction` and updates the state.
    // Before the first commit() every packet passes as not policed.
    TrackedVerdict judge(const TrackedPacket& packet, Direction direction = Direction::ingress);

    // Forgets every flow and fragment train (the policy stays).
    void forget();

    std::size_t flows() const noexcept { return flows_.size(); }
    std::size_t fragment_trains() const noexcept { return trains_.size(); }

private:
    struct Tuple {
        IpAddr src;
        IpAddr dst;
        std::uint8_t proto = 0;
        std::uint16_t sport = 0;
        std::uint16_t dport = 0;
        auto operator<=>(const Tuple&) const = default;
    };
    struct TrackedFlow {
        std::uint64_t generation = 0;
        Direction direction = Direction::ingress;
        std::optional<std::string> rule;
    };
    struct TrainKey {
        IpAddr src;
        IpAddr dst;
        std::uint8_t proto = 0;
        std::uint32_t id = 0;
        auto operator<=>(const TrainKey&) const = default;
    };
    struct Train {
        std::uint64_t generation = 0;
        Direction direction = Direction::ingress;
        TrackedPacket first;
    };
    enum class Lookup { none, pass, revoked };

    static bool trackable(const TrackedPacket& packet);
    static Tuple tuple_of(const TrackedPacket& packet, bool reverse);
    Lookup lookup_flow(const TrackedPacket& packet, Direction direction, bool update,
                       std::optional<std::string>* rule);
    TrackedVerdict decide(const TrackedPacket& packet, Direction direction, bool update);

    std::vector<Prefix> host_addrs_;
    std::optional<Policy> policy_;
    std::uint64_t generation_ = 0;
    // by opening tuple and the kind of point that opened the flow: each kind
    // tracks its own flows, and a reply matches a flow of either kind
    std::map<std::pair<Tuple, Direction>, TrackedFlow> flows_;
    std::map<TrainKey, Train> trains_;
};

}  // namespace bulkhead
