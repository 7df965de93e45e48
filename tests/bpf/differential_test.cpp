// Differential test: random policies and random packets; the XDP program's
// action, reason counter and rule counter, and explain(), must all equal the
// reference evaluator.
//
// The seed comes from BULKHEAD_SEED (or a fixed one under CI=true, else the
// clock; see testing::test_seed) and is printed with every
// failure; policy #i is generated from (seed, i) alone, so a failure names
// what to rerun. BULKHEAD_DIFF_POLICIES and BULKHEAD_DIFF_PACKETS scale the
// run (default 200 x 500 = 100,000 packets).
#include "support/bpf_env.hpp"
#include "support/random_policy.hpp"
#include "support/packet.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>
#include <bulkhead/reference.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <tuple>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

// Reason counter names by enum bh_reason, as stats() names them.
constexpr std::array<const char*, 12> kReasonNames = {
    "allow-rule",   "deny-rule", "audit-rule", "allow-default",
    "deny-default", "audit-default", "not-ip",  "neighbour-discovery",
    "malformed",    "no-policy", "tracked",    "failsafe",
};
static_assert(BH_REASON_ALLOW_RULE == 0 && BH_REASON_AUDIT_DEFAULT == 5 && BH_REASON_ND == 7 &&
              BH_REASON_FAILSAFE == 11);

// This machine's addresses, as far as the test dataplane knows: identity host.
const std::vector<std::string> kHostAddresses = {"198.51.100.250/32", "2001:db8::fe/128"};

class Rng {
public:
    explicit Rng(std::uint64_t seed) : gen_(seed) {}

    int between(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }
    bool chance(double p) { return std::bernoulli_distribution(p)(gen_); }
    std::uint8_t byte() { return static_cast<std::uint8_t>(between(0, 255)); }
    std::uint16_t u16() { return static_cast<std::uint16_t>(between(0, 0xffff)); }

    template <typename T>
    const T& pick(const std::vector<T>& items)
    {
        return items[static_cast<std::size_t>(between(0, static_cast<int>(items.size()) - 1))];
    }

private:
    std::mt19937_64 gen_;
};

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

bool is_v4(const Prefix& p)
{
    return p.addr.is_v4() && p.len >= 96;
}

// `addr` with the bits from `from` on replaced by random ones.
IpAddr randomize_from(IpAddr addr, int from, Rng& rng)
{
    for (int bit = from; bit < 128; bit++) {
        auto mask = static_cast<std::uint8_t>(0x80u >> (bit % 8));
        if (rng.chance(0.5))
            addr.bytes[bit / 8] |= mask;
        else
            addr.bytes[bit / 8] &= static_cast<std::uint8_t>(~mask);
    }
    return addr;
}

IpAddr masked(IpAddr addr, int len)
{
    for (int bit = len; bit < 128; bit++)
        addr.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80u >> (bit % 8)));
    return addr;
}

// The first (up) or last (down) address after or before `addr`; wraps.
IpAddr step(IpAddr addr, bool up)
{
    for (int i = 15; i >= 0; i--) {
        auto& b = addr.bytes[static_cast<std::size_t>(i)];
        if (up) {
            if (++b != 0)
                break;
        } else {
            if (b-- != 0)
                break;
        }
    }
    return addr;
}

const std::vector<Prefix>& doc_ranges()
{
    static const std::vector<Prefix> ranges = {*Prefix::parse("198.51.100.0/24"),
                                               *Prefix::parse("203.0.113.0/24"),
                                               *Prefix::parse("2001:db8::/32")};
    return ranges;
}

// Prefix text as a policy file writes it: IPv4 as a.b.c.d/n.
std::string prefix_text(const Prefix& p)
{
    if (is_v4(p))
        return fmt::format("{}/{}", p.addr.str(), p.len - 96);
    return fmt::format("\"{}/{}\"", p.addr.str(), p.len);
}

