// The reference evaluator, case by case against DESIGN.md "Concepts": which
// identity an address has, what each selector form matches, deny precedence,
// modes and audit, ports and port-less flows, neighbour discovery.
#include <bulkhead/reference.hpp>

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace bulkhead {
namespace {

IpAddr addr(std::string_view text)
{
    std::optional<IpAddr> parsed = IpAddr::parse(text);
    EXPECT_TRUE(parsed.has_value()) << text;
    return parsed.value_or(IpAddr{});
}

// One flow and the verdict it must get, written as "KIND REASON RULE" with
// "-" for no rule, so a failure shows both sides in words.
struct FlowCase {
    std::string description;
    std::string src;
    std::string dst;
    // as in a policy file, exact: "tcp/443", "icmp/8/0". A protocol alone
    // ("tcp", "icmp") is a flow without a port; "tcp/443 fragment" is one
    // too, whose payload happens to read 443 where a port would be.
    std::string port;
    std::string expected;
    Direction direction = Direction::ingress;
    bool neighbour_discovery = false;
};

Flow make_flow(const FlowCase& c)
{
    constexpr std::string_view fragment = " fragment";
    std::string_view port = c.port;
    bool is_fragment = port.ends_with(fragment);
    if (is_fragment)
        port.remove_suffix(fragment.size());

    std::optional<PortSpec> spec = PortSpec::parse(port);
    EXPECT_TRUE(spec.has_value()) << c.port;
    Flow flow;
    flow.src = addr(c.src);
    flow.dst = addr(c.dst);
    flow.proto = static_cast<std::uint8_t>(spec->proto);
    flow.has_port = spec->lo == spec->hi && !is_fragment;
    flow.port = spec->lo == spec->hi ? spec->lo : 0;
    flow.neighbour_discovery = c.neighbour_discovery;
    return flow;
}

std::string show(const Verdict& verdict)
{
    return std::string(to_string(verdict.kind)) + " " + std::string(to_string(verdict.reason)) +
           " " + verdict.rule.value_or("-");
}

void expect_verdicts(const Policy& policy, const std::vector<FlowCase>& cases,
                     const std::vector<Prefix>& host_addrs = {})
{
    for (const auto& c : cases) {
        SCOPED_TRACE(c.description);
        Verdict verdict = reference_verdict(policy, make_flow(c), c.direction, host_addrs);
        EXPECT_EQ(show(verdict), c.expected)
            << c.src << " -> " << c.dst << " " << c.port
            << (c.direction == Direction::egress ? " at egress" : " at ingress");
        // the reference evaluator has no datapath numbering
        EXPECT_EQ(verdict.src_identity, 0u);
        EXPECT_EQ(verdict.dst_identity, 0u);
    }
}

std::vector<Prefix> prefixes(std::initializer_list<std::string_view> texts)
{
    std::vector<Prefix> out;
    for (std::string_view text : texts)
        out.push_back(Prefix::parse(text).value());
    return out;
}

// ---- identity of an address -------------------------------------------------

const char* const identities_policy = R"(apiVersion: bulkhead/v1
identities:
  - name: web
    labels: {app: web}
    cidrs: [198.51.100.0/28, "2001:db8::/64"]
  - name: web-canary
    labels: {app: web, env: canary}
    cidrs: [198.51.100.7/32]
  - name: db
    labels: {app: db}
    cidrs: [198.51.100.20/32]
)";

struct IdentityCase {
    std::string addr;
    std::vector<Prefix> host_addrs;
    int expected;  // index into identities, -1 world, -2 host
};

TEST(ReferenceIdentity, LongestPrefixThenHostThenWorld)
{
    Policy policy = Policy::parse(identities_policy);
    const std::vector<IdentityCase> cases = {
        {"198.51.100.8", {}, 0},
        {"198.51.100.7", {}, 1},  // the /32 inside web's /28 wins
        {"::ffff:198.51.100.7", {}, 1},
        {"2001:db8::5", {}, 0},
        {"2001:db8:1::5", {}, -1},
        {"198.51.100.20", {}, 2},
        {"198.51.100.100", {}, -1},
        {"203.0.113.1", prefixes({"203.0.113.1/32"}), -2},
        {"::ffff:203.0.113.1", prefixes({"203.0.113.1"}), -2},
        // host addresses yield to a policy prefix at least as long
        {"198.51.100.20", prefixes({"198.51.100.20/32"}), 2},
        {"198.51.100.3", prefixes({"198.51.100.3/32"}), -2},
        {"198.51.100.3", prefixes({"198.51.100.0/24"}), 0},
        {"198.51.100.100", prefixes({"198.51.100.0/24"}), -2},
    };
    for (const auto& c : cases) {
        EXPECT_EQ(reference_identity_of(policy, addr(c.addr), c.host_addrs), c.expected)
            << c.addr;
    }
}

// ---- selector forms ---------------------------------------------------------

const char* const selectors_policy = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
identities:
  - name: web
    labels: {app: web, env: prod}
    cidrs: [198.51.100.0/28, "2001:db8::/64"]
  - name: web-canary
    labels: {app: web, env: canary}
    cidrs: [198.51.100.7/32]
  - name: cache
    labels: {app: cache, env: prod}
    cidrs: [198.51.100.30/32]
rules:
  - name: subnet-to-cache
    from: {cidr: 198.51.100.0/24}
    to: {app: cache}
    ports: [tcp/6379]
    action: allow
  - name: canary-to-prod
    from: {env: canary}
    to: {app: [web, cache], env: prod}
    ports: [tcp/80]
    action: allow
  - name: world-to-web
    from: world
    to: {app: web}
    ports: [tcp/443]
    action: allow
  - name: host-ssh
    from: host
    to: any
    ports: [tcp/22]
    action: allow
  - name: dns-from-anyone
    from: any
    to: {app: cache}
    ports: [udp/53]
    action: allow
  - name: mail-out
    from: [{app: web, env: prod}, {cidr: "2001:db8:1::/48"}]
    to: {cidr: 203.0.113.0/24}
    ports: [tcp/25]
    action: allow
)";

