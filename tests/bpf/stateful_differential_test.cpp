// Stateful differential test: random policies and random sequences of
// packets (flows opened, continued and answered, echo requests and replies,
// fragmented datagrams, ICMP errors quoting known and unknown flows, policy
// flips and unchanged re-applies). For every packet, the XDP program's action
// and counters must equal the ReferenceTracker's verdict.
//
// The seed comes from BULKHEAD_SEED (or a fixed one under CI=true, else the
// clock; see testing::test_seed) and is printed; sequence
// #i is generated from (seed, i) alone. BULKHEAD_STATEFUL_SEQUENCES and
// BULKHEAD_STATEFUL_EVENTS scale the run. Mismatches are grouped by kind
// (packet kind, expected and observed outcome) and the first ones of each
// kind are shown with the sequence that led to them.
//
// TCP replies are sent as plain ACKs: a SYN-ACK without its SYN is covered by
// StatefulTest.ASynAckWithoutItsSynIsATrackingMiss.
#include "support/bpf_env.hpp"
#include "support/packet.hpp"
#include "support/random_policy.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>
#include <bulkhead/reference.hpp>

#include <bpf/bpf.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

using bulkhead::testing::random_flow;
using bulkhead::testing::random_policy;

// Reason counter names by enum bh_reason, as stats() names them.
constexpr std::array<const char*, 14> kReasonNames = {
    "allow-rule",   "deny-rule",     "audit-rule", "allow-default", "deny-default",
    "audit-default", "not-ip",       "neighbour-discovery",         "malformed",
    "no-policy",    "tracked",       "failsafe",   "ct-miss",       "revoked",
};
static_assert(BH_REASON_TRACKED == 10 && BH_REASON_CT_MISS == 12 && BH_REASON_REVOKED == 13);
constexpr std::uint32_t kRuleIdsRead = 64;  // rule counters read per packet

const std::vector<std::string> kHostAddresses = {"198.51.100.250/32", "2001:db8::fe/128"};

class Rng {
public:
    explicit Rng(std::uint64_t seed) : gen(seed) {}

    int between(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }
    bool chance(double p) { return std::bernoulli_distribution(p)(gen); }

    template <typename T>
    const T& pick(const std::vector<T>& items)
    {
        return items[static_cast<std::size_t>(between(0, static_cast<int>(items.size()) - 1))];
    }

    std::mt19937_64 gen;
};

// ---------------------------------------------------------------------------
// Packets: the frame for XDP and the same packet for the tracker
// ---------------------------------------------------------------------------

struct Sent {
    std::string kind;  // what the generator meant, for grouping mismatches
    Packet packet;
    TrackedPacket tracked;
};

bool is_icmp(std::uint8_t proto)
{
    return proto == kProtoIcmp || proto == kProtoIcmpv6;
}

// One conversation: a opened towards b. For ICMP, port is the opener's type
// << 8 | code and id the echo id.
struct Conversation {
    IpAddr a;
    IpAddr b;
    std::uint8_t proto = kProtoTcp;
    std::uint16_t a_port = 0;  // source port, or echo id
    std::uint16_t b_port = 0;  // destination port, or ICMP type << 8 | code
    std::uint16_t seq = 1;
};

struct Fragmenting {
    std::uint32_t id = 0;
    std::size_t first_payload = 0;  // bytes after the first fragment's transport header
};

