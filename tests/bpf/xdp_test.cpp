// The XDP program under BPF_PROG_TEST_RUN: crafted frames, a policy, the
// expected action and the counters that must move.
//
// Every case is a row: a description, a packet built by fields, a policy (YAML
// text, applied when it differs from the one in force), the XDP action, the
// reason counter that moves by exactly one packet (and by the frame's bytes),
// and the rule counter that moves ("" when none may). Every run also checks
// that the program left the frame's bytes as they came in (field case X2).
#include "support/bpf_env.hpp"
#include "support/packet.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include <arpa/inet.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <sched.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include "bulkhead_bpf.skel.h"
#pragma GCC diagnostic pop

namespace bulkhead::test {
namespace {

// ---------------------------------------------------------------------------
// Addresses and policies the tables share
// ---------------------------------------------------------------------------

// web is the protected server; client a subnet that talks to it; audited and
// open are servers in audit and allow mode; net a /24 around them (a longer
// prefix wins); bad a subnet that a deny rule names; world is what no
// identity covers.
constexpr const char* kWeb4 = "198.51.100.2";
constexpr const char* kWeb6 = "2001:db8::2";
constexpr const char* kAudited4 = "198.51.100.3";
constexpr const char* kOpen4 = "198.51.100.4";
constexpr const char* kNet4 = "198.51.100.9";
constexpr const char* kClient4 = "203.0.113.9";
constexpr const char* kClientOutside28 = "203.0.113.20";
constexpr const char* kClient6 = "2001:db8:1::9";
constexpr const char* kBad4 = "203.0.113.150";
constexpr const char* kWorld4 = "203.0.113.200";
constexpr const char* kWorld6 = "2001:db8:ffff::1";

const Ipv4 kClientToWeb4{.src = kClient4, .dst = kWeb4};
const Ipv6 kClientToWeb6{.src = kClient6, .dst = kWeb6};

// The reason counters that are verdicts: every packet moves exactly one.
const std::set<std::string> kVerdictReasons = {
    "allow-rule",  "deny-rule", "audit-rule", "allow-default", "deny-default", "audit-default",
    "not-ip",      "neighbour-discovery",     "malformed",     "no-policy",    "tracked",
    "failsafe",
};

constexpr std::uint32_t kPass = kXdpPass;
constexpr std::uint32_t kDrop = kXdpDrop;

// A policy over the standard identities, with `rules` (flow-style YAML
// mappings, one per rule) in file order. Failsafes are off: the XDP program
// has none yet, and the tables test the rules.
std::string policy(const std::vector<std::string>& rules,
                   const std::string& defaults = "{ingress: allow, egress: allow}")
{
    std::string text = fmt::format(R"(apiVersion: bulkhead/v1
defaults: {}
failsafe: {{enabled: false}}
identities:
  - {{name: web, labels: {{app: web}}, ingress: enforce,
     cidrs: [198.51.100.2/32, "2001:db8::2/128"]}}
  - {{name: audited, labels: {{app: audited}}, ingress: audit,
     cidrs: [198.51.100.3/32, "2001:db8::3/128"]}}
  - {{name: open, labels: {{app: open}}, ingress: allow,
     cidrs: [198.51.100.4/32, "2001:db8::4/128"]}}
  - {{name: net, labels: {{app: net}}, cidrs: [198.51.100.0/24], ingress: enforce}}
  - {{name: client, labels: {{app: client}}, cidrs: [203.0.113.0/25, "2001:db8:1::/48"]}}
  - {{name: bad, labels: {{app: bad}}, cidrs: [203.0.113.144/28]}}
)",
                                   defaults);
    if (rules.empty())
        return text;
    text += "rules:\n";
    for (const std::string& rule : rules)
        text += "  - " + rule + "\n";
    return text;
}

// client -> web on `ports`, allowed, named `name`.
std::string allow_client_to_web(const std::string& name, const std::string& ports)
{
    return fmt::format("{{name: {}, from: {{app: client}}, to: {{app: web}}, ports: [{}], "
                       "action: allow}}",
                       name, ports);
}

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

struct XdpCase {
    std::string description;
    Packet packet;
    std::string policy;  // "" keeps the policy in force (or none)
    std::uint32_t action = kDrop;
    std::string reason{};  // the reason counter that moves by one
    std::string rule{};    // the rule counter that moves by one, "" for none
    // Rows are independent flows: each gets its own source port (or echo
    // id) and IP id, so no row is tracked as part of an earlier one. A row
    // about tracking keeps the ids its packet was built with.
    bool keep_flow_ids = false;
};

struct Outcome {
    std::uint32_t action = 0;
    std::string reason;  // see moved_one()
    std::string rule;
    Bytes data;
};

class XdpTest : public DataplaneTest {
protected:
    Dataplane& dp()
    {
        Dataplane& opened = DataplaneTest::dp();
        if (prog_fd_ < 0)
            prog_fd_ = opened.program_fd("bh_xdp");
        return opened;
    }

    ApplyResult apply(const std::string& yaml)
    {
        ApplyResult result = dp().apply(Policy::parse(yaml, "<test>"), "<test>");
        applied_ = yaml;
        return result;
    }

    // Runs `packet` `repeat` times and says what happened and what moved.
    Outcome send(const Packet& packet, std::uint32_t repeat = 1)
    {
        Bytes frame = packet.bytes();
        Stats before = dp().stats();
        XdpRun run = run_xdp(prog_fd_, frame, repeat);
        Stats after = dp().stats();
        CounterDelta delta = counter_delta(before, after);

        // counters kept besides a verdict (tracking misses) are not verdicts
        std::map<std::string, Counter> verdicts;
        for (const auto& [name, counter] : delta.reasons) {
            if (kVerdictReasons.count(name) != 0)
                verdicts.emplace(name, counter);
        }
        delta.reasons = std::move(verdicts);
        Outcome out{run.retval, moved_one(delta.reasons, repeat), moved_one(delta.rules, repeat),
                    run.data};
        // counters count the frame's bytes, once per packet
        if (delta.reasons.size() == 1) {
            EXPECT_EQ(delta.reasons.begin()->second.bytes, frame.size() * repeat)
                << "reason bytes";
        }
        if (delta.rules.size() == 1) {
            EXPECT_EQ(delta.rules.begin()->second.bytes, frame.size() * repeat) << "rule bytes";
        }
        // X2: the parser only reads
        EXPECT_EQ(run.data, frame) << "the program changed the frame";
        return out;
    }

    void expect(const XdpCase& c)
    {
        SCOPED_TRACE(fmt::format("case '{}': {}", c.description, c.packet.describe()));
        if (!c.policy.empty() && c.policy != applied_)
            apply(c.policy);
        Packet packet = c.packet;
        if (!c.keep_flow_ids)
            packet.flow_ids(next_flow_port_++, next_ip_id_++);
        Outcome out = send(packet);
        EXPECT_EQ(xdp_action_name(out.action), xdp_action_name(c.action));
        EXPECT_EQ(out.reason, c.reason);
        EXPECT_EQ(out.rule, c.rule);
    }

    void expect_all(const std::vector<XdpCase>& cases)
    {
        for (const XdpCase& c : cases)
            expect(c);
    }