TEST(ReferenceVerdict, CidrSelectorsMatchByAddress)
{
    Policy policy = Policy::parse(selectors_policy);
    const std::vector<FlowCase> cases = {
        {"a rule from 198.51.100.0/24 covers 198.51.100.7 even when that address is a workload "
         "of its own",
         "198.51.100.7", "198.51.100.30", "tcp/6379", "allow rule subnet-to-cache"},
        {"and the other workload inside it", "198.51.100.9", "198.51.100.30", "tcp/6379",
         "allow rule subnet-to-cache"},
        {"and an IPv4-mapped source", "::ffff:198.51.100.7", "198.51.100.30", "tcp/6379",
         "allow rule subnet-to-cache"},
        {"and world inside it", "198.51.100.200", "198.51.100.30", "tcp/6379",
         "allow rule subnet-to-cache"},
        {"but not outside it", "198.51.101.9", "198.51.100.30", "tcp/6379",
         "deny default -"},
        {"a cidr destination is world here", "198.51.100.9", "203.0.113.25", "tcp/25",
         "allow rule mail-out"},
        {"a cidr term in a list", "2001:db8:1::9", "203.0.113.25", "tcp/25",
         "allow rule mail-out"},
        {"the label term of that list does not cover the canary", "198.51.100.7",
         "203.0.113.25", "tcp/25", "deny default -"},
    };
    expect_verdicts(policy, cases);
}

TEST(ReferenceVerdict, LabelAndKeywordSelectors)
{
    Policy policy = Policy::parse(selectors_policy);
    const std::vector<Prefix> host = prefixes({"192.0.2.1/32"});
    const std::vector<FlowCase> cases = {
        {"labels follow the longest prefix", "198.51.100.7", "198.51.100.8", "tcp/80",
         "allow rule canary-to-prod"},
        {"a prod workload is not canary", "198.51.100.9", "198.51.100.8", "tcp/80",
         "deny default -"},
        {"a value list matches any of its values", "198.51.100.7", "198.51.100.30", "tcp/80",
         "allow rule canary-to-prod"},
        {"every listed key must match: canary is not prod", "198.51.100.7", "198.51.100.7",
         "tcp/80", "deny default -"},
        {"world is an address of no identity", "203.0.113.5", "198.51.100.8", "tcp/443",
         "allow rule world-to-web"},
        {"a workload is not world", "198.51.100.30", "198.51.100.8", "tcp/443",
         "deny default -"},
        {"host is not world", "192.0.2.1", "198.51.100.8", "tcp/443", "deny default -"},
        {"host matches host", "192.0.2.1", "198.51.100.8", "tcp/22", "allow rule host-ssh"},
        {"to any includes world", "192.0.2.1", "203.0.113.5", "tcp/22", "allow rule host-ssh"},
        {"world is not host", "203.0.113.5", "198.51.100.8", "tcp/22", "deny default -"},
        {"any includes world", "203.0.113.5", "198.51.100.30", "udp/53",
         "allow rule dns-from-anyone"},
        {"any includes host", "192.0.2.1", "198.51.100.30", "udp/53",
         "allow rule dns-from-anyone"},
    };
    expect_verdicts(policy, cases, host);
}