// A prefix in (or around) the documentation ranges, often derived from one
// already in `pool`, so that prefixes nest and overlap.
Prefix random_prefix(Rng& rng, const std::vector<Prefix>& pool)
{
    if (!pool.empty() && rng.chance(0.5)) {
        const Prefix& base = rng.pick(pool);
        int min_len = is_v4(base) ? 96 : 0;
        int len = std::clamp(base.len + rng.between(-4, 8), min_len, 128);
        IpAddr addr = randomize_from(base.addr, std::min<int>(base.len, len), rng);
        return Prefix{masked(addr, len), static_cast<std::uint8_t>(len)};
    }
    if (rng.chance(0.04))
        return rng.chance(0.5) ? *Prefix::parse("0.0.0.0/0") : *Prefix::parse("::/0");
    if (rng.chance(0.6)) {
        static const std::vector<int> lens = {20, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32, 32, 32};
        Prefix range = doc_ranges()[static_cast<std::size_t>(rng.between(0, 1))];
        int len = 96 + rng.pick(lens);
        IpAddr addr = randomize_from(range.addr, range.len, rng);
        return Prefix{masked(addr, len), static_cast<std::uint8_t>(len)};
    }
    static const std::vector<int> lens = {32, 48, 48, 64, 64, 96, 120, 124, 127, 128, 128};
    int len = rng.pick(lens);
    IpAddr addr = randomize_from(doc_ranges()[2].addr, 32, rng);
    // few distinct bits above /64, so v6 prefixes overlap too
    for (std::size_t i = 4; i < 8; i++)
        addr.bytes[i] = rng.chance(0.8) ? 0 : static_cast<std::uint8_t>(rng.between(0, 1));
    return Prefix{masked(addr, len), static_cast<std::uint8_t>(len)};
}

// ---------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------

// A port spec with its numbers (ICMP: type << 8 | code), so packets can aim at it.
struct Spec {
    std::string proto;  // tcp, udp, sctp, icmp, icmpv6
    int lo = 0;
    int hi = 0;
};

// One selector term, as written and as packets aim at it.
struct Term {
    enum class Kind { any, world, host, labels, cidr };
    Kind kind = Kind::any;
    std::vector<std::string> apps;  // labels: app values (empty: any app)
    int id = -1;                    // labels: identity index named by id, or -1
    Prefix cidr;
};

struct GeneratedRule {
    std::vector<Term> from;
    std::vector<Term> to;
    std::vector<Spec> specs;
};

struct GeneratedIdentity {
    std::string app;
    std::vector<Prefix> cidrs;
};

struct Generated {
    std::string yaml;
    std::vector<Prefix> prefixes;      // every prefix the policy names
    std::vector<std::uint16_t> ports;  // port edges: lo - 1, lo, hi, hi + 1
    std::vector<std::uint16_t> icmp;   // ICMP type << 8 | code values it names
    std::vector<Spec> specs;
    std::vector<GeneratedIdentity> identities;
    std::vector<GeneratedRule> rules;
};

const std::vector<std::string> kModes = {"allow", "audit", "enforce"};
const std::vector<std::string> kApps = {"web", "db", "api"};
const std::vector<int> kPortPool = {1, 22, 53, 80, 443, 1000, 1023, 1024, 2000, 5000, 8080,
                                    32768, 65534, 65535};
const std::vector<int> kIcmpTypes = {0, 3, 8, 11, 128, 129, 133, 134, 135, 136, 137};
const std::vector<int> kIcmpCodes = {0, 1, 4, 255};
const std::vector<int> kOddHopLimits = {1, 64, 254};  // not 255: ND must not trust them

std::string random_port_spec(Rng& rng, Generated& g, GeneratedRule& rule)
{
    static const std::vector<std::string> transports = {"tcp", "udp", "sctp"};
    int kind = rng.between(0, 9);
    if (kind == 0)
        return "any";
    if (kind <= 6) {
        const std::string& proto = rng.pick(transports);
        if (rng.chance(0.15)) {
            rule.specs.push_back({proto, 0, 0xffff});
            return proto;
        }
        int lo = rng.chance(0.7) ? rng.pick(kPortPool) : rng.between(1, 65535);
        int hi = lo;
        if (rng.chance(0.4)) {
            int width = rng.chance(0.5) ? rng.between(1, 16) : rng.between(1, 5000);
            hi = std::min(65535, lo + width);
        }
        for (int p : {lo - 1, lo, hi, hi + 1}) {
            if (p >= 0 && p <= 65535)
                g.ports.push_back(static_cast<std::uint16_t>(p));
        }
        g.specs.push_back({proto, lo, hi});
        rule.specs.push_back(g.specs.back());
        return lo == hi ? fmt::format("{}/{}", proto, lo) : fmt::format("{}/{}-{}", proto, lo, hi);
    }
    std::string proto = rng.chance(0.5) ? "icmp" : "icmpv6";
    if (rng.chance(0.2)) {
        rule.specs.push_back({proto, 0, 0xffff});
        return proto;
    }
    int type = rng.pick(kIcmpTypes);
    std::string text;
    if (rng.chance(0.5)) {
        g.icmp.push_back(static_cast<std::uint16_t>(type << 8));
        g.specs.push_back({proto, type << 8, type << 8 | 0xff});
        text = fmt::format("{}/{}", proto, type);
    } else {
        int code = rng.chance(0.7) ? 0 : rng.between(0, 4);
        g.icmp.push_back(static_cast<std::uint16_t>(type << 8 | code));
        g.specs.push_back({proto, type << 8 | code, type << 8 | code});
        text = fmt::format("{}/{}/{}", proto, type, code);
    }
    rule.specs.push_back(g.specs.back());
    return text;
}