    int prog_fd_ = -1;
    std::string applied_;
    std::uint16_t next_flow_port_ = 20000;
    std::uint32_t next_ip_id_ = 0x1000;
};

// Field cases of /work/shared/cases/field-cases.md run with the same fixture.
class FieldCase : public XdpTest {};

// ---------------------------------------------------------------------------
// Parsing: every header shape of DESIGN.md "Packet parsing"
// ---------------------------------------------------------------------------

const std::string kShapes = policy({
    allow_client_to_web("web-tcp", "tcp/443"),
    allow_client_to_web("web-udp", "udp/53"),
    allow_client_to_web("web-sctp", "sctp/5000"),
    allow_client_to_web("web-ping", "icmp/8, icmpv6/128"),
});

TEST_F(XdpTest, HeaderShapesAreClassified)
{
    const Bytes nops(40, 0x01);  // 40 bytes of IPv4 NOP options: IHL 15
    expect_all({
        // description, packet, policy, action, reason, rule
        {"IPv4 TCP to an allowed port", Packet().ipv4(kClientToWeb4).tcp({.dport = 443}), kShapes,
         kPass, "allow-rule", "web-tcp"},
        {"IPv4 TCP to a port no rule allows", Packet().ipv4(kClientToWeb4).tcp({.dport = 80}),
         kShapes, kDrop, "deny-default"},
        {"one 802.1Q tag", Packet().vlan(10).ipv4(kClientToWeb4).tcp({.dport = 443}), kShapes,
         kPass, "allow-rule", "web-tcp"},
        {"one 802.1Q tag, port 80", Packet().vlan(10).ipv4(kClientToWeb4).tcp({.dport = 80}),
         kShapes, kDrop, "deny-default"},
        {"one 802.1ad tag", Packet().vlan(10, kTpid8021ad).ipv4(kClientToWeb4).tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"802.1ad then 802.1Q",
         Packet().vlan(10, kTpid8021ad).vlan(20).ipv4(kClientToWeb4).tcp({.dport = 443}), kShapes,
         kPass, "allow-rule", "web-tcp"},
        {"two 802.1Q tags", Packet().vlan(10).vlan(20).ipv4(kClientToWeb4).tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"IPv4 with 4 option bytes (IHL 6)",
         Packet()
             .ipv4({.src = kClient4, .dst = kWeb4, .options = {0x01, 0x01, 0x01, 0x00}})
             .tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"IPv4 with 40 option bytes (IHL 15)",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .options = nops}).tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"IPv4 with 40 option bytes (IHL 15), port 80",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .options = nops}).tcp({.dport = 80}),
         kShapes, kDrop, "deny-default"},
        {"IPv4 DF set", Packet().ipv4({.src = kClient4, .dst = kWeb4, .dont_fragment = true})
                            .tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"IPv4 first fragment (offset 0, MF) carries the ports",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true})
             .tcp({.dport = 443}).payload(64, 0),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"IPv4 UDP", Packet().ipv4(kClientToWeb4).udp({.dport = 53}), kShapes, kPass,
         "allow-rule", "web-udp"},
        {"IPv4 UDP, other port", Packet().ipv4(kClientToWeb4).udp({.dport = 54}), kShapes, kDrop,
         "deny-default"},
        {"IPv4 SCTP", Packet().ipv4(kClientToWeb4).sctp({.dport = 5000}), kShapes, kPass,
         "allow-rule", "web-sctp"},
        {"IPv4 SCTP, other port", Packet().ipv4(kClientToWeb4).sctp({.dport = 5001}), kShapes,
         kDrop, "deny-default"},
        {"ICMP echo request", Packet().ipv4(kClientToWeb4).icmp({.type = 8}), kShapes, kPass,
         "allow-rule", "web-ping"},
        {"ICMP echo reply (no rule)", Packet().ipv4(kClientToWeb4).icmp({.type = 0}), kShapes,
         kDrop, "deny-default"},
        {"short UDP packet with Ethernet padding to 60 bytes",
         Packet().ipv4(kClientToWeb4).udp({.dport = 53}).pad_to(60), kShapes, kPass, "allow-rule",
         "web-udp"},
        {"TCP with Ethernet padding, port 80",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 80}).pad_to(64), kShapes, kDrop,
         "deny-default"},
        {"IPv4 GRE: no ports, no rule for the protocol",
         Packet().ipv4(kClientToWeb4).raw_l4(kProtoGre).payload(16, 0), kShapes, kDrop,
         "deny-default"},

        {"IPv6 TCP", Packet().ipv6(kClientToWeb6).tcp({.dport = 443}), kShapes, kPass,
         "allow-rule", "web-tcp"},
        {"IPv6 TCP, port 80", Packet().ipv6(kClientToWeb6).tcp({.dport = 80}), kShapes, kDrop,
         "deny-default"},
        {"IPv6 UDP", Packet().ipv6(kClientToWeb6).udp({.dport = 53}), kShapes, kPass,
         "allow-rule", "web-udp"},
        {"IPv6 SCTP", Packet().ipv6(kClientToWeb6).sctp({.dport = 5000}), kShapes, kPass,
         "allow-rule", "web-sctp"},
        {"ICMPv6 echo request", Packet().ipv6(kClientToWeb6).icmpv6({.type = 128}), kShapes,
         kPass, "allow-rule", "web-ping"},
        {"ICMPv6 echo reply (no rule)", Packet().ipv6(kClientToWeb6).icmpv6({.type = 129}),
         kShapes, kDrop, "deny-default"},
        {"802.1Q, IPv6", Packet().vlan(7).ipv6(kClientToWeb6).tcp({.dport = 443}), kShapes, kPass,
         "allow-rule", "web-tcp"},
        {"hop-by-hop (8 bytes)",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::hop_by_hop()).tcp({.dport = 443}), kShapes,
         kPass, "allow-rule", "web-tcp"},
        {"hop-by-hop (24 bytes)",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::hop_by_hop(2)).tcp({.dport = 443}), kShapes,
         kPass, "allow-rule", "web-tcp"},
        {"hop-by-hop (24 bytes), port 22",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::hop_by_hop(2)).tcp({.dport = 22}), kShapes,
         kDrop, "deny-default"},
        {"routing header", Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::routing(1)).udp({.dport = 53}),
         kShapes, kPass, "allow-rule", "web-udp"},
        {"destination options",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::dest_opts()).sctp({.dport = 5000}), kShapes,
         kPass, "allow-rule", "web-sctp"},
        {"atomic fragment header",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::fragment(0, false)).tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"AH, 12 bytes (length 1)",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::ah(1)).tcp({.dport = 443}), kShapes, kPass,
         "allow-rule", "web-tcp"},
        {"AH, 24 bytes (length 4)",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::ah(4)).icmpv6({.type = 128}), kShapes, kPass,
         "allow-rule", "web-ping"},
        {"hop-by-hop, dest opts, routing, dest opts, port 22",
         Packet()
             .ipv6(kClientToWeb6)
             .ext(Ipv6Ext::hop_by_hop())
             .ext(Ipv6Ext::dest_opts(1))
             .ext(Ipv6Ext::routing())
             .ext(Ipv6Ext::dest_opts())
             .tcp({.dport = 22}),
         kShapes, kDrop, "deny-default"},
        {"eight extension headers, the most the parser walks",
         Packet()
             .ipv6(kClientToWeb6)
             .ext(Ipv6Ext::hop_by_hop())
             .ext(Ipv6Ext::dest_opts())
             .ext(Ipv6Ext::routing(2))
             .ext(Ipv6Ext::fragment(0, false))
             .ext(Ipv6Ext::ah(1))
             .ext(Ipv6Ext::dest_opts(1))
             .ext(Ipv6Ext::dest_opts())
             .ext(Ipv6Ext::dest_opts())
             .tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"802.1ad, 802.1Q, IPv6, hop-by-hop",
         Packet()
             .vlan(10, kTpid8021ad)
             .vlan(20)
             .ipv6(kClientToWeb6)
             .ext(Ipv6Ext::hop_by_hop())
             .tcp({.dport = 443}),
         kShapes, kPass, "allow-rule", "web-tcp"},
        {"IPv6 ESP: no ports, no rule for the protocol",
         Packet().ipv6(kClientToWeb6).raw_l4(kProtoEsp).payload(16, 0), kShapes, kDrop,
         "deny-default"},
        {"IPv6 no next header after hop-by-hop",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::hop_by_hop()).raw_l4(kProtoNoNext), kShapes,
         kDrop, "deny-default"},
    });
}

TEST_F(XdpTest, ProtocolsWithoutPortsFollowProtocolWideRules)
{
    const std::string any_to_web = policy({
        "{name: web-everything, from: {app: client}, to: {app: web}, ports: [any], action: allow}",
    });
    expect_all({
        {"GRE over IPv4", Packet().ipv4(kClientToWeb4).raw_l4(kProtoGre).payload(16, 0),
         any_to_web, kPass, "allow-rule", "web-everything"},
        {"ESP over IPv6", Packet().ipv6(kClientToWeb6).raw_l4(kProtoEsp).payload(16, 0),
         any_to_web, kPass, "allow-rule", "web-everything"},
        {"TCP", Packet().ipv4(kClientToWeb4).tcp({.dport = 1}), any_to_web, kPass, "allow-rule",
         "web-everything"},
    });
}