// Lays out a packet from src to dst. `port` is the destination port or the
// ICMP type << 8 | code, `sport` the source port or echo id. With `fragment`,
// the first fragment of a datagram of that id.
Sent build(const std::string& kind, const IpAddr& src, const IpAddr& dst, std::uint8_t proto,
           std::uint16_t sport, std::uint16_t port, std::uint8_t tcp_flags,
           std::optional<Fragmenting> fragment = std::nullopt, std::uint16_t seq = 1)
{
    Sent s{kind, Packet(), TrackedPacket{}};
    Flow& f = s.tracked.flow;
    f.src = src;
    f.dst = dst;
    f.proto = proto;
    f.port = port;
    s.tracked.sport = sport;
    s.tracked.tcp_flags = proto == kProtoTcp ? tcp_flags : 0;

    bool v4 = src.is_v4();
    std::uint32_t id = fragment ? fragment->id : 0x100;
    if (v4) {
        s.packet.ipv4({.src = src.str(),
                       .dst = dst.str(),
                       .more_fragments = fragment.has_value(),
                       .id = static_cast<std::uint16_t>(id)});
    } else {
        s.packet.ipv6({.src = src.str(), .dst = dst.str()});
        if (fragment)
            s.packet.ext(Ipv6Ext::fragment(0, true, id));
    }
    if (fragment) {
        s.tracked.first_fragment = true;
        s.tracked.frag_id = v4 ? (id & 0xffff) : id;
    }

    auto type = static_cast<std::uint8_t>(port >> 8);
    auto code = static_cast<std::uint8_t>(port & 0xff);
    bool echo = is_icmp(proto) && (type == 0 || type == 8 || type == 128 || type == 129);
    switch (proto) {
    case kProtoTcp:
        s.packet.tcp({.sport = sport, .dport = port, .flags = tcp_flags});
        break;
    case kProtoUdp:
        s.packet.udp({.sport = sport, .dport = port});
        break;
    case kProtoSctp:
        s.packet.sctp({.sport = sport, .dport = port});
        break;
    case kProtoIcmp:
        s.packet.icmp({.type = type, .code = code, .id = echo ? sport : std::uint16_t{0},
                       .seq = seq});
        break;
    case kProtoIcmpv6:
        s.packet.icmpv6({.type = type, .code = code, .id = echo ? sport : std::uint16_t{0},
                         .seq = seq});
        break;
    default:
        s.packet.raw_l4(proto);
        s.tracked.sport = 0;
        f.port = 0;
        break;
    }
    if (is_icmp(proto) && !echo)
        s.tracked.sport = 0;  // ids only tie echo messages together
    // a non-echo ICMP message: zeros after its header, so nothing reads as a quote
    s.packet.payload(fragment ? fragment->first_payload : 24, 0);
    return s;
}

// A later fragment (offset in 8-byte units) of the datagram `id`.
Sent later_fragment(const std::string& kind, const IpAddr& src, const IpAddr& dst,
                    std::uint8_t proto, std::uint32_t id, std::uint16_t offset, bool more,
                    std::size_t size, std::uint8_t fill)
{
    Sent s{kind, Packet(), TrackedPacket{}};
    Flow& f = s.tracked.flow;
    f.src = src;
    f.dst = dst;
    f.proto = proto;
    f.port = 0;
    f.has_port = false;
    if (src.is_v4()) {
        s.packet.ipv4({.src = src.str(),
                       .dst = dst.str(),
                       .frag_offset = offset,
                       .more_fragments = more,
                       .id = static_cast<std::uint16_t>(id)});
        s.tracked.frag_id = id & 0xffff;
    } else {
        s.packet.ipv6({.src = src.str(), .dst = dst.str()}).ext(Ipv6Ext::fragment(offset, more, id));
        s.tracked.frag_id = id;
    }
    s.packet.raw_l4(proto).payload(size, fill);
    return s;
}

// An ICMP error from `from` to `to` quoting `quoted` (its IP header and the
// first 8 bytes of its transport header): fragmentation needed (IPv4) or
// packet too big (IPv6).
Sent icmp_error(const std::string& kind, const IpAddr& from, const IpAddr& to, const Sent& quoted)
{
    bool v4 = from.is_v4();
    std::uint8_t proto = v4 ? kProtoIcmp : kProtoIcmpv6;
    std::uint16_t port = v4 ? 0x0304 : 0x0200;
    Sent s{kind, Packet(), TrackedPacket{}};
    s.tracked.flow.src = from;
    s.tracked.flow.dst = to;
    s.tracked.flow.proto = proto;
    s.tracked.flow.port = port;

    Bytes frame = quoted.packet.bytes();
    Layout at = quoted.packet.layout();
    Bytes quote(frame.begin() + static_cast<std::ptrdiff_t>(at.l3),
                frame.begin() + static_cast<std::ptrdiff_t>(std::min(frame.size(), at.l4 + 8)));
    if (v4) {
        s.packet.ipv4({.src = from.str(), .dst = to.str()})
            .icmp({.type = 3, .code = 4, .id = 0, .seq = 1400});
    } else {
        s.packet.ipv6({.src = from.str(), .dst = to.str()})
            .icmpv6({.type = 2, .code = 0, .id = 0, .seq = 1280});
    }
    s.packet.payload(std::move(quote));

    const TrackedPacket& q = quoted.tracked;
    TrackedPacket::Quote tuple{q.flow.src, q.flow.dst, q.flow.proto, q.sport, q.flow.port};
    if (is_icmp(q.flow.proto))
        tuple.dport = q.sport;  // echo: the id both ways
    s.tracked.quoted = tuple;
    return s;
}