Term random_term(Rng& rng, int identities, Generated& g)
{
    Term t;
    int kind = rng.between(0, 11);
    if (kind == 0) {
        t.kind = Term::Kind::any;
    } else if (kind == 1) {
        t.kind = Term::Kind::world;
    } else if (kind == 2) {
        t.kind = Term::Kind::host;
    } else if (kind <= 5) {
        t.kind = Term::Kind::cidr;
        t.cidr = random_prefix(rng, g.prefixes);
        g.prefixes.push_back(t.cidr);
    } else {
        t.kind = Term::Kind::labels;
        if (kind <= 7 || identities == 0) {
            t.apps = {rng.pick(kApps)};
        } else if (kind == 8) {
            t.apps = {rng.pick(kApps), rng.pick(kApps)};
        } else {
            t.id = rng.between(0, identities - 1);
            if (kind != 9)
                t.apps = {rng.pick(kApps)};
        }
    }
    return t;
}

std::string term_yaml(const Term& t)
{
    switch (t.kind) {
    case Term::Kind::any:
        return "any";
    case Term::Kind::world:
        return "world";
    case Term::Kind::host:
        return "host";
    case Term::Kind::cidr:
        return fmt::format("{{cidr: {}}}", prefix_text(t.cidr));
    case Term::Kind::labels:
        break;
    }
    std::vector<std::string> keys;
    if (t.apps.size() == 1)
        keys.push_back("app: " + t.apps.front());
    else if (!t.apps.empty())
        keys.push_back(fmt::format("app: [{}]", fmt::join(t.apps, ", ")));
    if (t.id >= 0)
        keys.push_back(fmt::format("id: i{}", t.id));
    return fmt::format("{{{}}}", fmt::join(keys, ", "));
}

std::string selector_yaml(const std::vector<Term>& terms)
{
    if (terms.size() == 1)
        return term_yaml(terms.front());
    std::vector<std::string> parts;
    for (const Term& t : terms)
        parts.push_back(term_yaml(t));
    return fmt::format("[{}]", fmt::join(parts, ", "));
}

std::vector<Term> random_selector(Rng& rng, int identities, Generated& g)
{
    std::vector<Term> terms{random_term(rng, identities, g)};
    if (rng.chance(0.2))
        terms.push_back(random_term(rng, identities, g));
    return terms;
}

// A policy of up to `max_identities` identities and `max_rules` rules.
Generated random_policy(Rng& rng, int max_identities, int max_rules)
{
    Generated g;
    std::string& y = g.yaml;
    y = "apiVersion: bulkhead/v1\n";
    y += fmt::format("defaults: {{ingress: {}, egress: {}}}\n", rng.pick(kModes), rng.pick(kModes));
    y += "failsafe: {enabled: false}\n";

    int identities = rng.between(0, max_identities);
    std::set<Prefix> taken;  // a prefix belongs to one identity only
    if (identities > 0)
        y += "identities:\n";
    for (int i = 0; i < identities; i++) {
        GeneratedIdentity& identity = g.identities.emplace_back();
        identity.app = rng.pick(kApps);
        std::vector<std::string> cidrs;
        int count = rng.between(0, 3);
        for (int c = 0; c < count; c++) {
            Prefix p = random_prefix(rng, g.prefixes);
            if (rng.chance(0.05))
                p = *Prefix::parse(rng.pick(kHostAddresses));
            if (!taken.insert(p).second)
                continue;
            g.prefixes.push_back(p);
            identity.cidrs.push_back(p);
            cidrs.push_back(prefix_text(p));
        }
        y += fmt::format("  - {{name: n{0}, labels: {{app: {1}, id: i{0}}}, cidrs: [{2}]", i,
                         identity.app, fmt::join(cidrs, ", "));
        if (rng.chance(0.8))
            y += fmt::format(", ingress: {}", rng.pick(kModes));
        if (rng.chance(0.5))
            y += fmt::format(", egress: {}", rng.pick(kModes));
        y += "}\n";
    }

    int rules = rng.between(0, max_rules);
    if (rules > 0)
        y += "rules:\n";
    for (int r = 0; r < rules; r++) {
        GeneratedRule& rule = g.rules.emplace_back();
        rule.from = random_selector(rng, identities, g);
        rule.to = random_selector(rng, identities, g);
        std::vector<std::string> ports;
        int count = rng.between(1, 3);
        for (int p = 0; p < count; p++)
            ports.push_back(random_port_spec(rng, g, rule));
        y += fmt::format("  - {{name: r{}, from: {}, to: {}, ports: [{}], action: {}}}\n", r,
                         selector_yaml(rule.from), selector_yaml(rule.to), fmt::join(ports, ", "),
                         rng.chance(0.65) ? "allow" : "deny");
    }
    return g;
}