TEST_F(XdpTest, MalformedFramesAreDroppedAndCounted)
{
    const Packet tcp4 = Packet().ipv4(kClientToWeb4).tcp({.dport = 443});
    const Packet tcp6 = Packet().ipv6(kClientToWeb6).tcp({.dport = 443});
    const std::size_t eth = 14;
    const std::size_t ip4 = eth + 20;
    const std::size_t ip6 = eth + 40;
    Packet nine_ext = Packet().ipv6(kClientToWeb6);
    for (int i = 0; i < 9; i++)
        nine_ext.ext(Ipv6Ext::dest_opts());
    nine_ext.tcp({.dport = 443});

    expect_all({
        {"Ethernet header only, ethertype IPv4", Packet().ethertype(kEthIpv4), kShapes, kDrop,
         "malformed"},
        {"VLAN tag cut after its TPID", Packet(tcp4).vlan(10).truncate(eth + 2), kShapes, kDrop,
         "malformed"},
        {"second VLAN tag cut after its TPID",
         Packet().vlan(10).vlan(20).ipv4(kClientToWeb4).tcp().truncate(eth + 4 + 2), kShapes,
         kDrop, "malformed"},
        {"three VLAN tags",
         Packet().vlan(1).vlan(2).vlan(3).ipv4(kClientToWeb4).tcp({.dport = 443}), kShapes, kDrop,
         "malformed"},
        {"IPv4 header cut at 19 bytes", Packet(tcp4).truncate(eth + 19), kShapes, kDrop,
         "malformed"},
        {"IPv4 ethertype, version 6",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .version = 6}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"IPv4 ethertype carrying an IPv6 header", Packet(tcp6).ethertype(kEthIpv4), kShapes,
         kDrop, "malformed"},
        {"IPv6 ethertype, version 4",
         Packet().ipv6({.src = kClient6, .dst = kWeb6, .version = 4}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"IHL 0", Packet().ipv4({.src = kClient4, .dst = kWeb4, .ihl = 0}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"IHL 6, frame ends after 20 header bytes",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .ihl = 6, .total_length = 24}), kShapes,
         kDrop, "malformed"},
        {"total length beyond the frame",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 1000}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"total length leaves 10 bytes of a 20-byte TCP header",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 30}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"TCP data offset 4 (below its fixed header)",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 443, .data_offset = 4}), kShapes, kDrop,
         "malformed"},
        {"UDP header cut at 7 bytes",
         Packet().ipv4(kClientToWeb4).udp({.dport = 53}).truncate(ip4 + 7), kShapes, kDrop,
         "malformed"},
        {"UDP: total length leaves 7 bytes",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 27}).udp({.dport = 53}),
         kShapes, kDrop, "malformed"},
        {"SCTP: total length leaves 11 bytes",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 31}).sctp({.dport = 5000}),
         kShapes, kDrop, "malformed"},
        {"ICMP: total length leaves 4 bytes",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 24}).icmp({.type = 8}),
         kShapes, kDrop, "malformed"},
        {"IPv4 first fragment whose TCP header is cut",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true, .total_length = 26})
             .tcp({.dport = 443}).truncate(ip4 + 6),
         kShapes, kDrop, "malformed"},
        {"IPv6 header cut at 39 bytes", Packet(tcp6).truncate(eth + 39), kShapes, kDrop,
         "malformed"},
        {"IPv6 payload length beyond the frame",
         Packet().ipv6({.src = kClient6, .dst = kWeb6, .payload_length = 1000}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"IPv6 payload length leaves 10 bytes of TCP",
         Packet().ipv6({.src = kClient6, .dst = kWeb6, .payload_length = 10}).tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"IPv6 TCP header cut at 6 bytes",
         Packet().ipv6({.src = kClient6, .dst = kWeb6, .payload_length = 6}).tcp({.dport = 443})
             .truncate(ip6 + 6),
         kShapes, kDrop, "malformed"},
        {"ICMPv6: payload length leaves 4 bytes",
         Packet().ipv6({.src = kClient6, .dst = kWeb6, .payload_length = 4}).icmpv6({.type = 128}),
         kShapes, kDrop, "malformed"},
        {"hop-by-hop cut after its first byte",
         Packet(tcp6).ext(Ipv6Ext::hop_by_hop()).truncate(ip6 + 1), kShapes, kDrop, "malformed"},
        {"hop-by-hop claims 88 bytes, packet has 28",
         Packet(tcp6).ext(Ipv6Ext{.type = kExtHopByHop, .length = 10, .emitted_size = 8}),
         kShapes, kDrop, "malformed"},
        {"AH claims 168 bytes, packet has 44",
         Packet(tcp6).ext(Ipv6Ext{.type = kExtAh, .length = 40, .emitted_size = 24}), kShapes,
         kDrop, "malformed"},
        {"fragment header, payload length 4",
         Packet()
             .ipv6({.src = kClient6, .dst = kWeb6, .payload_length = 4})
             .ext(Ipv6Ext::fragment(0, true))
             .tcp({.dport = 443}),
         kShapes, kDrop, "malformed"},
        {"nine extension headers, one more than the parser walks", nine_ext, kShapes, kDrop,
         "malformed"},
    });
}

// Length fields of the transport header that disagree with the packet: a TCP
// data offset past the end of the segment (its options are missing), a UDP
// length below the UDP header or beyond the IP payload. DESIGN.md: "A header
// that is cut short or inconsistent ... is malformed".
TEST_F(XdpTest, TransportLengthsInconsistentWithThePacketAreMalformed)
{
    expect_all({
        {"data offset 15 (60 bytes), segment of 20",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 443, .data_offset = 15}), kShapes, kDrop,
         "malformed"},
        {"data offset 6 (24 bytes), segment of 20, IPv6",
         Packet().ipv6(kClientToWeb6).tcp({.dport = 443, .data_offset = 6}), kShapes, kDrop,
         "malformed"},
        {"data offset 6 with its 4 option bytes present",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 443, .options = {1, 1, 1, 0}}), kShapes, kPass,
         "allow-rule", "web-tcp"},
        {"UDP length 7, below the UDP header",
         Packet().ipv4(kClientToWeb4).udp({.dport = 53, .length = 7}).payload(8, 0), kShapes,
         kDrop, "malformed"},
        {"UDP length 100, IP payload of 16",
         Packet().ipv4(kClientToWeb4).udp({.dport = 53, .length = 100}).payload(8, 0), kShapes,
         kDrop, "malformed"},
        {"UDP length 16 matching the IP payload",
         Packet().ipv4(kClientToWeb4).udp({.dport = 53}).payload(8, 0), kShapes, kPass,
         "allow-rule", "web-udp"},
    });
}

TEST_F(XdpTest, NonIpFramesPassAndAreCounted)
{
    expect_all({
        {"ARP request", Packet().arp(), kShapes, kPass, "not-ip"},
        {"ARP reply", Packet().arp({.op = 2}), kShapes, kPass, "not-ip"},
        {"LLDP", Packet().ethertype(kEthLldp).payload(32, 0x02), kShapes, kPass, "not-ip"},
        {"802.3 frame with a length field (LLC)",
         Packet().ethertype(0x0026).payload({0x42, 0x42, 0x03}), kShapes, kPass, "not-ip"},
        {"802.1Q tagged ARP", Packet().vlan(5).arp(), kShapes, kPass, "not-ip"},
        {"802.1ad, 802.1Q, ARP", Packet().vlan(5, kTpid8021ad).vlan(6).arp(), kShapes, kPass,
         "not-ip"},
        {"three tags, then ARP: too deep is malformed, not a pass",
         Packet().vlan(1).vlan(2).vlan(3).arp(), kShapes, kDrop, "malformed"},
    });
}

TEST_F(XdpTest, BeforeTheFirstCommitIpPassesAsNoPolicy)
{
    expect_all({
        {"IPv4 TCP", Packet().ipv4(kClientToWeb4).tcp({.dport = 22}), "", kPass, "no-policy"},
        {"IPv6 UDP", Packet().ipv6(kClientToWeb6).udp(), "", kPass, "no-policy"},
        {"ARP", Packet().arp(), "", kPass, "not-ip"},
        {"malformed", Packet().ipv4({.src = kClient4, .dst = kWeb4, .ihl = 3}).tcp(), "", kDrop,
         "malformed"},
    });
}

// ---------------------------------------------------------------------------
// Verdict semantics: DESIGN.md "Verdict of a packet"
// ---------------------------------------------------------------------------

const std::string kSemantics = policy({
    "{name: deny-ssh, from: any, to: any, ports: [tcp/22], action: deny}",
    allow_client_to_web("web-all-tcp", "tcp"),
    "{name: any-to-web-8443, from: any, to: {app: web}, ports: [tcp/8443], action: allow}",
    allow_client_to_web("udp-range", "udp/5000-5100"),
    allow_client_to_web("ping-exact", "icmp/8/0, icmpv6/128/0"),
    allow_client_to_web("unreachable-any-code", "icmp/3"),
    "{name: deny-client-dns, from: {app: client}, to: {app: web}, ports: [udp/53], action: deny}",
    "{name: any-dns, from: any, to: {app: web}, ports: [udp/53], action: allow}",
    "{name: deny-world-54, from: world, to: {app: web}, ports: [udp/54], action: deny}",
    "{name: any-54, from: any, to: {app: web}, ports: [udp/54], action: allow}",
    "{name: deny-audited-telnet, from: any, to: {app: audited}, ports: [tcp/23], action: deny}",
    "{name: net-udp-80, from: {app: client}, to: {app: net}, ports: [udp/80], action: allow}",
    "{name: slash28-to-web, from: {cidr: 203.0.113.0/28}, to: {app: web}, ports: [udp/7000], "
    "action: allow}",
    "{name: deny-bad, from: {app: bad}, to: any, ports: [any], action: deny}",
    "{name: deny-bad-telnet, from: {app: bad}, to: {app: open}, ports: [tcp/23], action: deny}",
});