// ---------------------------------------------------------------------------
// Sequences
// ---------------------------------------------------------------------------

// A policy for the sequence: random_policy's, with failsafe ports to host
// from a random management prefix now and then.
Policy sequence_policy(Rng& rng)
{
    Policy p = random_policy(rng.gen);
    if (rng.chance(0.3)) {
        p.failsafe.enabled = rng.chance(0.8);
        p.failsafe.ports = {*PortSpec::parse("tcp/22"), *PortSpec::parse("udp/53")};
        static const std::vector<std::string> prefixes = {
            "198.51.100.0/28", "203.0.113.0/24", "0.0.0.0/0", "::/0", "2001:db8::/120",
            "2001:db8::/32"};
        p.failsafe.from = {*Prefix::parse(rng.pick(prefixes))};
        if (rng.chance(0.3))
            p.failsafe.from.push_back(*Prefix::parse(rng.pick(prefixes)));
    }
    return p;
}

IpAddr host_address(bool v4)
{
    return Prefix::parse(kHostAddresses[v4 ? 0 : 1])->addr;
}

// What happens next in a sequence.
enum class Event {
    open,          // a new flow's first packet
    forward,       // the next packet of a known flow, its opener's direction
    reply,         // a packet of a known flow the other way
    fragmented,    // a datagram in two or three fragments, in a known flow or a new one
    lone_fragment, // a later fragment no first fragment announced
    error,         // an ICMP error quoting a known flow or an unknown one
    flip,          // commit the other policy of the sequence
    reapply,       // commit the policy in force again, unchanged
};

Event next_event(Rng& rng, bool have_flows)
{
    int r = rng.between(0, 99);
    if (!have_flows || r < 22)
        return Event::open;
    if (r < 40)
        return Event::forward;
    if (r < 62)
        return Event::reply;
    if (r < 74)
        return Event::fragmented;
    if (r < 78)
        return Event::lone_fragment;
    if (r < 90)
        return Event::error;
    if (r < 96)
        return Event::flip;
    return Event::reapply;
}

class Generator {
public:
    Generator(Rng& rng, const Policy& policy, std::uint32_t seq_number)
        : rng_(rng), policy_(policy), next_id_(seq_number * 0x1000u + 1)
    {
    }

    // The packets of one event (queued fragments may come out later).
    std::vector<Sent> event(Event e)
    {
        std::vector<Sent> out;
        switch (e) {
        case Event::open:
            out.push_back(open());
            break;
        case Event::forward:
            out.push_back(continue_flow(any_flow(), false));
            break;
        case Event::reply:
            out.push_back(continue_flow(any_flow(), true));
            break;
        case Event::fragmented:
            fragmented(out);
            break;
        case Event::lone_fragment: {
            Flow f = flow();
            out.push_back(later_fragment("lone fragment", f.src, f.dst, f.proto, fresh_id(),
                                         static_cast<std::uint16_t>(rng_.between(1, 400)), false,
                                         static_cast<std::size_t>(rng_.between(1, 40)), 0x01));
            break;
        }
        case Event::error:
            out.push_back(error());
            break;
        case Event::flip:
        case Event::reapply:
            break;
        }
        // a queued later fragment comes out after a few other packets
        if (!queued_.empty() && rng_.chance(0.5)) {
            out.push_back(queued_.front());
            queued_.pop_front();
        }
        return out;
    }

    std::vector<Sent> drain()
    {
        std::vector<Sent> out(queued_.begin(), queued_.end());
        queued_.clear();
        return out;
    }

private:
    std::uint32_t fresh_id() { return next_id_++; }

    Conversation& any_flow()
    {
        return flows_[static_cast<std::size_t>(rng_.between(0, static_cast<int>(flows_.size()) - 1))];
    }

    // random_flow(), with both ends of one family
    Flow flow()
    {
        for (;;) {
            Flow f = random_flow(rng_.gen, policy_);
            if (f.src.is_v4() == f.dst.is_v4())
                return f;
        }
    }
    std::uint16_t fresh_port() { return static_cast<std::uint16_t>(20000 + next_id_++ % 40000); }