// ---------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------

struct GeneratedPacket {
    Packet packet;
    Flow flow;
};

// A random address of the documentation range(s) of one family.
IpAddr doc_address(Rng& rng, bool v4)
{
    const Prefix& range = v4 ? doc_ranges()[static_cast<std::size_t>(rng.between(0, 1))]
                             : doc_ranges()[2];
    return randomize_from(range.addr, range.len, rng);
}

// An address in `p` or just around it: its first and last addresses, the
// ones before and after them, or any inside. Prefixes wider than the
// documentation ranges give an address inside those.
IpAddr address_near(Rng& rng, const Prefix& p)
{
    bool v4 = is_v4(p);
    if (p.len < (v4 ? 96 + 24 : 32))
        return doc_address(rng, v4);
    IpAddr last = p.addr;
    for (int bit = p.len; bit < 128; bit++)
        last.bytes[bit / 8] |= static_cast<std::uint8_t>(0x80u >> (bit % 8));
    switch (rng.between(0, 9)) {
    case 0:
        return p.addr;
    case 1:
        return last;
    case 2:
        return step(p.addr, false);
    case 3:
        return step(last, true);
    default:
        return randomize_from(p.addr, p.len, rng);
    }
}

// An address of `v4`'s family near the policy's prefixes, or elsewhere in
// the documentation ranges.
IpAddr random_address(Rng& rng, const Generated& g, bool v4)
{
    std::vector<Prefix> family;
    for (const Prefix& p : g.prefixes) {
        if (is_v4(p) == v4)
            family.push_back(p);
    }
    for (const std::string& h : kHostAddresses) {
        Prefix p = *Prefix::parse(h);
        if (is_v4(p) == v4)
            family.push_back(p);
    }
    if (family.empty() || rng.chance(0.15))
        return doc_address(rng, v4);
    return address_near(rng, rng.pick(family));
}

// An address that a term is likely to select (of family `v4` when given),
// or nullopt when the term says nothing useful.
std::optional<IpAddr> address_for(Rng& rng, const Generated& g, const Term& t,
                                  std::optional<bool> v4)
{
    std::vector<Prefix> candidates;
    switch (t.kind) {
    case Term::Kind::any:
        return std::nullopt;
    case Term::Kind::world:
        return doc_address(rng, v4.value_or(rng.chance(0.6)));
    case Term::Kind::host:
        for (const std::string& h : kHostAddresses)
            candidates.push_back(*Prefix::parse(h));
        break;
    case Term::Kind::cidr:
        candidates.push_back(t.cidr);
        break;
    case Term::Kind::labels:
        for (std::size_t k = 0; k < g.identities.size(); k++) {
            const GeneratedIdentity& identity = g.identities[k];
            bool app = t.apps.empty() ||
                       std::find(t.apps.begin(), t.apps.end(), identity.app) != t.apps.end();
            if (app && (t.id < 0 || t.id == static_cast<int>(k)))
                candidates.insert(candidates.end(), identity.cidrs.begin(), identity.cidrs.end());
        }
        break;
    }
    if (v4) {
        std::erase_if(candidates, [&](const Prefix& p) { return is_v4(p) != *v4; });
    }
    if (candidates.empty())
        return std::nullopt;
    return address_near(rng, rng.pick(candidates));
}

std::string address_text(const IpAddr& a, bool mapped_v6)
{
    return mapped_v6 ? "::ffff:" + a.str() : a.str();
}

// The tuples of the flows sent so far, as connection tracking keys them:
// addresses, ports (the echo id both ways for ICMP echo, none for protocols
// without ports) and protocol.
using FlowTuple = std::tuple<IpAddr, IpAddr, std::uint16_t, std::uint16_t, std::uint8_t>;
using SentFlows = std::set<FlowTuple>;

