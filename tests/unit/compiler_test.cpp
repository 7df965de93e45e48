// The compiler against the reference evaluator, with no kernel: the compiled
// tables are read back with the same lookups the BPF program makes.
#include "compiler.hpp"
#include "support/random_policy.hpp"

#include <bulkhead/reference.hpp>

#include <arpa/inet.h>
#include <gtest/gtest.h>

namespace bulkhead {
namespace {

using detail::Allocations;
using detail::Compiled;

// bh_policy_lookup() in C++: longest prefix among the compiled keys, source's
// own entries first, then any-source.
std::optional<bh_policy_value> policy_lookup(const Compiled& c, std::uint32_t src,
                                             std::uint32_t dst, const Flow& f)
{
    std::uint32_t value = std::uint32_t{f.proto} << 24 | (f.has_port ? f.port : 0u);
    for (std::uint32_t source : {src, std::uint32_t{BH_ID_ANY}}) {
        for (int len = f.has_port ? 32 : 16; len >= 0; --len) {
            std::uint32_t start = len == 0 ? 0 : value & (~0u << (32 - len));
            bh_policy_key key{};
            key.prefixlen = static_cast<std::uint32_t>(64 + len);
            key.dst_id = htonl(dst);
            key.src_id = htonl(source);
            key.proto = static_cast<std::uint8_t>(start >> 24);
            key.pad = static_cast<std::uint8_t>(start >> 16);
            key.port = htons(static_cast<std::uint16_t>(start));
            auto it = c.policy.find(detail::key_bytes(key));
            if (it != c.policy.end())
                return it->second;
        }
    }
    return std::nullopt;
}

// bh_decide() in C++ over compiled tables, at an ingress point.
Verdict simulate(const Compiled& c, const Policy& p, const Allocations& alloc, const Flow& f)
{
    std::uint32_t src = detail::compiled_identity_of(c, f.src);
    std::uint32_t dst = detail::compiled_identity_of(c, f.dst);
    Mode mode = c.identities.at(dst).ingress;
    auto rule = policy_lookup(c, src, dst, f);
    auto name = [&]() -> std::optional<std::string> {
        for (const auto& [n, id] : alloc.rules)
            if (id == rule->rule_id)
                return n;
        return "?";
    };

    Verdict v;
    if (rule && rule->action == BH_ACTION_DENY)
        v = {mode == Mode::audit ? VerdictKind::audit : VerdictKind::deny, Reason::rule, name()};
    else if (f.neighbour_discovery)
        v = {VerdictKind::allow, Reason::not_policed, std::nullopt};
    else if (rule)
        v = {VerdictKind::allow, Reason::rule, name()};
    else
        v = {mode == Mode::allow   ? VerdictKind::allow
             : mode == Mode::audit ? VerdictKind::audit
                                   : VerdictKind::deny,
             Reason::default_mode, std::nullopt};
    (void)p;
    return v;
}

Flow tcp(const char* src, const char* dst, std::uint16_t port)
{
    Flow f;
    f.src = *IpAddr::parse(src);
    f.dst = *IpAddr::parse(dst);
    f.proto = 6;
    f.port = port;
    return f;
}

const char* kPolicy = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
identities:
  - name: web
    labels: {app: web}
    cidrs: [198.51.100.7/32, "2001:db8::7/128"]
  - name: db
    labels: {app: db}
    cidrs: [198.51.100.20/32]
  - name: lab
    labels: {app: lab}
    cidrs: [198.51.100.128/25]
    ingress: audit
rules:
  - name: office-to-db
    from: {cidr: 198.51.100.0/24}
    to: {app: db}
    ports: [tcp/5432]
    action: allow
  - name: no-ssh
    from: any
    to: any
    ports: [tcp/22]
    action: deny
  - name: web-all-tcp
    from: {app: web}
    to: {app: db}
    ports: [tcp]
    action: allow
  - name: v6-only
    from: {cidr: "::/0"}
    to: {app: lab}
    ports: [tcp/80]
    action: allow
)";

struct Case {
    const char* description;
    Flow flow;
    VerdictKind kind;
    Reason reason;
    std::optional<std::string> rule;
};

TEST(Compiler, TableOfVerdictsMatchesExpectationAndReference)
{
    Policy policy = Policy::parse(kPolicy);
    Allocations alloc;
    Compiled c = detail::compile(policy, alloc, {}, {});
    const Case cases[] = {
        {"a CIDR rule covers a workload address inside it", tcp("198.51.100.7", "198.51.100.20", 5432),
         VerdictKind::allow, Reason::rule, "office-to-db"},
        {"deny beats a folded any-source allow", tcp("198.51.100.7", "198.51.100.20", 22),
         VerdictKind::deny, Reason::rule, "no-ssh"},
        {"all-ports rule of a specific source", tcp("198.51.100.7", "198.51.100.20", 8080),
         VerdictKind::allow, Reason::rule, "web-all-tcp"},
        {"world to db falls to the default", tcp("203.0.113.5", "198.51.100.20", 8080),
         VerdictKind::deny, Reason::default_mode, std::nullopt},
        {"world inside the office CIDR reaches db", tcp("198.51.100.99", "198.51.100.20", 5432),
         VerdictKind::allow, Reason::rule, "office-to-db"},
        {"audit passes a default deny", tcp("203.0.113.5", "198.51.100.200", 443),
         VerdictKind::audit, Reason::default_mode, std::nullopt},
        {"audit passes a rule deny", tcp("203.0.113.5", "198.51.100.200", 22),
         VerdictKind::audit, Reason::rule, "no-ssh"},
        {"::/0 does not cover IPv4 sources", tcp("203.0.113.5", "198.51.100.200", 80),
         VerdictKind::audit, Reason::default_mode, std::nullopt},
        {"IPv4-mapped IPv6 is its IPv4 address", tcp("::ffff:198.51.100.7", "198.51.100.20", 22),
         VerdictKind::deny, Reason::rule, "no-ssh"},
    };
    for (const Case& k : cases) {
        SCOPED_TRACE(k.description);
        Verdict expected{k.kind, k.reason, k.rule};
        Verdict got = simulate(c, policy, alloc, k.flow);
        Verdict ref = reference_verdict(policy, k.flow);
        EXPECT_EQ(got.kind, expected.kind);
        EXPECT_EQ(got.reason, expected.reason);
        EXPECT_EQ(got.rule, expected.rule);
        EXPECT_EQ(ref.kind, expected.kind);
        EXPECT_EQ(ref.reason, expected.reason);
        EXPECT_EQ(ref.rule, expected.rule);
    }
}

TEST(Compiler, PortlessFlowsMatchOnlyWholeProtocolRules)
{
    Policy policy = Policy::parse(kPolicy);
    Allocations alloc;
    Compiled c = detail::compile(policy, alloc, {}, {});
    Flow f = tcp("198.51.100.7", "198.51.100.20", 0);
    f.has_port = false;
    EXPECT_EQ(simulate(c, policy, alloc, f).rule, "web-all-tcp");
    f.src = *IpAddr::parse("198.51.100.99");  // only tcp/5432 from the office
    EXPECT_EQ(simulate(c, policy, alloc, f).kind, VerdictKind::deny);
}

TEST(Compiler, IdentitiesAndRuleIdsAreStableAcrossCommits)
{
    Policy policy = Policy::parse(kPolicy);
    Allocations alloc;
    Compiled first = detail::compile(policy, alloc, {}, {});
    std::uint32_t db = detail::compiled_identity_of(first, *IpAddr::parse("198.51.100.20"));
    std::uint32_t ssh_rule = alloc.rules.at("no-ssh");

    std::reverse(policy.rules.begin(), policy.rules.end());
    policy.identities.insert(policy.identities.begin(),
                             Identity{"new", {{"app", "new"}}, {}, {}, Mode::allow, Mode::allow, {}});
    Compiled second = detail::compile(policy, alloc, {}, {});
    EXPECT_EQ(detail::compiled_identity_of(second, *IpAddr::parse("198.51.100.20")), db);
    EXPECT_EQ(alloc.rules.at("no-ssh"), ssh_rule);

    Allocations reloaded = Allocations::from_json(alloc.to_json());
    EXPECT_EQ(reloaded.workloads, alloc.workloads);
    EXPECT_EQ(reloaded.rules, alloc.rules);
}

TEST(Compiler, TooManyRulesNamesTheCounterMap)
{
    Policy policy = Policy::parse(kPolicy);
    Allocations alloc;
    try {
        detail::compile(policy, alloc, {}, {2});
        FAIL() << "expected an error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("bh_rule_cnt"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("--max-rules"), std::string::npos) << e.what();
    }
}

TEST(Compiler, HostAddressesAreIdentityHost)
{
    Policy policy = Policy::parse(R"(apiVersion: bulkhead/v1
rules:
  - {name: to-host, from: any, to: host, ports: [tcp/22], action: allow}
)");
    Allocations alloc;
    Compiled c = detail::compile(policy, alloc, {{*Prefix::parse("203.0.113.1")}, {}}, {});
    EXPECT_EQ(detail::compiled_identity_of(c, *IpAddr::parse("203.0.113.1")), BH_ID_HOST);
    auto v = simulate(c, policy, alloc, tcp("198.51.100.9", "203.0.113.1", 22));
    EXPECT_EQ(v.rule, "to-host");
}

// Random policies and flows: the compiled tables give the reference's verdict,
// reason and deciding rule.
TEST(Compiler, RandomPoliciesAgreeWithReference)
{
    const std::uint64_t seed = testing::test_seed();
    SCOPED_TRACE("BULKHEAD_SEED=" + std::to_string(seed));
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 400; ++i) {
        Policy policy = testing::random_policy(rng);
        Allocations alloc;
        Compiled c = detail::compile(policy, alloc, {}, {});
        for (int j = 0; j < 250; ++j) {
            Flow f = testing::random_flow(rng, policy);
            Verdict got = simulate(c, policy, alloc, f);
            Verdict ref = reference_verdict(policy, f);
            ASSERT_TRUE(got.kind == ref.kind && got.reason == ref.reason && got.rule == ref.rule)
                << "policy " << i << " flow " << j << ": " << f.src.str() << " -> " << f.dst.str()
                << " proto " << int(f.proto) << " port " << f.port << " has_port " << f.has_port
                << "\ncompiled: " << to_string(got.kind) << "/" << to_string(got.reason) << "/"
                << got.rule.value_or("-") << "\nreference: " << to_string(ref.kind) << "/"
                << to_string(ref.reason) << "/" << ref.rule.value_or("-");
        }
    }
}

}  // namespace
}  // namespace bulkhead