    // A new flow from random_flow(): TCP SYN, UDP, SCTP, echo request (code
    // 0), another ICMP message, or a protocol without ports.
    Sent open()
    {
        Flow f = flow();
        if (rng_.chance(0.1)) {
            // towards host, where failsafe ports may open
            f.dst = host_address(f.src.is_v4());
            f.proto = rng_.chance(0.5) ? kProtoTcp : kProtoUdp;
            f.port = rng_.chance(0.7) ? (f.proto == kProtoTcp ? 22 : 53) : 80;
        }
        Conversation c{f.src, f.dst, f.proto, fresh_port(), f.port, 1};
        if (is_icmp(f.proto)) {
            bool v4 = f.src.is_v4();
            c.proto = v4 ? kProtoIcmp : kProtoIcmpv6;
            if (rng_.chance(0.7))
                c.b_port = v4 ? 0x0800 : 0x8000;  // echo request, code 0
            else if ((c.b_port >> 8) == 0 || (c.b_port >> 8) == 8 || (c.b_port >> 8) == 128 ||
                     (c.b_port >> 8) == 129 || (c.b_port >> 8) == 3)
                c.b_port = v4 ? 0x0d00 : 0x8200;  // timestamp / MLD query: other messages
        }
        std::uint8_t flags = kTcpSyn;
        flows_.push_back(c);
        return build("open", c.a, c.b, c.proto, c.a_port, c.b_port, flags);
    }

    Sent continue_flow(Conversation& c, bool reply)
    {
        c.seq++;
        std::uint8_t flags = rng_.chance(0.5) ? kTcpAck : (kTcpAck | 0x08);  // ACK, PSH-ACK
        if (is_icmp(c.proto)) {
            bool echo = (c.b_port >> 8) == 8 || (c.b_port >> 8) == 128;
            std::uint16_t type = !echo ? c.b_port : reply ? (c.proto == kProtoIcmp ? 0 : 0x8100)
                                                          : c.b_port;
            std::string kind = !echo ? "icmp" : reply ? "echo reply" : "echo request";
            return reply ? build(kind, c.b, c.a, c.proto, c.a_port, type, 0, {}, c.seq)
                         : build(kind, c.a, c.b, c.proto, c.a_port, type, 0, {}, c.seq);
        }
        if (reply)
            return build("reply", c.b, c.a, c.proto, c.b_port, c.a_port, flags);
        return build("forward", c.a, c.b, c.proto, c.a_port, c.b_port, flags);
    }

    // A datagram in a known flow (either way) or a new one: its first
    // fragment now, one or two later fragments queued.
    void fragmented(std::vector<Sent>& out)
    {
        Conversation c = flows_.empty() || rng_.chance(0.3) ? Conversation{} : rng_.pick(flows_);
        bool fresh = flows_.empty() || c.a == IpAddr{};
        if (fresh) {
            Flow f = flow();
            c = Conversation{f.src, f.dst, kProtoUdp, fresh_port(), f.port, 1};
            if (f.proto == kProtoTcp || f.proto == kProtoSctp)
                c.proto = f.proto;
        }
        if (c.proto != kProtoTcp && c.proto != kProtoUdp && c.proto != kProtoSctp &&
            !is_icmp(c.proto))
            c.proto = kProtoUdp;
        bool reply = !fresh && rng_.chance(0.5);
        IpAddr src = reply ? c.b : c.a;
        IpAddr dst = reply ? c.a : c.b;
        std::uint16_t sport = reply ? c.b_port : c.a_port;
        std::uint16_t port = reply ? c.a_port : c.b_port;
        if (is_icmp(c.proto)) {
            bool echo = (c.b_port >> 8) == 8 || (c.b_port >> 8) == 128;
            sport = c.a_port;
            port = !echo ? c.b_port : reply ? (c.proto == kProtoIcmp ? 0 : 0x8100) : c.b_port;
        }
        std::uint32_t id = fresh_id();
        std::uint8_t flags = fresh ? kTcpSyn : kTcpAck;
        out.push_back(build(reply ? "first fragment of a reply" : "first fragment", src, dst,
                            c.proto, sport, port, flags, Fragmenting{id, 1000}));
        // 1000 bytes after a header of 8 to 20: later fragments start at 126 or later
        int laters = rng_.between(1, 2);
        for (int i = 0; i < laters; i++) {
            queued_.push_back(later_fragment(
                reply ? "later fragment of a reply" : "later fragment", src, dst, c.proto, id,
                static_cast<std::uint16_t>(126 + 120 * i), i + 1 < laters,
                static_cast<std::size_t>(rng_.between(1, 960)), static_cast<std::uint8_t>(i)));
        }
    }