// `flow` numbers the packet's flow: its source port (an ephemeral one) or
// echo id and its IP id. The reference evaluator is stateless, so a packet
// whose flow, or its reverse, was sent before is not made: nullopt.
std::optional<GeneratedPacket> random_packet(Rng& rng, const Generated& g, std::uint32_t flow,
                                             SentFlows& sent)
{
    GeneratedPacket out;
    Packet& p = out.packet;
    Flow& f = out.flow;

    // most packets aim at a rule: addresses its selectors name
    const GeneratedRule* rule = !g.rules.empty() && rng.chance(0.7) ? &rng.pick(g.rules) : nullptr;
    std::optional<IpAddr> aimed_src;
    if (rule != nullptr)
        aimed_src = address_for(rng, g, rng.pick(rule->from), std::nullopt);
    bool v4 = aimed_src ? aimed_src->is_v4() : rng.chance(0.6);
    f.src = aimed_src ? *aimed_src : random_address(rng, g, v4);
    std::optional<IpAddr> aimed_dst;
    if (rule != nullptr)
        aimed_dst = address_for(rng, g, rng.pick(rule->to), v4);
    f.dst = aimed_dst ? *aimed_dst : random_address(rng, g, v4);
    bool mapped = v4 && rng.chance(0.05);  // IPv4 addresses in an IPv6 header
    bool v6_header = !v4 || mapped;

    int tags = rng.chance(0.85) ? 0 : rng.between(1, 2);
    for (int t = 0; t < tags; t++)
        p.vlan(static_cast<std::uint16_t>(rng.between(1, 4094)),
               t == 0 && tags == 2 && rng.chance(0.5) ? kTpid8021ad : kTpid8021Q);

    // protocol and "port": aim at the rule's port specs, or any of the policy
    const Spec* aim = nullptr;
    if (rule != nullptr && !rule->specs.empty() && rng.chance(0.8))
        aim = &rng.pick(rule->specs);
    else if (!g.specs.empty() && rng.chance(0.4))
        aim = &rng.pick(g.specs);
    if (aim != nullptr) {
        bool icmp_spec = aim->proto == "icmp" || aim->proto == "icmpv6";
        if (icmp_spec && (aim->proto == "icmpv6") != v6_header)
            aim = nullptr;  // ICMP in the other family's header: not a packet we make
    }
    int kind = rng.between(0, 9);
    std::uint8_t hop_limit = 64;
    if (aim != nullptr) {
        static const std::map<std::string, std::uint8_t> numbers = {
            {"tcp", kProtoTcp},   {"udp", kProtoUdp},       {"sctp", kProtoSctp},
            {"icmp", kProtoIcmp}, {"icmpv6", kProtoIcmpv6},
        };
        f.proto = numbers.at(aim->proto);
    } else if (kind <= 3) {
        f.proto = kProtoTcp;
    } else if (kind <= 5) {
        f.proto = kProtoUdp;
    } else if (kind == 6) {
        f.proto = kProtoSctp;
    } else if (kind <= 8) {
        f.proto = v6_header ? kProtoIcmpv6 : kProtoIcmp;
    } else {
        f.proto = rng.chance(0.5) ? kProtoGre : kProtoEsp;
    }
    bool icmp = f.proto == kProtoIcmp || f.proto == kProtoIcmpv6;
    if (aim != nullptr) {
        f.port = static_cast<std::uint16_t>(rng.chance(0.5) ? rng.between(aim->lo, aim->hi)
                                                            : rng.chance(0.5) ? aim->lo : aim->hi);
        int type = f.port >> 8;
        if (f.proto == kProtoIcmpv6 && type >= 133 && type <= 137)
            hop_limit = static_cast<std::uint8_t>(rng.chance(0.7) ? 255 : rng.pick(kOddHopLimits));
    } else if (icmp) {
        std::uint16_t value = !g.icmp.empty() && rng.chance(0.5)
                                  ? rng.pick(g.icmp)
                                  : static_cast<std::uint16_t>(rng.pick(kIcmpTypes) << 8);
        if (rng.chance(0.3))
            value = static_cast<std::uint16_t>((value & 0xff00) | rng.pick(kIcmpCodes));
        f.port = value;
        int type = value >> 8;
        if (f.proto == kProtoIcmpv6 && type >= 133 && type <= 137)
            hop_limit = static_cast<std::uint8_t>(rng.chance(0.7) ? 255 : rng.pick(kOddHopLimits));
    } else if (f.proto == kProtoTcp || f.proto == kProtoUdp || f.proto == kProtoSctp) {
        f.port = !g.ports.empty() && rng.chance(0.6) ? rng.pick(g.ports) : rng.u16();
    } else {
        f.port = 0;  // no transport header the parser knows: matched by protocol only
    }

    // fragments: a later fragment has no transport header
    int frag = rng.between(0, 19);
    bool later_fragment = frag < 2;
    bool first_fragment = frag == 2;
    f.has_port = !later_fragment;
    if (later_fragment)
        f.port = 0;

    // the tuple tracking would see (later fragments are tracked by IP id)
    auto sport = static_cast<std::uint16_t>(32768 + flow % 32768);
    if (f.has_port && (!icmp || (f.port >> 8) == 0 || (f.port >> 8) == 8 ||
                       (f.port >> 8) == 128 || (f.port >> 8) == 129)) {
        bool ports = f.proto == kProtoTcp || f.proto == kProtoUdp || f.proto == kProtoSctp;
        std::uint16_t a = icmp ? sport : ports ? sport : 0;
        std::uint16_t b = icmp ? sport : ports ? f.port : 0;
        if (sent.count({f.src, f.dst, a, b, f.proto}) || sent.count({f.dst, f.src, b, a, f.proto}))
            return std::nullopt;
        sent.insert({f.src, f.dst, a, b, f.proto});
    }
    f.neighbour_discovery = f.proto == kProtoIcmpv6 && f.has_port && (f.port >> 8) >= 133 &&
                            (f.port >> 8) <= 137 && hop_limit == 255;

    std::string src = address_text(f.src, mapped);
    std::string dst = address_text(f.dst, mapped);
    auto offset = static_cast<std::uint16_t>(rng.between(1, 8191));
    if (!v6_header) {
        Ipv4 ip{.src = src, .dst = dst};
        if (later_fragment) {
            ip.frag_offset = offset;
            ip.more_fragments = rng.chance(0.5);
        }
        ip.more_fragments = ip.more_fragments || first_fragment;
        if (rng.chance(0.1))
            ip.options.assign(static_cast<std::size_t>(4 * rng.between(1, 10)), 0x01);
        p.ipv4(ip);
    } else {
        p.ipv6({.src = src, .dst = dst, .hop_limit = hop_limit});
        if (rng.chance(0.1))
            p.ext(Ipv6Ext::hop_by_hop(static_cast<std::uint8_t>(rng.between(0, 2))));
        if (rng.chance(0.05))
            p.ext(Ipv6Ext::dest_opts());
        if (rng.chance(0.05))
            p.ext(Ipv6Ext::ah(static_cast<std::uint8_t>(rng.between(1, 6))));
        if (later_fragment)
            p.ext(Ipv6Ext::fragment(offset, rng.chance(0.5)));
        else if (first_fragment)
            p.ext(Ipv6Ext::fragment(0, rng.chance(0.8)));
    }

    if (later_fragment) {
        p.raw_l4(f.proto);
        Bytes payload(static_cast<std::size_t>(rng.between(1, 40)));
        for (auto& b : payload)
            b = rng.byte();
        p.payload(std::move(payload));
        p.flow_ids(sport, flow);
        return out;
    }
    switch (f.proto) {
    case kProtoTcp:
        p.tcp({.dport = f.port, .flags = kTcpSyn});
        break;
    case kProtoUdp:
        p.udp({.dport = f.port});
        break;
    case kProtoSctp:
        p.sctp({.dport = f.port});
        break;
    case kProtoIcmp:
        p.icmp({.type = static_cast<std::uint8_t>(f.port >> 8),
                .code = static_cast<std::uint8_t>(f.port & 0xff)});
        break;
    case kProtoIcmpv6:
        p.icmpv6({.type = static_cast<std::uint8_t>(f.port >> 8),
                  .code = static_cast<std::uint8_t>(f.port & 0xff)});
        break;
    default:
        p.raw_l4(f.proto);
        break;
    }
    p.payload(static_cast<std::size_t>(rng.between(0, 64)), rng.byte());
    p.flow_ids(sport, flow);
    return out;
}