TEST_F(XdpTest, VerdictFollowsRulesModesAndPrecedence)
{
    auto v4 = [](const char* src, const char* dst) { return Ipv4{.src = src, .dst = dst}; };
    expect_all({
        {"deny precedence: tcp/22 denied although tcp is allowed",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 22}), kSemantics, kDrop, "deny-rule",
         "deny-ssh"},
        {"the allow rule on every tcp port", Packet().ipv4(kClientToWeb4).tcp({.dport = 80}),
         kSemantics, kPass, "allow-rule", "web-all-tcp"},
        {"tcp port 0", Packet().ipv4(kClientToWeb4).tcp({.dport = 0}), kSemantics, kPass,
         "allow-rule", "web-all-tcp"},
        {"tcp port 65535", Packet().ipv4(kClientToWeb4).tcp({.dport = 65535}), kSemantics, kPass,
         "allow-rule", "web-all-tcp"},
        {"any source: world to web 8443", Packet().ipv4(v4(kWorld4, kWeb4)).tcp({.dport = 8443}),
         kSemantics, kPass, "allow-rule", "any-to-web-8443"},
        {"world to web 80: no rule, web enforces",
         Packet().ipv4(v4(kWorld4, kWeb4)).tcp({.dport = 80}), kSemantics, kDrop, "deny-default"},
        {"world over IPv6 to web 8443",
         Packet().ipv6({.src = kWorld6, .dst = kWeb6}).tcp({.dport = 8443}), kSemantics, kPass,
         "allow-rule", "any-to-web-8443"},
        {"port range, below", Packet().ipv4(kClientToWeb4).udp({.dport = 4999}), kSemantics, kDrop,
         "deny-default"},
        {"port range, low edge", Packet().ipv4(kClientToWeb4).udp({.dport = 5000}), kSemantics,
         kPass, "allow-rule", "udp-range"},
        {"port range, inside", Packet().ipv4(kClientToWeb4).udp({.dport = 5057}), kSemantics,
         kPass, "allow-rule", "udp-range"},
        {"port range, high edge", Packet().ipv4(kClientToWeb4).udp({.dport = 5100}), kSemantics,
         kPass, "allow-rule", "udp-range"},
        {"port range, above", Packet().ipv4(kClientToWeb4).udp({.dport = 5101}), kSemantics,
         kDrop, "deny-default"},
        {"icmp/8/0: echo code 0", Packet().ipv4(kClientToWeb4).icmp({.type = 8, .code = 0}),
         kSemantics, kPass, "allow-rule", "ping-exact"},
        {"icmp/8/0: echo with code 1", Packet().ipv4(kClientToWeb4).icmp({.type = 8, .code = 1}),
         kSemantics, kDrop, "deny-default"},
        {"icmp/3: code 4", Packet().ipv4(kClientToWeb4).icmp({.type = 3, .code = 4}), kSemantics,
         kPass, "allow-rule", "unreachable-any-code"},
        {"icmp/3: code 255", Packet().ipv4(kClientToWeb4).icmp({.type = 3, .code = 255}),
         kSemantics, kPass, "allow-rule", "unreachable-any-code"},
        {"icmp type 11: no rule", Packet().ipv4(kClientToWeb4).icmp({.type = 11}), kSemantics,
         kDrop, "deny-default"},
        {"icmp type 4 (next to 3)", Packet().ipv4(kClientToWeb4).icmp({.type = 4}), kSemantics,
         kDrop, "deny-default"},
        {"icmpv6/128/0", Packet().ipv6(kClientToWeb6).icmpv6({.type = 128}), kSemantics, kPass,
         "allow-rule", "ping-exact"},
        {"icmpv6/128/1", Packet().ipv6(kClientToWeb6).icmpv6({.type = 128, .code = 1}),
         kSemantics, kDrop, "deny-default"},
        {"icmpv6 type 3 is not icmp/3", Packet().ipv6(kClientToWeb6).icmpv6({.type = 3}),
         kSemantics, kDrop, "deny-default"},
        {"a specific-source deny beats an any-source allow",
         Packet().ipv4(kClientToWeb4).udp({.dport = 53}), kSemantics, kDrop, "deny-rule",
         "deny-client-dns"},
        {"the any-source allow for everyone else",
         Packet().ipv4(v4(kWorld4, kWeb4)).udp({.dport = 53}), kSemantics, kPass, "allow-rule",
         "any-dns"},
        {"a deny from world beats an allow from any",
         Packet().ipv4(v4(kWorld4, kWeb4)).udp({.dport = 54}), kSemantics, kDrop, "deny-rule",
         "deny-world-54"},
        {"the allow from any for a workload", Packet().ipv4(kClientToWeb4).udp({.dport = 54}),
         kSemantics, kPass, "allow-rule", "any-54"},
        {"audit: a deny rule passes, counted as audit-rule",
         Packet().ipv4(v4(kClient4, kAudited4)).tcp({.dport = 23}), kSemantics, kPass,
         "audit-rule", "deny-audited-telnet"},
        {"audit: no rule passes, counted as audit-default",
         Packet().ipv4(v4(kClient4, kAudited4)).tcp({.dport = 80}), kSemantics, kPass,
         "audit-default"},
        {"allow mode: no rule passes", Packet().ipv4(v4(kClient4, kOpen4)).tcp({.dport = 80}),
         kSemantics, kPass, "allow-default"},
        {"allow mode: a deny rule still denies",
         Packet().ipv4(v4(kClient4, kOpen4)).tcp({.dport = 22}), kSemantics, kDrop, "deny-rule",
         "deny-ssh"},
        {"world destination takes the default ingress mode (allow)",
         Packet().ipv4(v4(kClient4, kWorld4)).tcp({.dport = 80}), kSemantics, kPass,
         "allow-default"},
        {"longest prefix: a /24 member gets the /24's rule",
         Packet().ipv4(v4(kClient4, kNet4)).udp({.dport = 80}), kSemantics, kPass, "allow-rule",
         "net-udp-80"},
        {"longest prefix: the /32 inside the /24 is not the /24",
         Packet().ipv4(kClientToWeb4).udp({.dport = 80}), kSemantics, kDrop, "deny-default"},
        {"cidr selector: a source inside 203.0.113.0/28",
         Packet().ipv4(kClientToWeb4).udp({.dport = 7000}), kSemantics, kPass, "allow-rule",
         "slash28-to-web"},
        {"cidr selector: the same identity outside the /28",
         Packet().ipv4(v4(kClientOutside28, kWeb4)).udp({.dport = 7000}), kSemantics, kDrop,
         "deny-default"},
        {"deny from bad on any protocol", Packet().ipv4(v4(kBad4, kOpen4)).udp({.dport = 9}),
         kSemantics, kDrop, "deny-rule", "deny-bad"},
        {"deny from bad, non-first fragment",
         Packet().ipv4({.src = kBad4, .dst = kOpen4, .frag_offset = 10}).raw_l4(kProtoTcp)
             .payload(8, 0),
         kSemantics, kDrop, "deny-rule", "deny-bad"},
        {"two deny rules match: the first in file order is reported",
         Packet().ipv4(v4(kBad4, kOpen4)).tcp({.dport = 22}), kSemantics, kDrop, "deny-rule",
         "deny-ssh"},
        {"two deny rules match: the broader, earlier one is reported",
         Packet().ipv4(v4(kBad4, kOpen4)).tcp({.dport = 23}), kSemantics, kDrop, "deny-rule",
         "deny-bad"},
        {"two allow rules match: the first in file order is reported",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 8443}), kSemantics, kPass, "allow-rule",
         "web-all-tcp"},
        {"IPv4-mapped IPv6 addresses are their IPv4 addresses",
         Packet().ipv6({.src = "::ffff:203.0.113.9", .dst = "::ffff:198.51.100.2"})
             .tcp({.dport = 80}),
         kSemantics, kPass, "allow-rule", "web-all-tcp"},
        {"IPv4-mapped IPv6, denied port",
         Packet().ipv6({.src = "::ffff:203.0.113.9", .dst = "::ffff:198.51.100.2"})
             .tcp({.dport = 22}),
         kSemantics, kDrop, "deny-rule", "deny-ssh"},
    });
}

TEST_F(XdpTest, ANewPolicyReplacesTheOldOne)
{
    const std::string https = policy({allow_client_to_web("https", "tcp/443")});
    const std::string http = policy({allow_client_to_web("http", "tcp/80")});
    expect_all({
        {"https allowed", Packet().ipv4(kClientToWeb4).tcp({.dport = 443}), https, kPass,
         "allow-rule", "https"},
        {"http not yet", Packet().ipv4(kClientToWeb4).tcp({.dport = 80}), https, kDrop,
         "deny-default"},
        {"after the switch, http allowed", Packet().ipv4(kClientToWeb4).tcp({.dport = 80}), http,
         kPass, "allow-rule", "http"},
        {"after the switch, https no longer", Packet().ipv4(kClientToWeb4).tcp({.dport = 443}),
         http, kDrop, "deny-default"},
        {"and back", Packet().ipv4(kClientToWeb4).tcp({.dport = 443}), https, kPass, "allow-rule",
         "https"},
    });
}

// ---------------------------------------------------------------------------
// Field cases
// ---------------------------------------------------------------------------