    // An error about a known flow (either way) or an unknown one, from an
    // address of the policy's pool (often a router no rule names).
    Sent error()
    {
        Conversation c = rng_.pick(flows_);
        bool unknown = rng_.chance(0.3);
        std::uint16_t a_port = unknown ? fresh_port() : c.a_port;
        Sent quoted = rng_.chance(0.5) || is_icmp(c.proto)
                          ? build("quoted", c.a, c.b, c.proto, a_port, c.b_port, kTcpAck)
                          : build("quoted", c.b, c.a, c.proto, c.b_port, a_port, kTcpAck);
        if (is_icmp(c.proto) && (c.b_port >> 8) != 8 && (c.b_port >> 8) != 128)
            quoted = build("quoted", c.a, c.b, kProtoUdp, a_port, 53, 0);
        Flow router = flow();
        IpAddr from = router.src.is_v4() == c.a.is_v4() ? router.src : router.dst;
        if (from.is_v4() != c.a.is_v4())
            from = c.a.is_v4() ? *IpAddr::parse("203.0.113.254") : *IpAddr::parse("2001:db8:ff::1");
        const IpAddr& to = quoted.tracked.flow.src;  // errors go back to the sender
        return icmp_error(unknown ? "error about an unknown flow" : "error about a known flow",
                          from, to, quoted);
    }

    Rng& rng_;
    const Policy& policy_;
    std::uint32_t next_id_;
    std::vector<Conversation> flows_;
    std::deque<Sent> queued_;
};

// ---------------------------------------------------------------------------
// Running and comparing
// ---------------------------------------------------------------------------

struct Observed {
    bool pass = false;
    std::string reason;  // the verdict reasons that moved
    bool ct_miss = false;
    bool revoked = false;
    std::map<std::uint32_t, std::uint64_t> rules;  // rule id -> packets
};


std::string outcome_text(bool pass, const std::string& reason, bool miss, bool revoked)
{
    return fmt::format("{} {}{}{}", pass ? "pass" : "drop", reason, miss ? " +ct-miss" : "",
                       revoked ? " +revoked" : "");
}

class Counters {
public:
    explicit Counters(const Dataplane& dp)
        : reasons_(dp.map_fd("bh_reason_cnt")), rules_(dp.map_fd("bh_rule_cnt"))
    {
        snapshot(reasons_now_, rules_now_);
    }

    // A commit may reset the counters of rules it adds or removes: start over.
    void rebase() { snapshot(reasons_now_, rules_now_); }

    void moved(Observed& out)
    {
        std::vector<std::uint64_t> reasons;
        std::vector<std::uint64_t> rules;
        snapshot(reasons, rules);
        for (std::size_t i = 0; i < reasons.size(); i++) {
            std::uint64_t delta = reasons[i] - reasons_now_[i];
            if (delta == 0)
                continue;
            if (i == BH_REASON_CT_MISS) {
                out.ct_miss = true;
            } else if (i == BH_REASON_REVOKED) {
                out.revoked = true;
            } else {
                out.reason += fmt::format("{}{}{}", out.reason.empty() ? "" : ",", kReasonNames[i],
                                          delta == 1 ? "" : fmt::format("+{}", delta));
            }
        }
        for (std::uint32_t id = 0; id < rules.size(); id++) {
            if (rules[id] != rules_now_[id])
                out.rules[id] = rules[id] - rules_now_[id];
        }
        reasons_now_ = std::move(reasons);
        rules_now_ = std::move(rules);
    }

private:
    void snapshot(std::vector<std::uint64_t>& reasons, std::vector<std::uint64_t>& rules) const
    {
        reasons.resize(kReasonNames.size());
        for (std::uint32_t i = 0; i < kReasonNames.size(); i++)
            reasons[i] = reasons_.sum(i).packets;
        rules.resize(kRuleIdsRead);
        for (std::uint32_t i = 0; i < kRuleIdsRead; i++)
            rules[i] = rules_.sum(i).packets;
    }

    PerCpuCounters reasons_;
    PerCpuCounters rules_;
    std::vector<std::uint64_t> reasons_now_;
    std::vector<std::uint64_t> rules_now_;
};