// ---------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------


std::string verdict_text(const Verdict& v)
{
    return fmt::format("{}/{}/{}", to_string(v.kind), to_string(v.reason),
                       v.rule.value_or("(no rule)"));
}

std::string flow_text(const Flow& f)
{
    return fmt::format("{} -> {} proto {} port {}{}{}", f.src.str(), f.dst.str(), f.proto, f.port,
                       f.has_port ? "" : " (no port)", f.neighbour_discovery ? " (ND)" : "");
}

// Reads the reason counters and the counters of the rule ids in the table.
class CounterReader {
public:
    CounterReader(const Dataplane& dp, std::vector<std::uint32_t> rule_ids)
        : reasons_(dp.map_fd("bh_reason_cnt")), rules_(dp.map_fd("bh_rule_cnt")),
          rule_ids_(std::move(rule_ids))
    {
        snapshot(reason_packets_, rule_packets_);
    }

    // What moved since the last call: reason index -> packets, rule id -> packets.
    void moved(std::map<std::size_t, std::uint64_t>& reasons,
               std::map<std::uint32_t, std::uint64_t>& rules)
    {
        std::vector<std::uint64_t> now_reasons;
        std::vector<std::uint64_t> now_rules;
        snapshot(now_reasons, now_rules);
        reasons.clear();
        rules.clear();
        for (std::size_t i = 0; i < now_reasons.size(); i++) {
            if (now_reasons[i] != reason_packets_[i])
                reasons[i] = now_reasons[i] - reason_packets_[i];
        }
        for (std::size_t i = 0; i < now_rules.size(); i++) {
            if (now_rules[i] != rule_packets_[i])
                rules[rule_ids_[i]] = now_rules[i] - rule_packets_[i];
        }
        reason_packets_ = std::move(now_reasons);
        rule_packets_ = std::move(now_rules);
    }

