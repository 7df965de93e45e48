// Addresses and prefixes: parsing, printing, containment.
#include <bulkhead/types.hpp>

#include <gtest/gtest.h>

#include <optional>
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

Prefix prefix(std::string_view text)
{
    std::optional<Prefix> parsed = Prefix::parse(text);
    EXPECT_TRUE(parsed.has_value()) << text;
    return parsed.value_or(Prefix{});
}

struct AddrCase {
    std::string text;
    std::string printed;
    bool v4;
};

TEST(IpAddr, ParsesAndPrints)
{
    const std::vector<AddrCase> cases = {
        {"198.51.100.7", "198.51.100.7", true},
        {"0.0.0.0", "0.0.0.0", true},
        {"255.255.255.255", "255.255.255.255", true},
        // an IPv4-mapped IPv6 address is its IPv4 address
        {"::ffff:198.51.100.7", "198.51.100.7", true},
        {"::FFFF:c633:6407", "198.51.100.7", true},
        {"2001:db8::1", "2001:db8::1", false},
        {"2001:DB8:0:0:0:0:0:1", "2001:db8::1", false},
        {"::", "::", false},
        {"::1", "::1", false},
        {"fe80::1", "fe80::1", false},
    };
    for (const auto& c : cases) {
        std::optional<IpAddr> parsed = IpAddr::parse(c.text);
        ASSERT_TRUE(parsed.has_value()) << c.text;
        EXPECT_EQ(parsed->str(), c.printed) << c.text;
        EXPECT_EQ(parsed->is_v4(), c.v4) << c.text;
    }
}

TEST(IpAddr, RejectsWhatIsNotAnAddress)
{
    const std::vector<std::string> cases = {
        "",           "198.51.100",       "198.51.100.256", "198.51.100.7.1",
        " 1.2.3.4",   "1.2.3.4 ",         "1.2.3.4/32",     "2001:db8::1::2",
        "2001:db8:::1", "fe80::1%eth0",   "web",            std::string("1.2.3.4\0x", 9),
    };
    for (const auto& text : cases)
        EXPECT_FALSE(IpAddr::parse(text).has_value()) << text;
}

TEST(IpAddr, MappedFormIsTheSameValue)
{
    EXPECT_EQ(addr("::ffff:198.51.100.7"), addr("198.51.100.7"));
    EXPECT_EQ(IpAddr::v4(0xc6336407), addr("198.51.100.7"));  // 198.51.100.7 in host order
    EXPECT_NE(addr("::198.51.100.7"), addr("198.51.100.7"));  // IPv4-compatible is not mapped
    EXPECT_FALSE(addr("::198.51.100.7").is_v4());
}

struct PrefixCase {
    std::string text;
    int len;          // bits of the 128-bit form
    int family_len;   // as written
    std::string printed;
};

TEST(Prefix, ParsesAndPrintsAsWritten)
{
    const std::vector<PrefixCase> cases = {
        {"198.51.100.0/24", 120, 24, "198.51.100.0/24"},
        {"2001:db8::/32", 32, 32, "2001:db8::/32"},
        {"198.51.100.7", 128, 32, "198.51.100.7/32"},
        {"198.51.100.7/32", 128, 32, "198.51.100.7/32"},
        {"2001:db8::20", 128, 128, "2001:db8::20/128"},
        {"0.0.0.0/0", 96, 0, "0.0.0.0/0"},
        {"::/0", 0, 0, "::/0"},
        {"::ffff:198.51.100.0/120", 120, 24, "198.51.100.0/24"},
        {"::ffff:0:0/96", 96, 0, "0.0.0.0/0"},
        {"198.51.100.0/024", 120, 24, "198.51.100.0/24"},
    };
    for (const auto& c : cases) {
        std::string why;
        std::optional<Prefix> parsed = Prefix::parse(c.text, &why);
        ASSERT_TRUE(parsed.has_value()) << c.text << ": " << why;
        EXPECT_EQ(parsed->len, c.len) << c.text;
        EXPECT_EQ(parsed->family_len(), c.family_len) << c.text;
        EXPECT_EQ(parsed->str(), c.printed) << c.text;
        EXPECT_EQ(Prefix::parse(parsed->str()), parsed) << c.text << " reads back";
    }
}

struct BadPrefixCase {
    std::string text;
    std::string why;
};