// F1: a non-first IPv4 fragment carries payload where the ports would be.
TEST_F(FieldCase, NonFirstFragmentPayloadIsNotPorts)
{
    const std::string https = policy({allow_client_to_web("https", "tcp/443")});
    const std::string all_tcp = policy({allow_client_to_web("all-tcp", "tcp")});
    const std::string almost_all = policy({allow_client_to_web("almost-all", "tcp/1-65535")});
    const std::string all_udp = policy({allow_client_to_web("all-udp", "udp")});
    const std::string all_tcp_but_ssh = policy({
        "{name: no-ssh, from: any, to: any, ports: [tcp/22], action: deny}",
        allow_client_to_web("all-tcp", "tcp"),
    });
    auto fragment = [](Bytes payload, bool more = false) {
        return Packet()
            .ipv4({.src = kClient4, .dst = kWeb4, .frag_offset = 185, .more_fragments = more})
            .raw_l4(kProtoTcp)
            .payload(std::move(payload));
    };
    const Bytes looks_like_443 = {0x01, 0xbb, 0x01, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02};
    const Bytes looks_like_22 = {0x00, 0x16, 0x00, 0x16, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02};

    expect_all({
        {"offset 185, payload 01 BB 01 BB: no tracked first fragment", fragment(looks_like_443),
         https, kDrop, "deny-default"},
        {"offset 185, payload 00 16 00 16", fragment(looks_like_22), https, kDrop, "deny-default"},
        {"offset 185, MF set (a middle fragment)", fragment(looks_like_443, true), https, kDrop,
         "deny-default"},
        {"offset 185, one payload byte", fragment({0x01}), https, kDrop, "deny-default"},
        {"a rule allowing every TCP port lets it through", fragment(looks_like_443), all_tcp,
         kPass, "allow-rule", "all-tcp"},
        {"whatever the payload", fragment(looks_like_22), all_tcp, kPass, "allow-rule",
         "all-tcp"},
        {"tcp/1-65535 does not cover every port (port 0)", fragment(looks_like_443), almost_all,
         kDrop, "deny-default"},
        {"every UDP port is not every TCP port", fragment(looks_like_443), all_udp, kDrop,
         "deny-default"},
        {"a port-specific deny does not match a port-less fragment",
         fragment(looks_like_22), all_tcp_but_ssh, kPass, "allow-rule", "all-tcp"},
        {"first fragment to port 22",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true})
             .tcp({.dport = 22}).payload(1000, 0x01),
         https, kDrop, "deny-default"},
        {"first fragment to port 443",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true})
             .tcp({.dport = 443}).payload(1000, 0x01),
         https, kPass, "allow-rule", "https"},
    });

    // with tracking: the fragments of a first fragment that was allowed
    auto first = [](std::uint16_t id, std::uint16_t dport) {
        return Packet()
            .ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true, .id = id})
            .tcp({.dport = dport})
            .payload(1472, 0x01);
    };
    auto later = [&](std::uint16_t id, const char* src = kClient4) {
        Packet p = fragment(looks_like_22);
        return p.ipv4({.src = src, .dst = kWeb4, .frag_offset = 185, .id = id});
    };
    const bool keep_ids = true;
    expect_all({
        {"first fragment to 443, id 0x7001", first(0x7001, 443), https, kPass, "allow-rule",
         "https", keep_ids},
        {"its next fragment, whatever the payload: tracked", later(0x7001), https, kPass,
         "tracked", "", keep_ids},
        {"a fragment of another id: not tracked", later(0x7003), https, kDrop, "deny-default", "",
         keep_ids},
        {"the same id from another source: not tracked", later(0x7001, "203.0.113.10"), https,
         kDrop, "deny-default", "", keep_ids},
        {"first fragment to 22, id 0x7002", first(0x7002, 22), https, kDrop, "deny-default", "",
         keep_ids},
        {"its next fragment: its first was dropped", later(0x7002), https, kDrop, "deny-default",
         "", keep_ids},
    });
}

// F2: the last fragment of a 1501-byte echo request is one byte at offset 185.
TEST_F(FieldCase, TrailingIcmpFragmentShorterThanIcmpHeader)
{
    const std::string all_icmp = policy({allow_client_to_web("all-icmp", "icmp")});
    const std::string echo = policy({allow_client_to_web("echo", "icmp/8")});
    const Packet first = Packet()
                             .ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true})
                             .icmp({.type = 8})
                             .payload(1472, 0xab);  // 8 + 1472 = 1480 = 185 * 8
    // the one byte is 0x08, an echo request's type, for a parser that reads it
    const Packet trailing = Packet()
                                .ipv4({.src = kClient4, .dst = kWeb4, .frag_offset = 185})
                                .raw_l4(kProtoIcmp)
                                .payload({0x08});

    expect_all({
        {"first fragment, all icmp allowed", first, all_icmp, kPass, "allow-rule", "all-icmp"},
        {"trailing 1-byte fragment, all icmp allowed", trailing, all_icmp, kPass, "allow-rule",
         "all-icmp"},
        {"first fragment, echo allowed", first, echo, kPass, "allow-rule", "echo"},
        {"trailing fragment, only echo allowed: the port-less verdict", trailing, echo, kDrop,
         "deny-default"},
    });

    // with tracking: the trailing fragment of the allowed echo request
    const bool keep_ids = true;
    expect_all({
        {"first fragment, id 0x7101, echo allowed", Packet(first).flow_ids(0x51, 0x7101), echo,
         kPass, "allow-rule", "echo", keep_ids},
        {"its trailing 1-byte fragment: tracked", Packet(trailing).flow_ids(0x51, 0x7101), echo,
         kPass, "tracked", "", keep_ids},
    });
}

// F3: IPv6 fragments, behind a fragment header.
TEST_F(FieldCase, Ipv6FragmentHeader)
{
    const std::string everything = policy({allow_client_to_web("everything", "any")});
    const std::string echo = policy({allow_client_to_web("echo", "icmpv6/128")});
    const std::string all_icmpv6 = policy({allow_client_to_web("all-icmpv6", "icmpv6")});
    const std::string https = policy({allow_client_to_web("https", "tcp/443")});
    const Packet first =
        Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::fragment(0, true)).icmpv6({.type = 128})
            .payload(1224, 0xab);  // 8 + 1224 = 1232 = 154 * 8
    const Packet second = Packet()
                              .ipv6(kClientToWeb6)
                              .ext(Ipv6Ext::fragment(154, false))
                              .raw_l4(kProtoIcmpv6)
                              .payload(16, 0xab);

    expect_all({
        {"first fragment, everything allowed", first, everything, kPass, "allow-rule",
         "everything"},
        {"second fragment, everything allowed: no parse gap counted as a deny", second,
         everything, kPass, "allow-rule", "everything"},
        {"first fragment matched as ICMPv6 echo behind the fragment header", first, echo, kPass,
         "allow-rule", "echo"},
        {"first fragment of an echo reply: the type is read",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::fragment(0, true)).icmpv6({.type = 129})
             .payload(64, 0),
         echo, kDrop, "deny-default"},
        {"second fragment, only echo allowed: port-less", second, echo, kDrop, "deny-default"},
        {"second fragment, all icmpv6 allowed", second, all_icmpv6, kPass, "allow-rule",
         "all-icmpv6"},
        {"atomic fragment is unfragmented: port 443",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::fragment(0, false)).tcp({.dport = 443}), https,
         kPass, "allow-rule", "https"},
        {"atomic fragment is unfragmented: port 22",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::fragment(0, false)).tcp({.dport = 22}), https,
         kDrop, "deny-default"},
        {"fragment header cut short is malformed, not a policy deny",
         Packet()
             .ipv6({.src = kClient6, .dst = kWeb6, .payload_length = 4})
             .ext(Ipv6Ext::fragment(0, true))
             .icmpv6({.type = 128}),
         everything, kDrop, "malformed"},
    });
    // with tracking: the second fragment of the allowed first one
    const bool keep_ids = true;
    expect_all({
        {"first fragment, id 0x7201, echo allowed", Packet(first).flow_ids(0x52, 0x7201), echo,
         kPass, "allow-rule", "echo", keep_ids},
        {"its second fragment: tracked", Packet(second).flow_ids(0x52, 0x7201), echo, kPass,
         "tracked", "", keep_ids},
        {"a second fragment of another id", Packet(second).flow_ids(0x52, 0x7202), echo, kDrop,
         "deny-default", "", keep_ids},
    });
}

// X1: AH is (len + 2) * 4 bytes, every other extension header (len + 1) * 8.
TEST_F(FieldCase, AhSizesDifferently)
{
    const std::string http = policy({allow_client_to_web("http", "tcp/80")});
    // TCP sequence 0x00500050: a walker that sized AH as 40 bytes would read
    // it where the ports are
    auto syn = [](std::uint16_t dport) {
        return Tcp{.dport = dport, .flags = kTcpSyn, .seq = 0x00500050};
    };
    expect_all({
        {"AH length 4 (24 bytes), hop-by-hop (8 bytes), TCP SYN to 80",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::ah(4)).ext(Ipv6Ext::hop_by_hop()).tcp(syn(80)),
         http, kPass, "allow-rule", "http"},
        {"the same to port 22",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::ah(4)).ext(Ipv6Ext::hop_by_hop()).tcp(syn(22)),
         http, kDrop, "deny-default"},
        {"hop-by-hop then AH length 4",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::hop_by_hop()).ext(Ipv6Ext::ah(4)).tcp(syn(80)),
         http, kPass, "allow-rule", "http"},
        {"AH length 7 (36 bytes, not a multiple of 8)",
         Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::ah(7)).tcp(syn(80)), http, kPass, "allow-rule",
         "http"},
        {"AH length 7, port 22", Packet().ipv6(kClientToWeb6).ext(Ipv6Ext::ah(7)).tcp(syn(22)),
         http, kDrop, "deny-default"},
    });
}

// X2: the walker reads and never writes. send() checks the bytes of every
// frame of every test; this is the field case's own shape.
TEST_F(FieldCase, WalkerNeverWritesThePacket)
{
    const std::string echo = policy({allow_client_to_web("echo", "icmpv6/128")});
    auto echo_packet = [](std::uint8_t type) {
        return Packet()
            .ipv6(kClientToWeb6)
            .ext(Ipv6Ext::hop_by_hop())
            .icmpv6({.type = type})
            .payload(56, 0x5a);
    };
    // two flows (echo ids), so the reply is judged by policy, not tracked
    const Packet request = echo_packet(128).flow_ids(0x61, 1);
    const Packet reply = echo_packet(129).flow_ids(0x62, 2);
    apply(echo);

    for (const Packet* p : {&request, &reply}) {
        SCOPED_TRACE(p->describe());
        Bytes frame = p->bytes();
        XdpRun run = run_xdp(prog_fd_, frame);
        EXPECT_EQ(run.data, frame);
        EXPECT_EQ(run.retval, p == &request ? kPass : kDrop);
    }
}