    std::uint64_t reason_total(std::size_t index) const { return reason_packets_[index]; }
    std::uint64_t rule_total(std::uint32_t id) const { return rules_.sum(id).packets; }

private:
    void snapshot(std::vector<std::uint64_t>& reasons, std::vector<std::uint64_t>& rules) const
    {
        reasons.resize(kReasonNames.size());
        for (std::size_t i = 0; i < kReasonNames.size(); i++)
            reasons[i] = reasons_.sum(static_cast<std::uint32_t>(i)).packets;
        rules.resize(rule_ids_.size());
        for (std::size_t i = 0; i < rule_ids_.size(); i++)
            rules[i] = rules_.sum(rule_ids_[i]).packets;
    }

    PerCpuCounters reasons_;
    PerCpuCounters rules_;
    std::vector<std::uint32_t> rule_ids_;
    std::vector<std::uint64_t> reason_packets_;
    std::vector<std::uint64_t> rule_packets_;
};

// The rule ids the generation in force refers to.
std::vector<std::uint32_t> table_rule_ids(const Dataplane& dp)
{
    BpfFd policy = active_inner_map(dp, "bh_policy");
    std::set<std::uint32_t> ids;
    for (const auto& [key, value] : dump_map<bh_policy_key, bh_policy_value>(policy.get()))
        ids.insert(value.rule_id);
    return {ids.begin(), ids.end()};
}

class DifferentialTest : public DataplaneTest {
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

    void run(const struct Shape& shape);

    std::vector<Prefix> hosts_;
    int prog_fd_ = -1;
};

// How big the random policies are, and how many of them run.
struct Shape {
    int max_identities;
    int max_rules;
    std::uint64_t policies;  // BULKHEAD_DIFF_POLICIES overrides
    std::uint64_t packets;   // per policy; BULKHEAD_DIFF_PACKETS overrides
    // explain() on every n-th packet: it recompiles the policy in force
    // each call, which dominates the run time with large policies
    std::uint64_t explain_every = 1;
};