TEST(Prefix, RejectsWithAReason)
{
    const std::string example = "expected a prefix such as 198.51.100.0/24 or 2001:db8::/32";
    const std::vector<BadPrefixCase> cases = {
        {"198.51.100.1/24", "host bits set; did you mean 198.51.100.0/24?"},
        {"2001:db8::1/32", "host bits set; did you mean 2001:db8::/32?"},
        {"198.51.100.0/33", "prefix length 33 is out of range; expected 0-32 for IPv4"},
        {"2001:db8::/129", "prefix length 129 is out of range; expected 0-128 for IPv6"},
        {"198.51.100.0/99999999999",
         "prefix length 99999999999 is out of range; expected 0-32 for IPv4"},
        {"198.51.100.0/", "prefix length '' is not a number; expected 0-32 for IPv4"},
        {"198.51.100.0/+24", "prefix length '+24' is not a number; expected 0-32 for IPv4"},
        {"198.51.100.0/-1", "prefix length '-1' is not a number; expected 0-32 for IPv4"},
        {"198.51.100.0/24/8", "prefix length '24/8' is not a number; expected 0-32 for IPv4"},
        {"/24", "'' is not an IPv4 or IPv6 address; " + example},
        {"web/24", "'web' is not an IPv4 or IPv6 address; " + example},
        {"198.51.100.0.0/24", "'198.51.100.0.0' is not an IPv4 or IPv6 address; " + example},
    };
    for (const auto& c : cases) {
        std::string why;
        EXPECT_FALSE(Prefix::parse(c.text, &why).has_value()) << c.text;
        EXPECT_EQ(why, c.why) << c.text;
    }
}

struct ContainsCase {
    std::string prefix;
    std::string addr;
    bool contained;
};

TEST(Prefix, ContainsAddresses)
{
    const std::vector<ContainsCase> cases = {
        {"198.51.100.0/24", "198.51.100.7", true},
        {"198.51.100.0/24", "198.51.100.255", true},
        {"198.51.100.0/24", "198.51.101.7", false},
        {"198.51.100.0/24", "::ffff:198.51.100.7", true},
        // byte order: the mirrored address is not inside (field case K1)
        {"198.51.100.0/24", "0.100.51.198", false},
        {"198.51.100.0/25", "198.51.100.128", false},
        {"198.51.100.7/32", "198.51.100.7", true},
        {"198.51.100.7/32", "198.51.100.8", false},
        // 0.0.0.0/0 is every IPv4 address and no IPv6 address
        {"0.0.0.0/0", "203.0.113.10", true},
        {"0.0.0.0/0", "2001:db8::10", false},
        // ::/0 is every IPv6 address and no IPv4 address, as in nftables:
        // a rule written for IPv6 must not open IPv4
        {"::/0", "2001:db8::10", true},
        {"::/0", "203.0.113.10", false},
        {"::/0", "::ffff:203.0.113.10", false},
        {"2001:db8::/32", "2001:db8::10", true},
        {"2001:db8::/32", "2001:db9::10", false},
        {"2001:db8::/33", "2001:db8:8000::1", false},
    };
    for (const auto& c : cases) {
        EXPECT_EQ(prefix(c.prefix).contains(addr(c.addr)), c.contained)
            << c.prefix << " " << c.addr;
    }
}

TEST(Prefix, ContainsPrefixes)
{
    EXPECT_TRUE(prefix("198.51.100.0/24").contains(prefix("198.51.100.0/24")));
    EXPECT_TRUE(prefix("198.51.100.0/24").contains(prefix("198.51.100.64/26")));
    EXPECT_FALSE(prefix("198.51.100.64/26").contains(prefix("198.51.100.0/24")));
    EXPECT_TRUE(prefix("0.0.0.0/0").contains(prefix("198.51.100.0/24")));
    EXPECT_FALSE(prefix("0.0.0.0/0").contains(prefix("::/0")));
    EXPECT_FALSE(prefix("::/0").contains(prefix("0.0.0.0/0")));
}

TEST(Types, VerdictNames)
{
    EXPECT_EQ(to_string(VerdictKind::allow), "allow");
    EXPECT_EQ(to_string(VerdictKind::deny), "deny");
    EXPECT_EQ(to_string(VerdictKind::audit), "audit");
    EXPECT_EQ(to_string(Reason::rule), "rule");
    EXPECT_EQ(to_string(Reason::default_mode), "default");
    EXPECT_EQ(to_string(Reason::tracked), "tracked");
    EXPECT_EQ(to_string(Reason::failsafe), "failsafe");
    EXPECT_EQ(to_string(Reason::not_policed), "not-policed");
}

}  // namespace
}  // namespace bulkhead