void clear_map(int fd, std::size_t key_size)
{
    std::vector<std::uint8_t> key(key_size);
    while (bpf_map_get_next_key(fd, nullptr, key.data()) == 0) {
        if (bpf_map_delete_elem(fd, key.data()) != 0)
            throw_errno("clear a tracking map");
    }
}

std::string flow_text(const TrackedPacket& p)
{
    const Flow& f = p.flow;
    std::string text = fmt::format("{} -> {} proto {} sport/id {} port {:#06x}", f.src.str(),
                                   f.dst.str(), f.proto, p.sport, f.port);
    if (!f.has_port)
        text += fmt::format(" (later fragment, id {:#x})", p.frag_id);
    if (p.first_fragment)
        text += fmt::format(" (first fragment, id {:#x})", p.frag_id);
    if (p.quoted)
        text += fmt::format(" quoting {} -> {} proto {} {} > {}", p.quoted->src.str(),
                            p.quoted->dst.str(), p.quoted->proto, p.quoted->sport,
                            p.quoted->dport);
    return text;
}

std::string policy_text(const Policy& p)
{
    std::string out = fmt::format("defaults ingress {} egress {}; failsafe {}", to_string(p.default_ingress),
                                  to_string(p.default_egress), p.failsafe.enabled ? "on" : "off");
    for (const PortSpec& s : p.failsafe.ports)
        out += " " + s.str();
    for (const Prefix& f : p.failsafe.from)
        out += " from " + f.str();
    out += "\n";
    for (const Identity& i : p.identities) {
        out += fmt::format("  identity {} {} ingress {} egress {}:", i.name, format_labels(i.labels),
                           to_string(i.ingress), to_string(i.egress));
        for (const Prefix& c : i.cidrs)
            out += " " + c.str();
        out += "\n";
    }
    for (const Rule& r : p.rules) {
        out += fmt::format("  rule {} {}:", r.name, to_string(r.action));
        for (const PortSpec& s : r.ports)
            out += " " + s.str();
        out += fmt::format(" ({} from-terms, {} to-terms)\n", r.from.terms.size(), r.to.terms.size());
    }
    return out;
}

class StatefulDifferentialTest : public DataplaneTest {
protected:
    void SetUp() override
    {
        DataplaneTest::SetUp();
        if (IsSkipped())
            return;
        for (const std::string& h : kHostAddresses)
            hosts_.push_back(*Prefix::parse(h));
        options_.host_addresses = hosts_;
        prog_fd_ = dp().program_fd("bh_xdp");
    }

    std::vector<Prefix> hosts_;
    int prog_fd_ = -1;
};