// L1: a third VLAN tag is deeper than the parser walks.
TEST_F(FieldCase, VlanNestingBeyondParser)
{
    const std::string no_ssh = policy({
        "{name: deny-ssh, from: any, to: {app: web}, ports: [tcp/22], action: deny}",
        allow_client_to_web("web-tcp", "tcp"),
    });
    auto tagged = [](std::vector<std::uint16_t> tpids, std::uint16_t dport) {
        Packet p;
        std::uint16_t vid = 100;
        for (std::uint16_t tpid : tpids)
            p.vlan(vid++, tpid);
        return p.ipv4(kClientToWeb4).tcp({.dport = dport});
    };
    expect_all({
        {"802.1ad, 802.1Q, 802.1Q, port 22", tagged({kTpid8021ad, kTpid8021Q, kTpid8021Q}, 22),
         no_ssh, kDrop, "malformed"},
        {"802.1ad, 802.1Q, 802.1Q, port 443: too deep is never passed",
         tagged({kTpid8021ad, kTpid8021Q, kTpid8021Q}, 443), no_ssh, kDrop, "malformed"},
        {"802.1ad, 802.1ad, 802.1Q", tagged({kTpid8021ad, kTpid8021ad, kTpid8021Q}, 443), no_ssh,
         kDrop, "malformed"},
        {"four tags", tagged({kTpid8021Q, kTpid8021Q, kTpid8021Q, kTpid8021Q}, 443), no_ssh, kDrop,
         "malformed"},
        {"one 802.1Q tag, port 22: classified, denied by the rule", tagged({kTpid8021Q}, 22),
         no_ssh, kDrop, "deny-rule", "deny-ssh"},
        {"802.1ad, 802.1Q, port 22: classified, denied by the rule",
         tagged({kTpid8021ad, kTpid8021Q}, 22), no_ssh, kDrop, "deny-rule", "deny-ssh"},
        {"802.1ad, 802.1Q, port 443", tagged({kTpid8021ad, kTpid8021Q}, 443), no_ssh, kPass,
         "allow-rule", "web-tcp"},
        {"untagged, port 22", tagged({}, 22), no_ssh, kDrop, "deny-rule", "deny-ssh"},
    });
}

// L2: IPv4 options move the transport header.
TEST_F(FieldCase, Ipv4OptionsShiftTransportHeader)
{
    const std::string https = policy({allow_client_to_web("https", "tcp/443")});
    auto with_options = [](Bytes options, std::uint16_t dport) {
        return Packet().ipv4({.src = kClient4, .dst = kWeb4, .options = std::move(options)})
            .tcp({.dport = dport});
    };
    auto ihl = [](std::uint8_t value) {
        return Packet().ipv4({.src = kClient4, .dst = kWeb4, .ihl = value}).tcp({.dport = 443});
    };
    expect_all({
        {"IHL 6, option 94 04 01 BB, real port 22", with_options({0x94, 0x04, 0x01, 0xbb}, 22),
         https, kDrop, "deny-default"},
        {"IHL 6, option 94 04 00 00, real port 443", with_options({0x94, 0x04, 0x00, 0x00}, 443),
         https, kPass, "allow-rule", "https"},
        {"IHL 4", ihl(4), https, kDrop, "malformed"},
        {"IHL 0", ihl(0), https, kDrop, "malformed"},
        {"IHL 1", ihl(1), https, kDrop, "malformed"},
        {"total length 19, shorter than the header",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 19}).tcp({.dport = 443}),
         https, kDrop, "malformed"},
        {"IHL 6, total length 20",
         Packet()
             .ipv4({.src = kClient4, .dst = kWeb4, .options = {0x94, 0x04, 0, 0},
                    .total_length = 20})
             .tcp({.dport = 443}),
         https, kDrop, "malformed"},
        {"frame ends 6 bytes into the TCP header",
         Packet().ipv4(kClientToWeb4).tcp({.dport = 443}).truncate_in_l4(6), https, kDrop,
         "malformed"},
        {"frame and total length end 6 bytes into the TCP header",
         Packet().ipv4({.src = kClient4, .dst = kWeb4, .total_length = 26}).tcp({.dport = 443})
             .truncate_in_l4(6),
         https, kDrop, "malformed"},
        {"IHL 6, frame ends 6 bytes into the TCP header",
         with_options({0x94, 0x04, 0x00, 0x00}, 443).truncate_in_l4(6), https, kDrop,
         "malformed"},
    });
}

// I3: neighbour discovery keeps working under default deny.
TEST_F(FieldCase, NeighbourDiscoverySurvivesDefaultDeny)
{
    const std::string base = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
failsafe: {enabled: false}
identities:
  - {name: lan, labels: {net: lan}, cidrs: ["fe80::/10", "ff00::/8"], ingress: enforce}
  - {name: watched, labels: {net: watched}, cidrs: ["2001:db8::5/128"], ingress: audit}
)";
    const std::string no_rules = base;
    const std::string echo_allowed =
        base + "rules:\n  - {name: echo, from: any, to: any, ports: [icmpv6/128], action: allow}\n";
    const std::string ns_denied =
        base +
        "rules:\n  - {name: deny-ns, from: any, to: any, ports: [icmpv6/135], action: deny}\n";

    auto nd = [](std::uint8_t type, const char* src, const char* dst,
                 std::uint8_t hop_limit = 255) {
        return Packet()
            .ipv6({.src = src, .dst = dst, .hop_limit = hop_limit})
            .icmpv6({.type = type, .id = 0, .seq = 0})
            .payload(16, 0);  // target address (NS, NA) or options
    };
    const char* sol_node = "ff02::1:ff00:5";
    expect_all({
        {"neighbour solicitation, hop limit 255", nd(135, "fe80::1", sol_node), no_rules, kPass,
         "neighbour-discovery"},
        {"neighbour advertisement", nd(136, "fe80::5", "fe80::1"), no_rules, kPass,
         "neighbour-discovery"},
        {"router solicitation", nd(133, "fe80::1", "ff02::2"), no_rules, kPass,
         "neighbour-discovery"},
        {"router advertisement", nd(134, "fe80::1", "ff02::1"), no_rules, kPass,
         "neighbour-discovery"},
        {"solicitation to a global address", nd(135, "2001:db8::9", "2001:db8::7"), no_rules,
         kPass, "neighbour-discovery"},
        {"solicitation behind a hop-by-hop header",
         Packet()
             .ipv6({.src = "fe80::1", .dst = sol_node, .hop_limit = 255})
             .ext(Ipv6Ext::hop_by_hop())
             .icmpv6({.type = 135, .id = 0, .seq = 0})
             .payload(16, 0),
         no_rules, kPass, "neighbour-discovery"},
        {"solicitation to an audited identity: not policed, not audited",
         nd(135, "fe80::1", "2001:db8::5"), no_rules, kPass, "neighbour-discovery"},
        {"echo request stays governed by policy", nd(128, "fe80::1", sol_node), no_rules, kDrop,
         "deny-default"},
        {"solicitation with hop limit 254 is not special", nd(135, "fe80::1", sol_node, 254),
         no_rules, kDrop, "deny-default"},
        {"advertisement with hop limit 1 is not special", nd(136, "fe80::5", "fe80::1", 1),
         no_rules, kDrop, "deny-default"},
        {"echo allowed by a rule", nd(128, "fe80::1", sol_node), echo_allowed, kPass,
         "allow-rule", "echo"},
        {"solicitation still passes with unrelated rules", nd(135, "fe80::1", sol_node),
         echo_allowed, kPass, "neighbour-discovery"},
        {"an explicit deny rule denies solicitations", nd(135, "fe80::1", sol_node), ns_denied,
         kDrop, "deny-rule", "deny-ns"},
        {"the deny names type 135 only", nd(136, "fe80::5", "fe80::1"), ns_denied, kPass,
         "neighbour-discovery"},
    });
}