void DifferentialTest::run(const Shape& shape)
{
    const std::uint64_t seed = testing::test_seed();
    const std::uint64_t policies = env_number("BULKHEAD_DIFF_POLICIES", shape.policies);
    const std::uint64_t packets = env_number("BULKHEAD_DIFF_PACKETS", shape.packets);
    const int max_reports = 25;
    SCOPED_TRACE(fmt::format("BULKHEAD_SEED={}", seed));
    fmt::print("differential: BULKHEAD_SEED={} ({} policies of up to {} identities and {} rules "
               "x {} packets)\n",
               seed, policies, shape.max_identities, shape.max_rules, packets);

    int reports = 0;
    std::uint64_t checked = 0;
    SentFlows sent;  // tracking state outlives a policy
    std::uint64_t flow = 0;
    std::map<std::string, std::uint64_t> seen;  // reason -> packets, to show the mix
    auto started = std::chrono::steady_clock::now();

    for (std::uint64_t i = 0; i < policies && reports < max_reports; i++) {
        Rng rng(seed * 0x9e3779b97f4a7c15ull + i);
        Generated g = random_policy(rng, shape.max_identities, shape.max_rules);
        SCOPED_TRACE(fmt::format("policy #{}:\n{}", i, g.yaml));
        Policy policy;
        try {
            policy = Policy::parse(g.yaml, "<random>");
            dp_->apply(policy, "<random>");
        } catch (const Error& e) {
            ADD_FAILURE() << "cannot apply policy #" << i << ": " << e.what();
            reports++;
            continue;
        }

        std::vector<std::uint32_t> ids = table_rule_ids(*dp_);
        CounterReader counters(*dp_, ids);
        std::map<std::uint32_t, std::string> id_names;  // bound on first hit
        std::map<std::uint32_t, std::uint64_t> counted;  // packets per rule id since apply
        const Stats start = dp_->stats();
        auto counted_by_stats = [&](const std::string& name) -> std::uint64_t {
            Stats now = dp_->stats();
            auto of = [&](const Stats& s) -> std::uint64_t {
                for (const RuleCounter& r : s.rules) {
                    if (r.name == name)
                        return r.counter.packets;
                }
                return 0;
            };
            return of(now) - of(start);
        };
        std::map<std::size_t, std::uint64_t> reasons;
        std::map<std::uint32_t, std::uint64_t> rules;

        for (std::uint64_t j = 0; j < packets && reports < max_reports; j++) {
            std::optional<GeneratedPacket> made;
            while (!made)
                made = random_packet(rng, g, static_cast<std::uint32_t>(flow++), sent);
            GeneratedPacket& pk = *made;
            Verdict want = reference_verdict(policy, pk.flow, Direction::ingress, hosts_);
            std::string want_reason = reason_counter(want);
            std::uint32_t want_action = want.passes() ? kXdpPass : kXdpDrop;

            XdpRun run = run_xdp(prog_fd_, pk.packet.bytes());
            counters.moved(reasons, rules);
            Verdict explained = want;
            if (j % shape.explain_every == 0) {
                explained = dp_->explain(pk.flow).verdict;
                explained.src_identity = 0;
                explained.dst_identity = 0;
            }

            std::string got_reason;
            for (const auto& [index, count] : reasons) {
                got_reason += fmt::format("{}{}{}", got_reason.empty() ? "" : ",",
                                          kReasonNames[index],
                                          count == 1 ? "" : fmt::format("+{}", count));
            }
            std::optional<std::string> got_rule;
            std::string rule_problem;
            if (rules.size() > 1 || (rules.size() == 1 && rules.begin()->second != 1)) {
                rule_problem = fmt::format("{} rule counters moved", rules.size());
            } else if (rules.size() == 1) {
                std::uint32_t id = rules.begin()->first;
                counted[id]++;
                if (auto bound = id_names.find(id); bound != id_names.end()) {
                    got_rule = bound->second;
                } else if (want.rule && counted_by_stats(*want.rule) == counted[id]) {
                    // first hit of this id: stats() by name says whose it is
                    id_names.emplace(id, *want.rule);
                    got_rule = want.rule;
                } else {
                    got_rule = fmt::format("rule id {}", id);
                }
            }
            bool ok = run.retval == want_action && got_reason == want_reason &&
                      got_rule == want.rule && rule_problem.empty() && explained == want;
            checked++;
            seen[want_reason]++;
            if (ok)
                continue;
            reports++;
            ADD_FAILURE() << fmt::format(
                "policy #{} packet #{}: {}\n  flow: {}\n  reference: {} (XDP {}, counter {})\n"
                "  XDP: {} counter {} rule {}{}\n  explain: {}",
                i, j, pk.packet.describe(), flow_text(pk.flow), verdict_text(want),
                xdp_action_name(want_action), want_reason, xdp_action_name(run.retval),
                got_reason.empty() ? "(none)" : got_reason, got_rule.value_or("(none)"),
                rule_problem.empty() ? "" : " (" + rule_problem + ")", verdict_text(explained));
        }

        // the rule ids bound above are the names stats() reports
        Stats stats = dp_->stats();
        for (const auto& [id, name] : id_names) {
            auto it = std::find_if(stats.rules.begin(), stats.rules.end(),
                                   [&](const RuleCounter& r) { return r.name == name; });
            if (it == stats.rules.end()) {
                ADD_FAILURE() << "policy #" << i << ": stats() has no rule '" << name << "'";
                continue;
            }
            EXPECT_EQ(it->counter.packets, counters.rule_total(id))
                << "policy #" << i << ": rule '" << name << "' is counted at id " << id
                << " but stats() reports another counter";
        }
        for (const auto& [name, counter] : stats.reasons) {
            auto index = std::find(kReasonNames.begin(), kReasonNames.end(), name);
            if (index == kReasonNames.end())
                continue;
            EXPECT_EQ(counter.packets,
                      counters.reason_total(static_cast<std::size_t>(index - kReasonNames.begin())))
                << "reason " << name;
        }
    }

    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started);
    fmt::print("differential: {} packets checked in {:.1f} s; reference reasons:", checked,
               seconds.count());
    for (const auto& [name, count] : seen)
        fmt::print(" {} {}", name, count);
    fmt::print("\n");
    if (reports < max_reports) {
        EXPECT_EQ(checked, policies * packets);
    }
}

// Many small policies: 200 x 500 = 100,000 packets.
TEST_F(DifferentialTest, XdpAndExplainEqualTheReferenceEvaluator)
{
    run({.max_identities = 5, .max_rules = 8, .policies = 200, .packets = 500});
}

// Fewer, larger policies, where more rules overlap and fold together (tens of
// thousands of table entries).
TEST_F(DifferentialTest, LargePoliciesEqualTheReferenceEvaluator)
{
    run({.max_identities = 16, .max_rules = 40, .policies = 25, .packets = 400,
         .explain_every = 8});
}

}  // namespace
}  // namespace bulkhead::test