// ---- deny precedence ----------------------------------------------------------

TEST(ReferenceVerdict, DenyWinsAndTheFirstRuleIsReported)
{
    Policy policy = Policy::parse(R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce}
identities:
  - name: web
    labels: {app: web}
    cidrs: [198.51.100.8/32]
rules:
  - name: web-all-tcp
    from: any
    to: {app: web}
    ports: [tcp]
    action: allow
  - name: web-http
    from: any
    to: {app: web}
    ports: [tcp/80]
    action: allow
  - name: no-ssh
    from: {cidr: 203.0.113.0/24}
    to: {app: web}
    ports: [tcp/22]
    action: deny
  - name: no-ssh-at-all
    from: any
    to: any
    ports: [tcp/22, tcp/2222]
    action: deny
)");
    const std::vector<FlowCase> cases = {
        {"a deny after an allow still wins", "203.0.113.5", "198.51.100.8", "tcp/22",
         "deny rule no-ssh"},
        {"the first matching deny is reported", "203.0.113.5", "198.51.100.8", "tcp/22",
         "deny rule no-ssh"},
        {"a later deny decides where the first does not match", "192.0.2.5", "198.51.100.8",
         "tcp/22", "deny rule no-ssh-at-all"},
        {"a deny of another port does not apply", "203.0.113.5", "198.51.100.8", "tcp/443",
         "allow rule web-all-tcp"},
        {"the first matching allow is reported", "203.0.113.5", "198.51.100.8", "tcp/80",
         "allow rule web-all-tcp"},
        {"no rule: the default", "203.0.113.5", "198.51.100.8", "udp/53", "deny default -"},
        {"a deny applies to world destinations too", "198.51.100.8", "203.0.113.5", "tcp/2222",
         "deny rule no-ssh-at-all"},
    };
    expect_verdicts(policy, cases);
}

// ---- modes and audit ------------------------------------------------------------

const char* const modes_policy = R"(apiVersion: bulkhead/v1
defaults: {ingress: audit, egress: enforce}
identities:
  - name: enforced
    labels: {app: enforced}
    cidrs: [198.51.100.1/32]
    ingress: enforce
    egress: allow
  - name: audited
    labels: {app: audited}
    cidrs: [198.51.100.2/32]
    ingress: audit
    egress: audit
  - name: open
    labels: {app: open}
    cidrs: [198.51.100.3/32]
    ingress: allow
    egress: enforce
  - name: quiet
    labels: {app: quiet}
    cidrs: [198.51.100.4/32]
rules:
  - name: no-telnet
    from: any
    to: any
    ports: [tcp/23]
    action: deny
  - name: web
    from: any
    to: any
    ports: [tcp/80]
    action: allow
)";

