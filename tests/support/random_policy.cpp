#include "support/random_policy.hpp"

#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <set>
#include <string_view>

namespace bulkhead::testing {
namespace {

template <typename T>
const T& pick(std::mt19937_64& rng, const std::vector<T>& items)
{
    return items[std::uniform_int_distribution<std::size_t>(0, items.size() - 1)(rng)];
}

bool chance(std::mt19937_64& rng, double p)
{
    return std::bernoulli_distribution(p)(rng);
}

int uniform(std::mt19937_64& rng, int lo, int hi)
{
    return std::uniform_int_distribution<int>(lo, hi)(rng);
}

Prefix random_prefix(std::mt19937_64& rng)
{
    if (chance(rng, 0.6)) {
        static const std::vector<int> lens{32, 32, 30, 28, 24, 16, 0};
        int len = pick(rng, lens);
        std::uint32_t base = chance(rng, 0.8) ? 0xC6336400u : 0xCB007100u;  // .100 / .113
        std::uint32_t addr = base | static_cast<std::uint32_t>(uniform(rng, 0, 15));
        std::uint32_t mask = len == 0 ? 0 : ~0u << (32 - len);
        return Prefix{IpAddr::v4(addr & mask), static_cast<std::uint8_t>(96 + len)};
    }
    static const std::vector<int> lens{128, 128, 124, 120, 64, 32, 0};
    int len = pick(rng, lens);
    IpAddr a = *IpAddr::parse("2001:db8::");
    a.bytes[15] = static_cast<std::uint8_t>(uniform(rng, 0, 15));
    Prefix p{a, static_cast<std::uint8_t>(len)};
    for (int bit = len; bit < 128; ++bit)
        p.addr.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80u >> (bit % 8)));
    return p;
}

const std::vector<std::string> kApps{"web", "db", "cache", "api"};
const std::vector<std::string> kEnvs{"prod", "staging"};

SelectorTerm random_term(std::mt19937_64& rng)
{
    SelectorTerm t;
    int kind = uniform(rng, 0, 9);
    if (kind == 0) {
        t.kind = SelectorTerm::Kind::any;
    } else if (kind == 1) {
        t.kind = SelectorTerm::Kind::world;
    } else if (kind <= 3) {
        t.kind = SelectorTerm::Kind::cidr;
        t.cidr = random_prefix(rng);
    } else {
        t.kind = SelectorTerm::Kind::labels;
        if (chance(rng, 0.8))
            t.match["app"] = {pick(rng, kApps)};
        if (chance(rng, 0.4) || t.match.empty())
            t.match["env"] = chance(rng, 0.5) ? kEnvs : std::vector<std::string>{pick(rng, kEnvs)};
    }
    return t;
}

Selector random_selector(std::mt19937_64& rng)
{
    Selector s;
    int terms = chance(rng, 0.8) ? 1 : 2;
    for (int i = 0; i < terms; ++i)
        s.terms.push_back(random_term(rng));
    return s;
}

PortSpec random_port(std::mt19937_64& rng)
{
    using P = PortSpec::Proto;
    static const std::vector<std::uint16_t> ports{22, 80, 443, 1000, 2000, 5432, 65535, 1};
    switch (uniform(rng, 0, 9)) {
    case 0:
        return PortSpec{P::any, 0, 0xffff};
    case 1:
        return PortSpec{chance(rng, 0.5) ? P::tcp : P::udp, 0, 0xffff};
    case 2: {
        std::uint16_t a = pick(rng, ports), b = pick(rng, ports);
        return PortSpec{P::tcp, std::min(a, b), std::max(a, b)};
    }
    case 3:
        return PortSpec{P::icmp, 0x0800, chance(rng, 0.5) ? std::uint16_t{0x08ff} : std::uint16_t{0x0800}};
    case 4:
        return PortSpec{P::icmpv6, 0x8000, 0x80ff};
    case 5:
        return PortSpec{P::sctp, 0, 0xffff};
    default: {
        std::uint16_t port = pick(rng, ports);
        return PortSpec{chance(rng, 0.7) ? P::tcp : P::udp, port, port};
    }
    }
}

Mode random_mode(std::mt19937_64& rng)
{
    static const std::vector<Mode> modes{Mode::allow, Mode::audit, Mode::enforce, Mode::enforce};
    return pick(rng, modes);
}