TEST_F(StatefulDifferentialTest, XdpEqualsTheReferenceTracker)
{
    const std::uint64_t seed = testing::test_seed();
    const std::uint64_t sequences = env_number("BULKHEAD_STATEFUL_SEQUENCES", 60);
    const std::uint64_t events = env_number("BULKHEAD_STATEFUL_EVENTS", 150);
    const std::size_t shown_per_kind = 3;
    SCOPED_TRACE(fmt::format("BULKHEAD_SEED={}", seed));
    fmt::print("stateful differential: BULKHEAD_SEED={} ({} sequences of {} events)\n", seed,
               sequences, events);

    std::map<std::string, std::uint64_t> mismatches;  // kind -> count
    std::map<std::string, std::uint64_t> seen;        // expected reason -> packets
    std::uint64_t checked = 0;
    auto started = std::chrono::steady_clock::now();

    for (std::uint64_t i = 0; i < sequences; i++) {
        Rng rng(seed * 0x9e3779b97f4a7c15ull + i);
        std::array<Policy, 2> policies = {sequence_policy(rng), sequence_policy(rng)};
        int in_force = 0;
        std::vector<std::string> history;  // what led to a mismatch

        clear_map(dp_->map_fd("bh_ct"), sizeof(bh_ct_key));
        clear_map(dp_->map_fd("bh_frag"), sizeof(bh_frag_key));
        ReferenceTracker tracker(hosts_);
        dp_->apply(policies[0], "<random>");
        tracker.commit(policies[0]);
        history.push_back("commit policy A");

        Generator gen(rng, policies[0], static_cast<std::uint32_t>(i));
        Counters counters(*dp_);
        std::map<std::uint32_t, std::string> id_names;  // rule id -> name, bound on first hit

        auto check = [&](const Sent& s) {
            TrackedVerdict want = tracker.judge(s.tracked, Direction::ingress);
            XdpRun run = run_xdp(prog_fd_, s.packet.bytes());
            Observed got;
            got.pass = run.retval == kXdpPass;
            counters.moved(got);
            checked++;

            std::string want_reason = reason_counter(want.verdict);
            seen[want_reason]++;
            std::string rule_problem;
            if (want.verdict.reason == Reason::rule) {
                if (got.rules.size() != 1 || got.rules.begin()->second != 1) {
                    rule_problem = fmt::format("{} rule counters moved", got.rules.size());
                } else {
                    auto [it, fresh] = id_names.emplace(got.rules.begin()->first, *want.verdict.rule);
                    if (!fresh && it->second != *want.verdict.rule)
                        rule_problem = fmt::format("rule id {} counted, which is '{}'", it->first,
                                                   it->second);
                }
            } else if (want.verdict.reason != Reason::tracked && !got.rules.empty()) {
                rule_problem = fmt::format("{} rule counters moved", got.rules.size());
            }
            std::string want_text = outcome_text(want.verdict.passes(), want_reason,
                                                 want.ct_miss, want.revoked);
            std::string got_text = outcome_text(got.pass, got.reason, got.ct_miss, got.revoked);
            history.push_back(fmt::format("{}: {} => {}", s.kind, flow_text(s.tracked), got_text));
            if (want_text == got_text && rule_problem.empty())
                return;

            std::string kind = fmt::format("{}: reference {}, XDP {}{}", s.kind, want_text,
                                           got_text, rule_problem.empty() ? "" : " (rule)");
            if (++mismatches[kind] > shown_per_kind)
                return;
            std::size_t from = history.size() > 25 ? history.size() - 25 : 0;
            std::string recent;
            for (std::size_t h = from; h < history.size(); h++)
                recent += "\n    " + history[h];
            ADD_FAILURE() << fmt::format(
                "sequence #{} (BULKHEAD_SEED={}): {}\n  packet: {}\n  {}\n  reference rule: {}"
                "{}\n  policy A:\n{}  policy B:\n{}  last packets (newest last):{}",
                i, seed, kind, s.packet.describe(), flow_text(s.tracked),
                want.verdict.rule.value_or("(none)"),
                rule_problem.empty() ? "" : "\n  rule counters: " + rule_problem,
                policy_text(policies[0]), policy_text(policies[1]), recent);
        };

        for (std::uint64_t e = 0; e < events; e++) {
            Event event = next_event(rng, e > 0);
            if (event == Event::flip || event == Event::reapply) {
                if (event == Event::flip)
                    in_force ^= 1;
                const Policy& p = policies[static_cast<std::size_t>(in_force)];
                ApplyResult result = dp_->apply(p, "<random>");
                if (!result.unchanged)
                    tracker.commit(p);  // an unchanged re-apply commits nothing
                counters.rebase();
                id_names.clear();
                history.push_back(fmt::format("commit policy {}{}", in_force == 0 ? "A" : "B",
                                              result.unchanged ? " (unchanged)" : ""));
                continue;
            }
            for (const Sent& s : gen.event(event))
                check(s);
        }
        for (const Sent& s : gen.drain())
            check(s);
    }

    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started);
    fmt::print("stateful differential: {} packets checked in {:.1f} s; reference reasons:",
               checked, seconds.count());
    for (const auto& [name, count] : seen)
        fmt::print(" {} {}", name, count);
    fmt::print("\n");
    if (!mismatches.empty()) {
        std::string summary;
        for (const auto& [kind, count] : mismatches)
            summary += fmt::format("\n  {} x {}", count, kind);
        ADD_FAILURE() << "BULKHEAD_SEED=" << seed << ": mismatches by kind:" << summary;
    }
}