// P1: prefix length zero, on either side of a rule.
TEST_F(FieldCase, PrefixLengthZero)
{
    const std::string head = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
failsafe: {enabled: false}
identities:
  - {name: web, labels: {app: web}, cidrs: [198.51.100.2/32, "2001:db8::2/128"], ingress: enforce}
rules:
)";
    const std::string from_everywhere = head + R"(  - name: from-everywhere
    from: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
    to: {app: web}
    ports: [tcp/443]
    action: allow
)";
    const std::string to_everywhere = head + R"(  - name: to-everywhere
    from: any
    to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
    ports: [tcp/443]
    action: allow
)";
    auto tcp4 = [](const char* src, const char* dst, std::uint16_t port) {
        return Packet().ipv4({.src = src, .dst = dst}).tcp({.dport = port});
    };
    auto tcp6 = [](const char* src, const char* dst, std::uint16_t port) {
        return Packet().ipv6({.src = src, .dst = dst}).tcp({.dport = port});
    };
    expect_all({
        {"from 203.0.113.10 to web, 443", tcp4("203.0.113.10", kWeb4, 443), from_everywhere, kPass,
         "allow-rule", "from-everywhere"},
        {"from 203.0.113.10 to web, 80", tcp4("203.0.113.10", kWeb4, 80), from_everywhere, kDrop,
         "deny-default"},
        {"from 2001:db8::10 to web, 443", tcp6("2001:db8::10", kWeb6, 443), from_everywhere, kPass,
         "allow-rule", "from-everywhere"},
        {"from 2001:db8::10 to web, 80", tcp6("2001:db8::10", kWeb6, 80), from_everywhere, kDrop,
         "deny-default"},
        {"from a workload's own address", tcp4(kWeb4, kWeb4, 443), from_everywhere, kPass,
         "allow-rule", "from-everywhere"},
        {"to 203.0.113.10, 443", tcp4(kWeb4, "203.0.113.10", 443), to_everywhere, kPass,
         "allow-rule", "to-everywhere"},
        {"to 203.0.113.10, 80", tcp4(kWeb4, "203.0.113.10", 80), to_everywhere, kDrop,
         "deny-default"},
        {"to 2001:db8::10, 443", tcp6(kWeb6, "2001:db8::10", 443), to_everywhere, kPass,
         "allow-rule", "to-everywhere"},
        {"to 2001:db8::10, 80", tcp6(kWeb6, "2001:db8::10", 80), to_everywhere, kDrop,
         "deny-default"},
        {"to web itself, 443", tcp4("203.0.113.10", kWeb4, 443), to_everywhere, kPass,
         "allow-rule", "to-everywhere"},
    });
}

// K1: byte order of ports (a range) and of prefixes.
TEST_F(FieldCase, ByteOrderOfPortsAndPrefixes)
{
    const std::string yaml = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
failsafe: {enabled: false}
identities:
  - {name: net, labels: {app: net}, cidrs: [198.51.100.0/24], ingress: enforce}
  - {name: srv, labels: {app: srv}, cidrs: [203.0.113.5/32], ingress: enforce}
rules:
  - {name: range, from: any, to: {app: net}, ports: [tcp/1000-2000], action: allow}
  - {name: from-net, from: {app: net}, to: {app: srv}, ports: [udp/53], action: allow}
)";
    auto to_net = [](const char* dst, std::uint16_t port) {
        return Packet().ipv4({.src = "203.0.113.77", .dst = dst}).tcp({.dport = port});
    };
    auto from = [](const char* src) {
        return Packet().ipv4({.src = src, .dst = "203.0.113.5"}).udp({.dport = 53});
    };
    expect_all({
        {"port 1280 (bytes 05 00)", to_net("198.51.100.7", 1280), yaml, kPass, "allow-rule",
         "range"},
        {"port 5 (bytes 00 05)", to_net("198.51.100.7", 5), yaml, kDrop, "deny-default"},
        {"port 999", to_net("198.51.100.7", 999), yaml, kDrop, "deny-default"},
        {"port 1000", to_net("198.51.100.7", 1000), yaml, kPass, "allow-rule", "range"},
        {"port 2000", to_net("198.51.100.7", 2000), yaml, kPass, "allow-rule", "range"},
        {"port 2001", to_net("198.51.100.7", 2001), yaml, kDrop, "deny-default"},
        {"port 53255 (bytes d0 07, 2000 swapped)", to_net("198.51.100.7", 0xd007), yaml, kDrop,
         "deny-default"},
        {"destination 198.51.100.7 is in 198.51.100.0/24", to_net("198.51.100.7", 1280), yaml,
         kPass, "allow-rule", "range"},
        {"destination 0.100.51.198 is not", to_net("0.100.51.198", 1280), yaml, kDrop,
         "deny-default"},
        {"source 198.51.100.7 is in the /24", from("198.51.100.7"), yaml, kPass, "allow-rule",
         "from-net"},
        {"source 0.100.51.198 is not", from("0.100.51.198"), yaml, kDrop, "deny-default"},
    });

    // the /24 as the library wrote it: prefixlen counts bits of the mapped
    // form, the address is in network order
    BpfFd lpm = active_inner_map(dp(), "bh_ipc_lpm");
    bool found = false;
    for (const auto& [key, info] : dump_map<bh_ipcache_lpm_key, bh_identity_info>(lpm.get())) {
        const auto& b = key.addr.bytes;
        if (key.prefixlen == 96 + 24 && b[10] == 0xff && b[11] == 0xff && b[12] == 198 &&
            b[13] == 51 && b[14] == 100 && b[15] == 0) {
            found = true;
            EXPECT_EQ(info.ingress_mode, BH_MODE_ENFORCE);
        }
    }
    EXPECT_TRUE(found) << "no LPM entry ::ffff:198.51.100.0/120 in the IP cache";
}

// K2: a key built over garbage, with its padding zeroed, is found from BPF.
TEST_F(FieldCase, PaddingInKeys)
{
    static_assert(std::has_unique_object_representations_v<bh_policy_key>,
                  "bh_policy_key has implicit padding");
    static_assert(std::has_unique_object_representations_v<bh_policy_value>,
                  "bh_policy_value has implicit padding");
    static_assert(offsetof(bh_policy_key, pad) + 1 == offsetof(bh_policy_key, port));

    const std::uint16_t kProbePorts[] = {8080, 8081, 9000};
    apply(policy({allow_client_to_web("probe", "udp/53")}));
    ASSERT_EQ(send(Packet().ipv4(kClientToWeb4).tcp({.dport = 8080})).action, kDrop);

    // the identities and rule id the compiled tables gave
    BpfFd hosts = active_inner_map(dp(), "bh_ipc_host");
    BpfFd prefixes = active_inner_map(dp(), "bh_ipc_lpm");
    BpfFd policy_map = active_inner_map(dp(), "bh_policy");
    bh_ipcache_host_key web_key{};
    web_key.addr.bytes[10] = web_key.addr.bytes[11] = 0xff;
    inet_pton(AF_INET, kWeb4, &web_key.addr.bytes[12]);
    bh_identity_info web{};
    ASSERT_EQ(bpf_map_lookup_elem(hosts.get(), &web_key, &web), 0) << "web in bh_ipc_host";
    bh_ipcache_lpm_key client_key{};
    client_key.prefixlen = 128;
    client_key.addr = web_key.addr;
    inet_pton(AF_INET, kClient4, &client_key.addr.bytes[12]);
    bh_identity_info client{};
    ASSERT_EQ(bpf_map_lookup_elem(prefixes.get(), &client_key, &client), 0)
        << "client in bh_ipc_lpm";
    auto entries = dump_map<bh_policy_key, bh_policy_value>(policy_map.get());
    ASSERT_FALSE(entries.empty());
    std::uint32_t probe_rule = entries.front().second.rule_id;

    // written from userspace on a stack object full of 0xAA, field by field
    for (std::uint16_t port : kProbePorts) {
        bh_policy_key key;
        std::memset(&key, 0xaa, sizeof(key));
        key.prefixlen = BH_POLICY_PREFIX_FULL;
        key.dst_id = htonl(web.id);
        key.src_id = htonl(client.id);
        key.proto = kProtoTcp;
        key.pad = 0;
        key.port = htons(port);
        bh_policy_value value;
        std::memset(&value, 0xaa, sizeof(value));
        value.rule_id = probe_rule;
        value.action = BH_ACTION_ALLOW;
        std::memset(value.pad, 0, sizeof(value.pad));
        ASSERT_EQ(bpf_map_update_elem(policy_map.get(), &key, &value, BPF_ANY), 0)
            << "write key for port " << port;
    }

    // looked up from BPF: found every time
    for (std::uint16_t port : kProbePorts) {
        SCOPED_TRACE(fmt::format("port {}", port));
        for (int i = 0; i < 10; i++) {
            auto sport = static_cast<std::uint16_t>(40000 + i);
            Outcome out = send(Packet().ipv4(kClientToWeb4).tcp({.sport = sport, .dport = port}));
            EXPECT_EQ(out.action, kPass);
            EXPECT_EQ(out.reason, "allow-rule");
            EXPECT_EQ(out.rule, "probe");
        }
    }
    Outcome other = send(Packet().ipv4(kClientToWeb4).tcp({.dport = 8082}));
    EXPECT_EQ(other.action, kDrop) << "a port nobody wrote";
}