IpAddr address_in(std::mt19937_64& rng, const Prefix& p)
{
    IpAddr a = p.addr;
    for (int bit = p.len; bit < 128; ++bit) {
        // mostly low host bits, so addresses land on other prefixes too
        bool set = bit >= 124 ? chance(rng, 0.5) : chance(rng, 0.02);
        if (set)
            a.bytes[bit / 8] |= static_cast<std::uint8_t>(0x80u >> (bit % 8));
    }
    return a;
}

}  // namespace

std::uint64_t test_seed()
{
    if (const char* env = std::getenv("BULKHEAD_SEED"))
        return std::strtoull(env, nullptr, 0);
    // CI runs one known seed, so a red run replays exactly; elsewhere every
    // run explores a new one
    if (const char* ci = std::getenv("CI"); ci != nullptr && std::string_view(ci) == "true")
        return kCiSeed;
    return static_cast<std::uint64_t>(
        std::chrono::steady_clock::now().time_since_epoch().count());
}

Policy random_policy(std::mt19937_64& rng)
{
    Policy p;
    p.default_ingress = random_mode(rng);
    p.default_egress = random_mode(rng);

    std::set<Prefix> used_prefixes;
    std::set<Labels> used_labels;
    int identities = uniform(rng, 1, 6);
    for (int i = 0; i < identities; ++i) {
        Identity ident;
        ident.name = fmt::format("id{}", i);
        ident.labels = {{"app", pick(rng, kApps)}, {"env", pick(rng, kEnvs)}};
        if (chance(rng, 0.3))
            ident.labels["n"] = std::to_string(i);
        if (!used_labels.insert(ident.labels).second)
            continue;
        int cidrs = uniform(rng, 0, 3);
        for (int c = 0; c < cidrs; ++c) {
            Prefix prefix = random_prefix(rng);
            if (used_prefixes.insert(prefix).second)
                ident.cidrs.push_back(prefix);
        }
        ident.ingress = random_mode(rng);
        ident.egress = random_mode(rng);
        p.identities.push_back(std::move(ident));
    }

    int rules = uniform(rng, 0, 8);
    for (int r = 0; r < rules; ++r) {
        Rule rule;
        rule.name = fmt::format("r{}", r);
        rule.from = random_selector(rng);
        rule.to = random_selector(rng);
        int ports = uniform(rng, 1, 3);
        for (int i = 0; i < ports; ++i)
            rule.ports.push_back(random_port(rng));
        rule.action = chance(rng, 0.35) ? Action::deny : Action::allow;
        p.rules.push_back(std::move(rule));
    }
    return p;
}

Flow random_flow(std::mt19937_64& rng, const Policy& policy)
{
    std::vector<Prefix> pool;
    for (const Identity& ident : policy.identities)
        pool.insert(pool.end(), ident.cidrs.begin(), ident.cidrs.end());
    for (const Rule& rule : policy.rules)
        for (const Selector* s : {&rule.from, &rule.to})
            for (const SelectorTerm& t : s->terms)
                if (t.kind == SelectorTerm::Kind::cidr)
                    pool.push_back(t.cidr);

    bool v6 = chance(rng, 0.4);
    auto endpoint = [&]() {
        std::vector<Prefix> family;
        for (const Prefix& p : pool)
            if (p.addr.is_v4() != v6 || (p.len == 0 && v6))
                family.push_back(p);
        if (!family.empty() && chance(rng, 0.8))
            return address_in(rng, pick(rng, family));
        return address_in(rng, v6 ? *Prefix::parse("2001:db8::/120")
                                  : *Prefix::parse("198.51.100.0/28"));
    };

    Flow f;
    f.src = endpoint();
    f.dst = endpoint();
    static const std::vector<std::uint8_t> protos{6, 6, 6, 17, 17, 132, 47};
    f.proto = v6 && chance(rng, 0.2) ? 58 : (!v6 && chance(rng, 0.15) ? 1 : pick(rng, protos));
    static const std::vector<std::uint16_t> ports{0, 1, 21, 22, 23, 79, 80, 443, 999, 1000,
                                                  1500, 2000, 2001, 5432, 65535};
    f.port = pick(rng, ports);
    if (f.proto == 1 || f.proto == 58) {
        static const std::vector<std::uint16_t> icmp{0x0800, 0x0801, 0x0000, 0x8000, 0x8100,
                                                     0x0304};
        f.port = pick(rng, icmp);
    }
    if (f.proto == 47)
        f.port = 0;
    f.has_port = !chance(rng, 0.1);
    if (!f.has_port)
        f.port = 0;
    return f;
}

}  // namespace bulkhead::testing