// The tracker itself, on a few hand-written sequences, so that the oracle is
// checked before it judges the datapath.
TEST(ReferenceTrackerTest, FollowsTheSemanticsItDocuments)
{
    Policy policy = Policy::parse(R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: enforce}
failsafe: {ports: [tcp/22], from: [203.0.113.0/28]}
identities:
  - {name: web, labels: {app: web}, cidrs: [198.51.100.2/32]}
  - {name: client, labels: {app: client}, cidrs: [203.0.113.0/25]}
rules:
  - {name: https, from: {app: client}, to: {app: web}, ports: [tcp/443], action: allow}
  - {name: ping, from: {app: client}, to: {app: web}, ports: [icmp/8], action: allow}
)");
    Policy revoked = policy;
    revoked.rules.clear();
    const IpAddr client = *IpAddr::parse("203.0.113.9");
    const IpAddr web = *IpAddr::parse("198.51.100.2");
    const IpAddr host = *IpAddr::parse("198.51.100.250");
    ReferenceTracker tracker({*Prefix::parse("198.51.100.250/32")});
    tracker.commit(policy);

    auto packet = [](IpAddr src, IpAddr dst, std::uint8_t proto, std::uint16_t sport,
                     std::uint16_t port, std::uint8_t flags = 0) {
        TrackedPacket p;
        p.flow.src = src;
        p.flow.dst = dst;
        p.flow.proto = proto;
        p.flow.port = port;
        p.sport = sport;
        p.tcp_flags = flags;
        return p;
    };
    auto text = [](const TrackedVerdict& v) {
        return outcome_text(v.verdict.passes(), reason_counter(v.verdict), v.ct_miss, v.revoked) +
               " " + v.verdict.rule.value_or("-");
    };

    EXPECT_EQ(text(tracker.judge(packet(client, web, 6, 1000, 443, kTcpSyn))),
              "pass allow-rule https");
    EXPECT_EQ(text(tracker.judge(packet(web, client, 6, 443, 1000, kTcpAck))),
              "pass tracked https");
    EXPECT_EQ(text(tracker.judge(packet(web, client, 6, 443, 1001, kTcpAck))),
              "drop deny-default +ct-miss -");
    EXPECT_EQ(text(tracker.judge(packet(web, client, 6, 443, 1001, kTcpSyn | kTcpAck))),
              "drop deny-default +ct-miss -");
    EXPECT_EQ(text(tracker.judge(packet(client, web, 1, 0x77, 0x0800))), "pass allow-rule ping");
    EXPECT_EQ(text(tracker.judge(packet(web, client, 1, 0x77, 0x0000))), "pass tracked ping");
    EXPECT_EQ(text(tracker.judge(packet(web, client, 1, 0x78, 0x0000))), "drop deny-default -");

    TrackedPacket error = packet(*IpAddr::parse("203.0.113.254"), web, 1, 0, 0x0304);
    error.quoted = TrackedPacket::Quote{web, client, 6, 443, 1000};
    EXPECT_EQ(text(tracker.judge(error)), "pass tracked -");
    error.quoted->dport = 1002;
    EXPECT_EQ(text(tracker.judge(error)), "drop deny-default -");

    TrackedPacket first = packet(client, web, 6, 2000, 443, kTcpSyn);
    first.first_fragment = true;
    first.frag_id = 0x42;
    TrackedPacket later = packet(client, web, 6, 0, 0);
    later.flow.has_port = false;
    later.frag_id = 0x42;
    EXPECT_EQ(text(tracker.judge(first)), "pass allow-rule https");
    EXPECT_EQ(text(tracker.judge(later)), "pass tracked -");
    later.frag_id = 0x43;
    EXPECT_EQ(text(tracker.judge(later)), "drop deny-default -");

    EXPECT_EQ(text(tracker.judge(packet(client, host, 6, 3000, 22, kTcpSyn))), "pass failsafe -");
    EXPECT_EQ(text(tracker.judge(packet(*IpAddr::parse("203.0.113.99"), host, 6, 3000, 22,
                                        kTcpSyn))),
              "drop deny-default -");

    tracker.commit(policy);  // unchanged: nothing is cut
    EXPECT_EQ(text(tracker.judge(packet(client, web, 6, 1000, 443, kTcpAck))),
              "pass tracked https");
    tracker.commit(revoked);
    EXPECT_EQ(text(tracker.judge(packet(web, client, 6, 443, 1000, kTcpAck))),
              "drop deny-default +revoked -");
    EXPECT_EQ(text(tracker.judge(packet(client, web, 6, 1000, 443, kTcpAck))),
              "drop deny-default +ct-miss -");
    later.frag_id = 0x42;
    EXPECT_EQ(text(tracker.judge(later)), "drop deny-default -");
    // the ping, the fragmented flow and the failsafe flow, not seen since the commit
    EXPECT_EQ(tracker.flows(), 3u);
}

}  // namespace
}  // namespace bulkhead::test