// K3: per-CPU counters over all possible CPUs, 64 bits wide.
TEST_F(FieldCase, PerCpuValuesAndWideCounters)
{
    // a denied packet: a burst of one allowed flow could count as tracked
    apply(policy({"{name: no-telnet, from: any, to: {app: web}, ports: [tcp/23], action: deny}"}));
    const Packet denied = Packet().ipv4(kClientToWeb4).tcp({.dport = 23});

    // run on CPU 0, whose slot we preset
    cpu_set_t old_mask;
    ASSERT_EQ(sched_getaffinity(0, sizeof(old_mask), &old_mask), 0);
    cpu_set_t cpu0;
    CPU_ZERO(&cpu0);
    CPU_SET(0, &cpu0);
    ASSERT_EQ(sched_setaffinity(0, sizeof(cpu0), &cpu0), 0);
    struct RestoreAffinity {
        cpu_set_t mask;
        ~RestoreAffinity() { sched_setaffinity(0, sizeof(mask), &mask); }
    } restore{old_mask};

    PerCpuCounters reasons(dp().map_fd("bh_reason_cnt"));  // sized by possible CPUs
    std::vector<bh_counter> values = reasons.read(BH_REASON_DENY_RULE);
    values[0].packets = 0xfffffff0u;
    reasons.write(BH_REASON_DENY_RULE, values);

    Stats before = dp().stats();
    XdpRun run = run_xdp(prog_fd_, denied.bytes(), 32);
    Stats after = dp().stats();
    ASSERT_EQ(run.retval, kDrop);

    CounterDelta delta = counter_delta(before, after);
    EXPECT_EQ(moved_one(delta.reasons, 32), "deny-rule");
    EXPECT_EQ(moved_one(delta.rules, 32), "no-telnet");
    std::uint64_t total = 0;
    for (const auto& [name, counter] : after.reasons) {
        if (name == "deny-rule")
            total = counter.packets;
    }
    EXPECT_GT(total, 0xffffffffull) << "the sum wrapped at 32 bits";
    EXPECT_EQ(total, reasons.sum(BH_REASON_DENY_RULE).packets)
        << "stats() must sum every possible CPU";
    EXPECT_EQ(reasons.read(BH_REASON_DENY_RULE)[0].packets, 0xfffffff0ull + 32);
}

// M1: a policy one entry larger than its table.
TEST_F(FieldCase, PolicyLargerThanMap)
{
    options_.max_policy_entries = 1024;

    // n single-port rules client -> web compile to n + c entries; find c
    auto many_ports = [](int n) {
        std::vector<std::string> rules;
        for (int i = 0; i < n; i++)
            rules.push_back(allow_client_to_web(fmt::format("p{}", i),
                                                fmt::format("tcp/{}", 10000 + i)));
        return policy(rules);
    };
    ApplyResult one = apply(many_ports(1));
    ASSERT_GE(one.policy_entries, 1u);
    int overhead = static_cast<int>(one.policy_entries) - 1;
    int fits = 1024 - overhead;

    ApplyResult full = apply(many_ports(fits));
    ASSERT_EQ(full.policy_entries, 1024u) << "entries are not n + " << overhead;
    const Packet last_fitting = Packet().ipv4(kClientToWeb4).tcp(
        {.dport = static_cast<std::uint16_t>(10000 + fits - 1)});
    const Packet one_more = Packet().ipv4(kClientToWeb4).tcp(
        {.dport = static_cast<std::uint16_t>(10000 + fits)});
    EXPECT_EQ(send(last_fitting).action, kPass);
    EXPECT_EQ(send(one_more).action, kDrop);
    std::uint64_t generation = current_generation(dp());

    try {
        apply(many_ports(fits + 1));
        ADD_FAILURE() << "a policy of 1025 entries was committed into a table of 1024";
    } catch (const Error& e) {
        std::string what = e.what();
        RecordProperty("error", what);
        EXPECT_NE(what.find("bh_policy"), std::string::npos) << what;
        EXPECT_NE(what.find("1024"), std::string::npos) << what;
        EXPECT_TRUE(what.find("max_policy_entries") != std::string::npos ||
                    what.find("max-policy-entries") != std::string::npos)
            << what;
    }

    // the previous generation is still in force, whole
    EXPECT_EQ(current_generation(dp()), generation);
    Outcome still = send(Packet(last_fitting).flow_ids(40001, 2));  // a new flow
    EXPECT_EQ(still.action, kPass);
    EXPECT_EQ(still.rule, fmt::format("p{}", fits - 1));
    Outcome not_added = send(Packet(one_more).flow_ids(40001, 2));
    EXPECT_EQ(not_added.action, kDrop);
    EXPECT_EQ(not_added.reason, "deny-default");
    ASSERT_TRUE(dp().current_policy().has_value());
    EXPECT_EQ(dp().current_policy()->rules.size(), static_cast<std::size_t>(fits));
}

// ---------------------------------------------------------------------------
// The shared header against the compiled object
// ---------------------------------------------------------------------------

struct Member {
    const char* name;
    std::size_t offset;
    std::size_t size;
};

struct StructLayout {
    const char* name;
    std::size_t size;
    std::vector<Member> members;
};

#define BH_MEMBER(type, field) \
    Member { #field, offsetof(type, field), sizeof(type::field) }

TEST(AbiLayout, SharedStructsMatchTheObjectBtf)
{
    const std::vector<StructLayout> layouts = {
        {"bh_policy_key", sizeof(bh_policy_key),
         {BH_MEMBER(bh_policy_key, prefixlen), BH_MEMBER(bh_policy_key, dst_id),
          BH_MEMBER(bh_policy_key, src_id), BH_MEMBER(bh_policy_key, proto),
          BH_MEMBER(bh_policy_key, pad), BH_MEMBER(bh_policy_key, port)}},
        {"bh_policy_value", sizeof(bh_policy_value),
         {BH_MEMBER(bh_policy_value, rule_id), BH_MEMBER(bh_policy_value, action),
          BH_MEMBER(bh_policy_value, pad)}},
        {"bh_ipcache_lpm_key", sizeof(bh_ipcache_lpm_key),
         {BH_MEMBER(bh_ipcache_lpm_key, prefixlen), BH_MEMBER(bh_ipcache_lpm_key, addr)}},
        {"bh_ipcache_host_key", sizeof(bh_ipcache_host_key),
         {BH_MEMBER(bh_ipcache_host_key, addr)}},
        {"bh_addr", sizeof(bh_addr), {BH_MEMBER(bh_addr, bytes)}},
        {"bh_identity_info", sizeof(bh_identity_info),
         {BH_MEMBER(bh_identity_info, id), BH_MEMBER(bh_identity_info, ingress_mode),
          BH_MEMBER(bh_identity_info, egress_mode), BH_MEMBER(bh_identity_info, flags),
          BH_MEMBER(bh_identity_info, pad)}},
        {"bh_gen_config", sizeof(bh_gen_config),
         {BH_MEMBER(bh_gen_config, world_ingress_mode), BH_MEMBER(bh_gen_config, world_egress_mode),
          BH_MEMBER(bh_gen_config, pad)}},
        {"bh_gen_ctl", sizeof(bh_gen_ctl), {BH_MEMBER(bh_gen_ctl, generation)}},
        {"bh_counter", sizeof(bh_counter),
         {BH_MEMBER(bh_counter, packets), BH_MEMBER(bh_counter, bytes)}},
    };

    std::size_t size = 0;
    const void* elf = bulkhead_bpf__elf_bytes(&size);
    bpf_object_open_opts opts;
    std::memset(&opts, 0, sizeof(opts));
    opts.sz = sizeof(opts);
    opts.object_name = "bulkhead_bpf";
    bpf_object* obj = bpf_object__open_mem(elf, size, &opts);
    ASSERT_NE(obj, nullptr) << "bpf_object__open_mem: " << std::strerror(errno);
    std::unique_ptr<bpf_object, void (*)(bpf_object*)> owner(obj, bpf_object__close);
    const btf* types = bpf_object__btf(obj);
    ASSERT_NE(types, nullptr) << "the object carries no BTF";

    for (const StructLayout& layout : layouts) {
        SCOPED_TRACE(layout.name);
        int id = btf__find_by_name_kind(types, layout.name, BTF_KIND_STRUCT);
        ASSERT_GT(id, 0) << "struct " << layout.name << " is not in the object's BTF";
        const btf_type* t = btf__type_by_id(types, static_cast<std::uint32_t>(id));
        EXPECT_EQ(t->size, layout.size) << "sizeof";
        ASSERT_EQ(btf_vlen(t), layout.members.size()) << "member count";

        const btf_member* m = btf_members(t);
        for (std::size_t i = 0; i < layout.members.size(); i++) {
            const Member& want = layout.members[i];
            SCOPED_TRACE(want.name);
            EXPECT_STREQ(btf__name_by_offset(types, m[i].name_off), want.name);
            EXPECT_EQ(btf_member_bit_offset(t, static_cast<std::uint32_t>(i)), want.offset * 8);
            EXPECT_EQ(btf_member_bitfield_size(t, static_cast<std::uint32_t>(i)), 0u);
            EXPECT_EQ(btf__resolve_size(types, m[i].type), static_cast<long>(want.size));
        }
    }
}

#undef BH_MEMBER

TEST(AbiLayout, SharedStructsHaveNoImplicitPadding)
{
    static_assert(std::has_unique_object_representations_v<bh_addr>);
    static_assert(std::has_unique_object_representations_v<bh_ipcache_host_key>);
    static_assert(std::has_unique_object_representations_v<bh_ipcache_lpm_key>);
    static_assert(std::has_unique_object_representations_v<bh_identity_info>);
    static_assert(std::has_unique_object_representations_v<bh_policy_key>);
    static_assert(std::has_unique_object_representations_v<bh_policy_value>);
    static_assert(std::has_unique_object_representations_v<bh_gen_config>);
    static_assert(std::has_unique_object_representations_v<bh_gen_ctl>);
    static_assert(std::has_unique_object_representations_v<bh_counter>);
    SUCCEED();
}

}  // namespace
}  // namespace bulkhead::test