TEST(ReferenceVerdict, ModesAndAudit)
{
    Policy policy = Policy::parse(modes_policy);
    const Direction egress = Direction::egress;
    const std::vector<FlowCase> cases = {
        {"ingress: the destination's mode, enforce", "203.0.113.5", "198.51.100.1", "tcp/443",
         "deny default -"},
        {"ingress: audit passes as would-deny", "203.0.113.5", "198.51.100.2", "tcp/443",
         "audit default -"},
        {"ingress: allow", "203.0.113.5", "198.51.100.3", "tcp/443", "allow default -"},
        {"an identity that says nothing takes defaults.ingress", "203.0.113.5", "198.51.100.4",
         "tcp/443", "audit default -"},
        {"world as destination takes defaults.ingress", "198.51.100.1", "203.0.113.5",
         "tcp/443", "audit default -"},
        {"host as destination takes defaults.ingress", "198.51.100.1", "192.0.2.1", "tcp/443",
         "audit default -"},
        {"audit keeps the deny rule's name", "203.0.113.5", "198.51.100.2", "tcp/23",
         "audit rule no-telnet"},
        {"a deny rule denies in allow mode", "203.0.113.5", "198.51.100.3", "tcp/23",
         "deny rule no-telnet"},
        {"an allow rule allows in every mode", "203.0.113.5", "198.51.100.2", "tcp/80",
         "allow rule web"},
        {"egress: the source's mode, allow", "198.51.100.1", "198.51.100.2", "tcp/443",
         "allow default -", egress},
        {"egress: audit", "198.51.100.2", "198.51.100.1", "tcp/443", "audit default -", egress},
        {"egress: enforce", "198.51.100.3", "198.51.100.2", "tcp/443", "deny default -", egress},
        {"egress: audit turns a deny rule into audit", "198.51.100.2", "203.0.113.5", "tcp/23",
         "audit rule no-telnet", egress},
        {"egress: world as source takes defaults.egress", "203.0.113.5", "198.51.100.2",
         "tcp/443", "deny default -", egress},
        {"egress: an identity that says nothing", "198.51.100.4", "198.51.100.3", "tcp/443",
         "deny default -", egress},
    };
    expect_verdicts(policy, cases, prefixes({"192.0.2.1/32"}));
}

// ---- ports ------------------------------------------------------------------------

TEST(ReferenceVerdict, PortsAndPortlessFlows)
{
    Policy policy = Policy::parse(R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce}
rules:
  - name: https
    from: any
    to: any
    ports: [tcp/443]
    action: allow
  - name: media
    from: any
    to: any
    ports: [udp/5000-5100]
    action: allow
  - name: all-sctp
    from: any
    to: any
    ports: [sctp]
    action: allow
  - name: ping
    from: any
    to: any
    ports: [icmp/8, icmpv6/128/0]
    action: allow
  - name: all-icmp-from-lab
    from: {cidr: 192.0.2.0/24}
    to: any
    ports: [icmp]
    action: allow
  - name: everything-from-office
    from: {cidr: 203.0.113.0/24}
    to: any
    ports: [any]
    action: allow
)");
    const std::string a = "198.51.100.1";
    const std::string b = "198.51.100.2";
    const std::vector<FlowCase> cases = {
        {"exact port", a, b, "tcp/443", "allow rule https"},
        {"other port", a, b, "tcp/80", "deny default -"},
        {"other protocol, same port", a, b, "udp/443", "deny default -"},
        {"range start", a, b, "udp/5000", "allow rule media"},
        {"range end", a, b, "udp/5100", "allow rule media"},
        {"below the range", a, b, "udp/4999", "deny default -"},
        {"above the range", a, b, "udp/5101", "deny default -"},
        {"a protocol's every port", a, b, "sctp/9", "allow rule all-sctp"},
        {"echo request, code 0", a, b, "icmp/8/0", "allow rule ping"},
        {"echo request, any code", a, b, "icmp/8/5", "allow rule ping"},
        {"echo reply is another type", a, b, "icmp/0/0", "deny default -"},
        {"ICMPv6 echo, exact code", "2001:db8::1", "2001:db8::2", "icmpv6/128/0",
         "allow rule ping"},
        {"ICMPv6 echo, other code", "2001:db8::1", "2001:db8::2", "icmpv6/128/1",
         "deny default -"},
        {"icmp type 8 is not icmpv6 type 8", "2001:db8::1", "2001:db8::2", "icmpv6/8/0",
         "deny default -"},
        {"any covers every protocol", "203.0.113.5", b, "udp/9",
         "allow rule everything-from-office"},
        // a flow without a port: only specs covering every port of the protocol
        {"port-less tcp: a single port does not cover it", a, b, "tcp", "deny default -"},
        {"port-less udp: a range does not cover it", a, b, "udp", "deny default -"},
        {"port-less sctp: every port covers it", a, b, "sctp", "allow rule all-sctp"},
        {"port-less icmp: one type does not cover it", a, b, "icmp", "deny default -"},
        {"port-less icmp: every type covers it", "192.0.2.5", b, "icmp",
         "allow rule all-icmp-from-lab"},
        {"port-less tcp: any covers it", "203.0.113.5", b, "tcp",
         "allow rule everything-from-office"},
        // what a fragment's payload holds where a port would be is not a port
        // (field case F1, evaluator side)
        {"fragment reading 443", a, b, "tcp/443 fragment", "deny default -"},
        {"fragment reading 5000", a, b, "udp/5000 fragment", "deny default -"},
        {"fragment reading echo", a, b, "icmp/8/0 fragment", "deny default -"},
        {"fragment of a protocol allowed on every port", a, b, "sctp/9 fragment",
         "allow rule all-sctp"},
    };
    expect_verdicts(policy, cases);
}

// ---- neighbour discovery (field case I3, evaluator side) ---------------------------

TEST(ReferenceVerdict, NeighbourDiscoveryIsNotPolicedUnlessDenied)
{
    Policy policy = Policy::parse(R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: enforce}
rules:
  - name: ping6
    from: any
    to: any
    ports: [icmpv6/135]
    action: allow
  - name: no-rogue-routers
    from: {cidr: "fe80::bad/128"}
    to: any
    ports: [icmpv6/134]
    action: deny
)");
    const std::string ns = "icmpv6/135/0";
    const std::vector<FlowCase> cases = {
        {"solicitation under default deny", "fe80::1", "ff02::1:ff00:5", ns,
         "allow not-policed -", Direction::ingress, true},
        {"also at egress", "fe80::1", "ff02::1:ff00:5", ns, "allow not-policed -",
         Direction::egress, true},
        {"an allow rule does not make it policed", "fe80::2", "ff02::1:ff00:5", ns,
         "allow not-policed -", Direction::ingress, true},
        {"router advertisement", "fe80::1", "ff02::1", "icmpv6/134/0", "allow not-policed -",
         Direction::ingress, true},
        {"an explicit deny still denies", "fe80::bad", "ff02::1", "icmpv6/134/0",
         "deny rule no-rogue-routers", Direction::ingress, true},
        {"the same type without the ND mark is policy", "fe80::1", "ff02::1", "icmpv6/134/0",
         "deny default -"},
        {"echo stays governed by policy", "fe80::1", "fe80::2", "icmpv6/128/0",
         "deny default -"},
    };
    expect_verdicts(policy, cases);
}

// ---- field case P1 ------------------------------------------------------------------

// Prefix length zero: 0.0.0.0/0 is every IPv4 address and ::/0 every address,
// as sources, as destinations, and over workload addresses alike.
TEST(FieldCase, PrefixLengthZero)
{
    const std::string head = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
identities:
  - name: web
    labels: {app: web}
    cidrs: [203.0.113.10/32]
rules:
  - name: https
)";
    const std::string from_side = head + R"(    from: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
    to: any
    ports: [tcp/443]
    action: allow
)";
    const std::string to_side = head + R"(    from: any
    to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
    ports: [tcp/443]
    action: allow
)";
    const std::vector<FlowCase> cases = {
        {"IPv4 to a workload on 443", "198.51.100.1", "203.0.113.10", "tcp/443",
         "allow rule https"},
        {"IPv4 to world on 443", "198.51.100.1", "203.0.113.11", "tcp/443", "allow rule https"},
        {"IPv4-mapped on 443", "::ffff:198.51.100.1", "::ffff:203.0.113.10", "tcp/443",
         "allow rule https"},
        {"IPv6 on 443", "2001:db8::1", "2001:db8::10", "tcp/443", "allow rule https"},
        {"IPv4 on 80", "198.51.100.1", "203.0.113.10", "tcp/80", "deny default -"},
        {"IPv6 on 80", "2001:db8::1", "2001:db8::10", "tcp/80", "deny default -"},
        {"UDP on 443", "2001:db8::1", "2001:db8::10", "udp/443", "deny default -"},
    };
    for (const std::string* text : {&from_side, &to_side}) {
        Policy policy = Policy::parse(*text, "p1.yaml");
        EXPECT_EQ(policy.warnings, std::vector<std::string>{});
        expect_verdicts(policy, cases);
    }

    // 0.0.0.0/0 alone does not reach IPv6
    std::string v4_only = head + R"(    from: {cidr: 0.0.0.0/0}
    to: any
    ports: [tcp/443]
    action: allow
)";
    expect_verdicts(Policy::parse(v4_only),
                    {{"IPv6 is outside 0.0.0.0/0", "2001:db8::1", "2001:db8::10", "tcp/443",
                      "deny default -"},
                     {"IPv4 is inside", "198.51.100.1", "203.0.113.10", "tcp/443",
                      "allow rule https"}});
}

}  // namespace
}  // namespace bulkhead
