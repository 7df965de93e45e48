// The policy file parser: what valid files mean, and the exact message, with
// line and column, for each way a file can be wrong.
#include <bulkhead/policy.hpp>

#include <gtest/gtest.h>

#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

// CMake passes the source directory; a standalone build run from the
// repository root finds the examples relative to it.
#ifndef BULKHEAD_SOURCE_DIR
#define BULKHEAD_SOURCE_DIR "."
#endif

namespace bulkhead {
namespace {

namespace fs = std::filesystem;

Prefix prefix(std::string_view text)
{
    return Prefix::parse(text).value();
}

SelectorTerm labels_term(std::map<std::string, std::vector<std::string>> match)
{
    return SelectorTerm{SelectorTerm::Kind::labels, std::move(match), {}};
}

SelectorTerm keyword_term(SelectorTerm::Kind kind)
{
    return SelectorTerm{kind, {}, {}};
}

SelectorTerm cidr_term(std::string_view text)
{
    return SelectorTerm{SelectorTerm::Kind::cidr, {}, prefix(text)};
}

// The message Policy::parse throws, or "" when the text validates.
std::string parse_error(const std::string& text)
{
    try {
        Policy::parse(text, "policy.yaml");
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// A file in the temporary directory, removed at the end of the test.
class TempFile {
public:
    TempFile(const std::string& name, const std::string& text)
        : path_(fs::temp_directory_path() / fmt_name(name))
    {
        std::ofstream(path_) << text;
    }
    ~TempFile() { fs::remove(path_); }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;

    const fs::path& path() const { return path_; }

private:
    static std::string fmt_name(const std::string& name)
    {
        return "bulkhead-" + std::to_string(getpid()) + "-" + name;
    }
    fs::path path_;
};

// ---- valid files ----------------------------------------------------------

const char* const full_policy = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: audit}
identities:
  - name: web
    labels: {app: web, env: prod}
    cidrs: [198.51.100.10/32, "2001:db8::10/128", 198.51.100.64/26]
    cgroups: [/sys/fs/cgroup/web.slice]
  - name: db
    labels:
      app: db
      env: prod
    cidrs: [198.51.100.20]
    ingress: audit
    egress: allow
rules:
  - name: web-to-db
    from: {app: web}
    to: {app: db, env: [prod, staging]}
    ports: [tcp/5432, udp/5000-5100, icmp/8, icmpv6/128/0]
    action: allow
  - name: office-ssh
    from: {cidr: 203.0.113.0/24}
    to: any
    ports: [tcp/22]
    action: allow
  - name: no-world
    from: [world, host, {cidr: "2001:db8::/32"}]
    to: {app: db}
    action: deny
failsafe: {ports: [tcp/22, tcp/2222], from: [203.0.113.0/24], enabled: true}
)";

TEST(PolicyParse, FullFile)
{
    Policy policy = Policy::parse(full_policy, "policy.yaml");

    EXPECT_EQ(policy.api_version, "bulkhead/v1");
    EXPECT_EQ(policy.default_ingress, Mode::enforce);
    EXPECT_EQ(policy.default_egress, Mode::audit);
    EXPECT_TRUE(policy.warnings.empty());

    ASSERT_EQ(policy.identities.size(), 2u);
    const Identity& web = policy.identities[0];
    EXPECT_EQ(web.name, "web");
    EXPECT_EQ(web.labels, (Labels{{"app", "web"}, {"env", "prod"}}));
    EXPECT_EQ(web.cidrs, (std::vector<Prefix>{prefix("198.51.100.10/32"),
                                              prefix("2001:db8::10/128"),
                                              prefix("198.51.100.64/26")}));
    EXPECT_EQ(web.cgroups, std::vector<std::string>{"/sys/fs/cgroup/web.slice"});
    // an identity that says nothing takes the defaults
    EXPECT_EQ(web.ingress, Mode::enforce);
    EXPECT_EQ(web.egress, Mode::audit);
    EXPECT_EQ(web.where.line, 4);
    EXPECT_EQ(web.where.column, 5);

    const Identity& db = policy.identities[1];
    EXPECT_EQ(db.labels, (Labels{{"app", "db"}, {"env", "prod"}}));
    EXPECT_EQ(db.cidrs, std::vector<Prefix>{prefix("198.51.100.20/32")});
    EXPECT_TRUE(db.cgroups.empty());
    EXPECT_EQ(db.ingress, Mode::audit);
    EXPECT_EQ(db.egress, Mode::allow);
    EXPECT_EQ(db.where.line, 8);
}

TEST(PolicyParse, FullFileRules)
{
    Policy policy = Policy::parse(full_policy, "policy.yaml");
    ASSERT_EQ(policy.rules.size(), 3u);

    const Rule& web_to_db = policy.rules[0];
    EXPECT_EQ(web_to_db.name, "web-to-db");
    EXPECT_EQ(web_to_db.from.terms, std::vector{labels_term({{"app", {"web"}}})});
    EXPECT_EQ(web_to_db.to.terms,
              std::vector{labels_term({{"app", {"db"}}, {"env", {"prod", "staging"}}})});
    using P = PortSpec::Proto;
    EXPECT_EQ(web_to_db.ports, (std::vector<PortSpec>{{P::tcp, 5432, 5432},
                                                      {P::udp, 5000, 5100},
                                                      {P::icmp, 0x0800, 0x08ff},
                                                      {P::icmpv6, 0x8000, 0x8000}}));
    EXPECT_EQ(web_to_db.action, Action::allow);
    EXPECT_EQ(web_to_db.where.line, 16);
    EXPECT_EQ(web_to_db.where.column, 5);

    const Rule& office = policy.rules[1];
    EXPECT_EQ(office.from.terms, std::vector{cidr_term("203.0.113.0/24")});
    EXPECT_EQ(office.to.terms, std::vector{keyword_term(SelectorTerm::Kind::any)});

    const Rule& no_world = policy.rules[2];
    EXPECT_EQ(no_world.from.terms, (std::vector{keyword_term(SelectorTerm::Kind::world),
                                                keyword_term(SelectorTerm::Kind::host),
                                                cidr_term("2001:db8::/32")}));
    // ports default to every protocol and port
    EXPECT_EQ(no_world.ports, std::vector<PortSpec>{PortSpec{}});
    EXPECT_EQ(no_world.action, Action::deny);

    EXPECT_TRUE(policy.failsafe.enabled);
    EXPECT_EQ(policy.failsafe.ports,
              (std::vector<PortSpec>{{P::tcp, 22, 22}, {P::tcp, 2222, 2222}}));
    EXPECT_EQ(policy.failsafe.from, std::vector<Prefix>{prefix("203.0.113.0/24")});
}

TEST(PolicyParse, Defaults)
{
    Policy policy = Policy::parse("apiVersion: bulkhead/v1\n");

    EXPECT_EQ(policy.default_ingress, Mode::allow);
    EXPECT_EQ(policy.default_egress, Mode::allow);
    EXPECT_TRUE(policy.identities.empty());
    EXPECT_TRUE(policy.rules.empty());
    EXPECT_TRUE(policy.failsafe.enabled);
    EXPECT_EQ(policy.failsafe.ports,
              std::vector<PortSpec>{(PortSpec{PortSpec::Proto::tcp, 22, 22})});
    EXPECT_EQ(policy.failsafe.from,
              (std::vector<Prefix>{prefix("0.0.0.0/0"), prefix("::/0")}));
}

TEST(PolicyParse, EmptySectionsAreEmpty)
{
    Policy policy = Policy::parse("apiVersion: bulkhead/v1\ndefaults:\nidentities:\nrules: []\n"
                                  "failsafe:\n");
    EXPECT_TRUE(policy.identities.empty());
    EXPECT_TRUE(policy.rules.empty());
    EXPECT_TRUE(policy.failsafe.enabled);
}

TEST(PolicyParse, FailsafeCanBeTurnedOff)
{
    Policy policy = Policy::parse("apiVersion: bulkhead/v1\nfailsafe: {enabled: false}\n");
    EXPECT_FALSE(policy.failsafe.enabled);
}

// Field case P1: prefixes of length zero are valid selectors.
TEST(PolicyParse, PrefixLengthZeroValidates)
{
    Policy policy = Policy::parse(R"(apiVersion: bulkhead/v1
rules:
  - name: https-from-anywhere
    from: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
    to: any
    ports: [tcp/443]
    action: allow
)");
    ASSERT_EQ(policy.rules.size(), 1u);
    EXPECT_EQ(policy.rules[0].from.terms,
              (std::vector{cidr_term("0.0.0.0/0"), cidr_term("::/0")}));
    EXPECT_TRUE(policy.warnings.empty());
}

// ---- ports ----------------------------------------------------------------

struct PortCase {
    std::string text;
    PortSpec spec;
    std::string printed;
};

TEST(PortSpec, Parses)
{
    using P = PortSpec::Proto;
    const std::vector<PortCase> cases = {
        {"tcp/443", {P::tcp, 443, 443}, "tcp/443"},
        {"tcp/65535", {P::tcp, 65535, 65535}, "tcp/65535"},
        {"udp/5000-5100", {P::udp, 5000, 5100}, "udp/5000-5100"},
        {"udp/53-53", {P::udp, 53, 53}, "udp/53"},
        {"sctp/9", {P::sctp, 9, 9}, "sctp/9"},
        {"tcp", {P::tcp, 0, 0xffff}, "tcp"},
        {"udp", {P::udp, 0, 0xffff}, "udp"},
        {"sctp", {P::sctp, 0, 0xffff}, "sctp"},
        {"icmp", {P::icmp, 0, 0xffff}, "icmp"},
        {"icmp/8", {P::icmp, 0x0800, 0x08ff}, "icmp/8"},
        {"icmp/8/0", {P::icmp, 0x0800, 0x0800}, "icmp/8/0"},
        {"icmp/0", {P::icmp, 0x0000, 0x00ff}, "icmp/0"},
        {"icmp/255/255", {P::icmp, 0xffff, 0xffff}, "icmp/255/255"},
        {"icmpv6", {P::icmpv6, 0, 0xffff}, "icmpv6"},
        {"icmpv6/128", {P::icmpv6, 0x8000, 0x80ff}, "icmpv6/128"},
        {"icmpv6/128/0", {P::icmpv6, 0x8000, 0x8000}, "icmpv6/128/0"},
        {"any", {P::any, 0, 0xffff}, "any"},
    };
    for (const auto& c : cases) {
        std::string why;
        std::optional<PortSpec> spec = PortSpec::parse(c.text, &why);
        ASSERT_TRUE(spec.has_value()) << c.text << ": " << why;
        EXPECT_EQ(*spec, c.spec) << c.text;
        EXPECT_EQ(spec->str(), c.printed) << c.text;
    }
}

struct BadPortCase {
    std::string text;
    std::string why;
};

TEST(PortSpec, RejectsWithAReason)
{
    const std::string protocols = "expected one of: tcp, udp, sctp, icmp, icmpv6, any";
    const std::vector<BadPortCase> cases = {
        {"tcp/0", "port 0 is out of range; expected 1-65535"},
        {"tcp/65536", "port 65536 is out of range; expected 1-65535"},
        {"tcp/99999999999", "port 99999999999 is out of range; expected 1-65535"},
        {"udp/0-100", "port 0 is out of range; expected 1-65535"},
        {"udp/5100-5000", "port range 5100-5000 is reversed; expected LOW-HIGH with LOW <= HIGH"},
        {"tcp/http", "port 'http' is not a number; expected 1-65535"},
        {"tcp/-443", "port '' is not a number; expected 1-65535"},
        {"tcp/", "no port after 'tcp/'; expected tcp, tcp/PORT or tcp/LOW-HIGH"},
        {"tcp/1/2", "too many '/'; expected tcp, tcp/PORT or tcp/LOW-HIGH"},
        {"udp/1-2-3", "too many '-'; expected udp, udp/PORT or udp/LOW-HIGH"},
        {"icmp/256", "ICMP type 256 is out of range; expected 0-255"},
        {"icmp/8/256", "ICMP code 256 is out of range; expected 0-255"},
        {"icmpv6/128/300", "ICMPv6 code 300 is out of range; expected 0-255"},
        {"icmp/echo", "ICMP type 'echo' is not a number; expected 0-255"},
        {"icmp/8/0/1", "too many '/'; expected icmp, icmp/TYPE or icmp/TYPE/CODE"},
        {"tpc/443", "unknown protocol 'tpc'; " + protocols},
        {"TCP/443", "unknown protocol 'TCP'; " + protocols},
        {"", "unknown protocol ''; " + protocols},
        {"443", "port '443' has no protocol; expected tcp/443, udp/443 or sctp/443"},
        {"any/80", "'any' takes no port; expected any alone"},
    };
    for (const auto& c : cases) {
        std::string why;
        EXPECT_FALSE(PortSpec::parse(c.text, &why).has_value()) << c.text;
        EXPECT_EQ(why, c.why) << c.text;
    }
}

// ---- invalid files --------------------------------------------------------

struct BadFile {
    std::string description;
    std::string text;
    std::string message;
};

const std::string selector_forms =
    "expected any, world, host, a label mapping such as {app: web}, {cidr: PREFIX}, or a list "
    "of these";

// Two identities and one rule; the bad cases below change one line of it.
std::string rules_file(const std::string& rule_body)
{
    return "apiVersion: bulkhead/v1\n"  // 1
           "identities:\n"              // 2
           "  - name: web\n"            // 3
           "    labels: {app: web}\n"   // 4
           "  - name: db\n"             // 5
           "    labels: {app: db}\n"    // 6
           "rules:\n"                   // 7
           + rule_body;                 // 8 on
}

std::vector<BadFile> document_cases()
{
    const std::string shape =
        "expected a mapping with apiVersion: bulkhead/v1, identities and rules";
    const std::string syntax =
        "expected well-formed YAML; check indentation, quotes and brackets here";
    return {
        {"empty text", "", "policy.yaml:1:1: the policy is empty; " + shape},
        {"only a comment", "# nothing yet\n", "policy.yaml:1:1: the policy is empty; " + shape},
        {"top level is a list", "- apiVersion: bulkhead/v1\n",
         "policy.yaml:1:1: the policy is a list; " + shape},
        {"misaligned key", "apiVersion: bulkhead/v1\nrules:\n  - name: a\n   from: any\n",
         "policy.yaml:4:4: invalid YAML: end of sequence not found; " + syntax},
        {"indented key", "apiVersion: bulkhead/v1\n  rules: []\n",
         "policy.yaml:2:8: invalid YAML: illegal map value; " + syntax},
        {"unclosed bracket", "apiVersion: bulkhead/v1\nrules: [a, b\n",
         "policy.yaml:3:1: invalid YAML: end of sequence flow not found; " + syntax},
        {"two documents", "apiVersion: bulkhead/v1\n---\napiVersion: bulkhead/v1\n",
         "policy.yaml:3:1: a second YAML document starts here; expected one policy"},
        {"no apiVersion", "rules: []\n",
         "policy.yaml:1:1: missing 'apiVersion'; expected apiVersion: bulkhead/v1"},
        {"wrong apiVersion", "apiVersion: bulkhead/v2\n",
         "policy.yaml:1:13: unsupported apiVersion 'bulkhead/v2'; expected bulkhead/v1"},
        {"apiVersion a list", "apiVersion: [bulkhead/v1]\n",
         "policy.yaml:1:13: 'apiVersion' at top level is a list; expected bulkhead/v1"},
        {"unknown top-level key", "apiVersion: bulkhead/v1\nrulez: []\n",
         "policy.yaml:2:1: unknown key 'rulez' at top level; expected one of: apiVersion, "
         "defaults, identities, rules, failsafe"},
        {"duplicate top-level key", "apiVersion: bulkhead/v1\nrules: []\nrules: []\n",
         "policy.yaml:3:1: duplicate key 'rules' at top level; expected each key once"},
        {"unknown mode in defaults", "apiVersion: bulkhead/v1\ndefaults: {ingress: enforced}\n",
         "policy.yaml:2:21: unknown mode 'enforced' for 'ingress' in defaults; expected one of: "
         "enforce, audit, allow"},
        {"unknown key in defaults", "apiVersion: bulkhead/v1\ndefaults: {ingres: allow}\n",
         "policy.yaml:2:12: unknown key 'ingres' in defaults; expected one of: ingress, egress"},
        {"defaults a list", "apiVersion: bulkhead/v1\ndefaults: [allow]\n",
         "policy.yaml:2:11: 'defaults' is a list; expected a mapping such as {ingress: allow, "
         "egress: allow}"},
        {"identities a mapping", "apiVersion: bulkhead/v1\nidentities: {name: db}\n",
         "policy.yaml:2:13: 'identities' at top level is a mapping; expected a list of "
         "identities, each with name and labels"},
        {"rules a string", "apiVersion: bulkhead/v1\nrules: web-to-db\n",
         "policy.yaml:2:8: 'rules' at top level is the string 'web-to-db'; expected a list of "
         "rules, each with name, from, to and action"},
    };
}

std::vector<BadFile> identity_cases()
{
    const std::string head = "apiVersion: bulkhead/v1\nidentities:\n";
    const std::string labels = "expected a label mapping such as {app: db}";
    return {
        {"CIDR length out of range",
         head + "  - name: db\n    labels: {app: db}\n    cidrs: [198.51.100.0/33]\n",
         "policy.yaml:5:13: bad CIDR '198.51.100.0/33' in identity 'db': prefix length 33 is out "
         "of range; expected 0-32 for IPv4"},
        {"CIDR with host bits",
         head + "  - name: db\n    labels: {app: db}\n    cidrs: [198.51.100.1/24]\n",
         "policy.yaml:5:13: bad CIDR '198.51.100.1/24' in identity 'db': host bits set; did you "
         "mean 198.51.100.0/24?"},
        {"IPv6 CIDR out of range",
         head + "  - name: db\n    labels: {app: db}\n    cidrs: [\"2001:db8::/129\"]\n",
         "policy.yaml:5:13: bad CIDR '2001:db8::/129' in identity 'db': prefix length 129 is out "
         "of range; expected 0-128 for IPv6"},
        {"identity not a mapping", head + "  - db\n",
         "policy.yaml:3:5: identity #1 is the string 'db'; expected a mapping with name and "
         "labels"},
        {"identity without name", head + "  - labels: {app: db}\n",
         "policy.yaml:3:5: identity #1 has no 'name'; expected a name such as db"},
        {"identity with a misspelt name", head + "  - nmae: db\n    labels: {app: db}\n",
         "policy.yaml:3:5: unknown key 'nmae' in identity #1; expected one of: name, labels, "
         "cidrs, cgroups, ingress, egress"},
        {"identity with empty name", head + "  - name:\n    labels: {app: db}\n",
         "policy.yaml:3:5: 'name' in identity #1 is empty; expected a name such as db"},
        {"identity without labels", head + "  - name: db\n    cidrs: []\n",
         "policy.yaml:3:5: identity 'db' has no 'labels'; " + labels},
        {"empty labels", head + "  - name: db\n    labels: {}\n",
         "policy.yaml:4:13: 'labels' in identity 'db' is an empty mapping; " + labels},
        {"labels a list", head + "  - name: db\n    labels: [app]\n",
         "policy.yaml:4:13: 'labels' in identity 'db' is a list; " + labels},
        {"label value a list", head + "  - name: db\n    labels: {app: [db]}\n",
         "policy.yaml:4:19: 'app' in identity 'db' is a list; expected one value such as db"},
        {"label value empty", head + "  - name: db\n    labels: {app: }\n",
         "policy.yaml:4:14: 'app' in identity 'db' is empty; expected one value such as db"},
        {"label value with a control character",
         head + "  - name: db\n    labels: {app: \"d\\tb\"}\n",
         "policy.yaml:4:19: label value 'd\\x09b' in identity 'db' has a control or non-ASCII "
         "character; expected printable ASCII"},
        {"label value too long",
         head + "  - name: db\n    labels: {app: " + std::string(254, 'x') + "}\n",
         "policy.yaml:4:19: label value '" + std::string(254, 'x') +
             "' in identity 'db' is 254 characters long; expected at most 253"},
        {"label key with '='", head + "  - name: db\n    labels: {\"a=b\": db}\n",
         "policy.yaml:4:14: label key 'a=b' in identity 'db' contains '='; expected no ',' in "
         "labels and no '=' in keys"},
        {"label key cidr", head + "  - name: db\n    labels: {cidr: db}\n",
         "policy.yaml:4:14: label key 'cidr' in identity 'db' is reserved; expected another key: "
         "{cidr: PREFIX} in a selector means an address prefix"},
        {"duplicate label key", head + "  - name: db\n    labels: {app: db, app: web}\n",
         "policy.yaml:4:23: duplicate key 'app' in identity 'db'; expected each key once"},
        {"unknown key in identity",
         head + "  - name: db\n    labels: {app: db}\n    ingres: enforce\n",
         "policy.yaml:5:5: unknown key 'ingres' in identity 'db'; expected one of: name, labels, "
         "cidrs, cgroups, ingress, egress"},
        {"unknown mode in identity",
         head + "  - name: db\n    labels: {app: db}\n    ingress: enforced\n",
         "policy.yaml:5:14: unknown mode 'enforced' for 'ingress' in identity 'db'; expected one "
         "of: enforce, audit, allow"},
        {"relative cgroup", head + "  - name: db\n    labels: {app: db}\n    cgroups: [db.slice]\n",
         "policy.yaml:5:15: cgroup 'db.slice' in identity 'db' is not an absolute path; expected "
         "an absolute path such as /sys/fs/cgroup/db.slice"},
    };
}

std::vector<BadFile> uniqueness_cases()
{
    const std::string head = "apiVersion: bulkhead/v1\nidentities:\n";
    return {
        {"duplicate identity name",
         head + "  - name: db\n    labels: {app: db}\n  - name: db\n    labels: {app: web}\n",
         "policy.yaml:5:11: identity name 'db' is already used on line 3; expected a unique "
         "name"},
        {"duplicate label set",
         head + "  - name: a\n    labels: {app: db}\n  - name: b\n    labels: {app: db}\n",
         "policy.yaml:6:13: identity 'b' has the same labels as identity 'a' on line 3; expected "
         "a label set of its own: policy matches labels, not names"},
        {"one prefix in two identities, IPv4 and mapped",
         head + "  - name: a\n    labels: {app: a}\n    cidrs: [198.51.100.20/32]\n"
                "  - name: b\n    labels: {app: b}\n    cidrs: [\"::ffff:198.51.100.20/128\"]\n",
         "policy.yaml:8:13: CIDR '::ffff:198.51.100.20/128' in identity 'b' is already listed by "
         "identity 'a' on line 5; expected each prefix in one identity only"},
        {"one prefix twice in one identity",
         head + "  - name: a\n    labels: {app: a}\n"
                "    cidrs: [198.51.100.0/24, 198.51.100.0/24]\n",
         "policy.yaml:5:30: CIDR '198.51.100.0/24' in identity 'a' is already listed by identity "
         "'a' on line 5; expected each prefix in one identity only"},
        {"one cgroup in two identities",
         head + "  - name: a\n    labels: {app: a}\n    cgroups: [/sys/fs/cgroup/a.slice]\n"
                "  - name: b\n    labels: {app: b}\n    cgroups: [/sys/fs/cgroup/a.slice/]\n",
         "policy.yaml:8:15: cgroup '/sys/fs/cgroup/a.slice/' in identity 'b' is already listed by "
         "identity 'a' on line 5; expected each cgroup in one identity only"},
    };
}

std::vector<BadFile> rule_cases()
{
    const std::string rule = "  - name: web-to-db\n"  // 8
                             "    from: {app: web}\n"  // 9
                             "    to: {app: db}\n";    // 10
    return {
        {"unknown key in rule", rules_file(rule + "    portz: [tcp/5432]\n    action: allow\n"),
         "policy.yaml:11:5: unknown key 'portz' in rule 'web-to-db'; expected one of: name, "
         "from, to, ports, action"},
        {"rule not a mapping", rules_file("  - web-to-db\n"),
         "policy.yaml:8:5: rule #1 is the string 'web-to-db'; expected a mapping with name, "
         "from, to, ports and action"},
        {"rule without name", rules_file("  - from: any\n    to: any\n    action: allow\n"),
         "policy.yaml:8:5: rule #1 has no 'name'; expected a stable name such as web-to-db"},
        {"rule with a misspelt name", rules_file("  - nmae: r\n    from: any\n"),
         "policy.yaml:8:5: unknown key 'nmae' in rule #1; expected one of: name, from, to, "
         "ports, action"},
        {"rule with an empty name", rules_file("  - name: \"\"\n    from: any\n"),
         "policy.yaml:8:11: rule name '' is empty; expected a stable name such as web-to-db"},
        {"rule name with spaces", rules_file("  - name: web to db\n    from: any\n"),
         "policy.yaml:8:11: rule name 'web to db' has characters other than letters, digits, "
         "'.', '_' and '-'; expected a name such as web-to-db"},
        {"rule name too long", rules_file("  - name: " + std::string(129, 'r') + "\n"),
         "policy.yaml:8:11: rule name '" + std::string(129, 'r') +
             "' is 129 characters long; expected at most 128"},
        {"duplicate rule name",
         rules_file(rule + "    action: allow\n" + rule + "    action: deny\n"),
         "policy.yaml:12:11: rule name 'web-to-db' is already used on line 8; expected a unique "
         "name: counters and events report rules by name"},
        {"rule without action", rules_file(rule),
         "policy.yaml:8:5: rule 'web-to-db' has no 'action'; expected allow or deny"},
        {"unknown action", rules_file(rule + "    action: permit\n"),
         "policy.yaml:11:13: unknown action 'permit' in rule 'web-to-db'; expected allow or "
         "deny"},
        {"rule without from", rules_file("  - name: r\n    to: any\n    action: allow\n"),
         "policy.yaml:8:5: rule 'r' has no 'from'; " + selector_forms},
        {"port 0", rules_file(rule + "    ports: [tcp/0]\n    action: allow\n"),
         "policy.yaml:11:13: bad port 'tcp/0' in rule 'web-to-db': port 0 is out of range; "
         "expected 1-65535"},
        {"unknown protocol", rules_file(rule + "    ports: [tcp/80, tpc/443]\n"),
         "policy.yaml:11:21: bad port 'tpc/443' in rule 'web-to-db': unknown protocol 'tpc'; "
         "expected one of: tcp, udp, sctp, icmp, icmpv6, any"},
        {"ICMP type out of range", rules_file(rule + "    ports: [icmp/256]\n"),
         "policy.yaml:11:13: bad port 'icmp/256' in rule 'web-to-db': ICMP type 256 is out of "
         "range; expected 0-255"},
        {"reversed range", rules_file(rule + "    ports: [udp/5100-5000]\n"),
         "policy.yaml:11:13: bad port 'udp/5100-5000' in rule 'web-to-db': port range 5100-5000 "
         "is reversed; expected LOW-HIGH with LOW <= HIGH"},
        {"ports not a list", rules_file(rule + "    ports: tcp/443\n"),
         "policy.yaml:11:12: 'ports' in rule 'web-to-db' is the string 'tcp/443'; expected a "
         "list such as [tcp/443]"},
        {"empty ports", rules_file(rule + "    ports: []\n"),
         "policy.yaml:11:12: 'ports' in rule 'web-to-db' is empty; expected at least one port "
         "such as tcp/443"},
    };
}

std::vector<BadFile> selector_cases()
{
    auto rule = [](const std::string& from) {
        return rules_file("  - name: r\n    from: " + from + "\n    to: any\n    action: allow\n");
    };
    return {
        {"unknown keyword", rule("everything"),
         "policy.yaml:9:11: unknown selector 'everything' in rule 'r' (from); " + selector_forms},
        {"identity name as selector", rule("web"),
         "policy.yaml:9:11: unknown selector 'web' in rule 'r' (from); expected labels, such as "
         "{app: web} for identity 'web': selectors match labels, not names"},
        {"empty selector", rule(""),
         "policy.yaml:9:5: selector in rule 'r' (from) is empty; " + selector_forms},
        {"empty list", rule("[]"),
         "policy.yaml:9:11: selector in rule 'r' (from) is an empty list; " + selector_forms},
        {"empty mapping", rule("{}"),
         "policy.yaml:9:11: selector in rule 'r' (from) is an empty mapping; " + selector_forms},
        {"nested list", rule("[[any]]"),
         "policy.yaml:9:12: a selector in rule 'r' (from) is a list; expected any, world, host, "
         "a label mapping or {cidr: PREFIX}"},
        {"cidr next to labels", rule("{cidr: 198.51.100.0/24, app: web}"),
         "policy.yaml:9:35: key 'app' next to 'cidr' in rule 'r' (from); expected {cidr: PREFIX} "
         "alone; use a list of selectors for either one"},
        {"bad cidr", rule("{cidr: 198.51.100.0/33}"),
         "policy.yaml:9:18: bad CIDR '198.51.100.0/33' in rule 'r' (from): prefix length 33 is "
         "out of range; expected 0-32 for IPv4"},
        {"cidr list", rule("{cidr: [198.51.100.0/24]}"),
         "policy.yaml:9:18: a CIDR in rule 'r' (from) is a list; expected a prefix such as "
         "198.51.100.0/24"},
        {"empty label value list", rule("{app: []}"),
         "policy.yaml:9:17: label 'app' in rule 'r' (from) is an empty list; expected a value or "
         "a list of values such as [a, b]"},
        {"label value a mapping", rule("{app: {x: y}}"),
         "policy.yaml:9:17: label 'app' in rule 'r' (from) is a mapping; expected a value or a "
         "list of values such as [a, b]"},
        {"bad selector in the to side",
         rules_file("  - name: r\n    from: any\n    to: nobody\n    action: allow\n"),
         "policy.yaml:10:9: unknown selector 'nobody' in rule 'r' (to); " + selector_forms},
    };
}

std::vector<BadFile> failsafe_cases()
{
    const std::string head = "apiVersion: bulkhead/v1\n";
    return {
        {"unknown key in failsafe", head + "failsafe: {port: [tcp/22]}\n",
         "policy.yaml:2:12: unknown key 'port' in failsafe; expected one of: ports, from, "
         "enabled"},
        {"enabled not a boolean", head + "failsafe: {enabled: maybe}\n",
         "policy.yaml:2:21: 'enabled' in failsafe is 'maybe'; expected true or false"},
        {"bad management prefix", head + "failsafe: {from: [203.0.113.0/99]}\n",
         "policy.yaml:2:19: bad CIDR '203.0.113.0/99' in failsafe: prefix length 99 is out of "
         "range; expected 0-32 for IPv4"},
        {"bad failsafe port", head + "failsafe: {ports: [tcp/0]}\n",
         "policy.yaml:2:20: bad port 'tcp/0' in failsafe: port 0 is out of range; expected "
         "1-65535"},
        {"empty management prefixes", head + "failsafe: {from: []}\n",
         "policy.yaml:2:18: 'from' in failsafe is empty; expected at least one management "
         "prefix, or enabled: false"},
        {"failsafe too wide", head + "failsafe: {ports: [tcp/1-65535]}\n",
         "policy.yaml:2:11: failsafe opens 65535 ports to 2 prefixes, more than the 4096 "
         "entries it may use; expected a few management ports, such as [tcp/22]"},
        {"failsafe a list", head + "failsafe: [tcp/22]\n",
         "policy.yaml:2:11: 'failsafe' is a list; expected a mapping such as {ports: [tcp/22], "
         "from: [203.0.113.0/24]}"},
    };
}

void expect_errors(const std::vector<BadFile>& cases)
{
    for (const auto& c : cases) {
        SCOPED_TRACE(c.description);
        EXPECT_EQ(parse_error(c.text), c.message) << c.text;
    }
}

TEST(PolicyErrors, Document) { expect_errors(document_cases()); }
TEST(PolicyErrors, Identities) { expect_errors(identity_cases()); }
TEST(PolicyErrors, Uniqueness) { expect_errors(uniqueness_cases()); }
TEST(PolicyErrors, Rules) { expect_errors(rule_cases()); }
TEST(PolicyErrors, Selectors) { expect_errors(selector_cases()); }
TEST(PolicyErrors, Failsafe) { expect_errors(failsafe_cases()); }

// ---- warnings -------------------------------------------------------------

TEST(PolicyWarnings, LabelSelectorThatMatchesNoIdentity)
{
    Policy policy = Policy::parse(rules_file(R"(  - name: typo
    from: {app: wbe}
    to: [{app: db, env: prod}, {app: db}, any, world, host, {cidr: 192.0.2.0/24}]
    action: allow
  - name: block
    from:
      app: [web, db]
    to:
      - app: cache
    action: deny
)"),
                                  "policy.yaml");
    EXPECT_EQ(policy.warnings,
              (std::vector<std::string>{
                  "policy.yaml:9:11: warning: selector in rule 'typo' (from) matches no identity",
                  "policy.yaml:10:10: warning: selector in rule 'typo' (to) matches no identity",
                  "policy.yaml:16:9: warning: selector in rule 'block' (to) matches no identity",
              }));
}

// ---- helpers of the model ---------------------------------------------------

TEST(PolicyModel, Names)
{
    EXPECT_EQ(to_string(Mode::allow), "allow");
    EXPECT_EQ(to_string(Mode::audit), "audit");
    EXPECT_EQ(to_string(Mode::enforce), "enforce");
    EXPECT_EQ(to_string(Action::allow), "allow");
    EXPECT_EQ(to_string(Action::deny), "deny");
    EXPECT_EQ(format_labels({{"env", "prod"}, {"app", "web"}}), "app=web,env=prod");
    EXPECT_EQ(format_labels({}), "");
}

struct TermCase {
    std::string description;
    SelectorTerm term;
    Subject subject;
    bool matches;
};

TEST(PolicyModel, TermMatchesLabels)
{
    const Labels web_prod = {{"app", "web"}, {"env", "prod"}};
    const Subject web{256, &web_prod};
    const Subject world{2, nullptr};  // BH_ID_WORLD
    const Subject host{1, nullptr};   // BH_ID_HOST
    using K = SelectorTerm::Kind;
    const std::vector<TermCase> cases = {
        {"any matches a workload", keyword_term(K::any), web, true},
        {"any matches world", keyword_term(K::any), world, true},
        {"any matches host", keyword_term(K::any), host, true},
        {"world matches world", keyword_term(K::world), world, true},
        {"world is not a workload", keyword_term(K::world), web, false},
        {"world is not host", keyword_term(K::world), host, false},
        {"host matches host", keyword_term(K::host), host, true},
        {"host is not world", keyword_term(K::host), world, false},
        {"one label", labels_term({{"app", {"web"}}}), web, true},
        {"every label", labels_term({{"app", {"web"}}, {"env", {"prod"}}}), web, true},
        {"one label differs", labels_term({{"app", {"web"}}, {"env", {"dev"}}}), web, false},
        {"a missing key", labels_term({{"team", {"a"}}}), web, false},
        {"a value list", labels_term({{"env", {"dev", "prod"}}}), web, true},
        {"labels never match world", labels_term({{"app", {"web"}}}), world, false},
        {"a cidr is matched by address", cidr_term("0.0.0.0/0"), web, false},
    };
    for (const auto& c : cases)
        EXPECT_EQ(term_matches_labels(c.term, c.subject), c.matches) << c.description;
}

// ---- files ----------------------------------------------------------------

TEST(PolicyLoad, MissingFile)
{
    const std::string path = "/nonexistent/bulkhead/policy.yaml";
    try {
        Policy::load(path);
        FAIL() << "loading a missing file succeeded";
    } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()),
                  "cannot read policy file '/nonexistent/bulkhead/policy.yaml': No such file or "
                  "directory (errno 2); check the path");
        EXPECT_EQ(e.error_number(), ENOENT);
    }
}

TEST(PolicyLoad, Directory)
{
    const fs::path dir = fs::temp_directory_path();
    try {
        Policy::load(dir);
        FAIL() << "loading a directory succeeded";
    } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()),
                  "cannot read policy file '" + dir.string() +
                      "': Is a directory (errno 21); expected a file, not a directory");
        EXPECT_EQ(e.error_number(), EISDIR);
    }
}

TEST(PolicyLoad, ErrorsNameTheFile)
{
    TempFile file("bad.yaml", "apiVersion: bulkhead/v1\nrules:\n  - name: x\n    form: any\n");
    try {
        Policy::load(file.path());
        FAIL() << "an invalid file loaded";
    } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()),
                  file.path().string() +
                      ":4:5: unknown key 'form' in rule 'x'; expected one of: name, from, to, "
                      "ports, action");
        EXPECT_EQ(e.error_number(), 0);
    }
}

TEST(PolicyLoad, ReadsAFile)
{
    TempFile file("good.yaml", full_policy);
    Policy policy = Policy::load(file.path());
    EXPECT_EQ(policy.rules.size(), 3u);
    EXPECT_EQ(policy.identities.size(), 2u);
}

// The commented reference example must stay valid and use every construct.
TEST(PolicyLoad, ReferenceExample)
{
    Policy policy = Policy::load(fs::path(BULKHEAD_SOURCE_DIR) / "examples/policy-reference.yaml");
    EXPECT_EQ(policy.warnings, std::vector<std::string>{});

    std::set<SelectorTerm::Kind> kinds;
    std::set<PortSpec::Proto> protos;
    std::set<Action> actions;
    for (const Rule& rule : policy.rules) {
        for (const auto* selector : {&rule.from, &rule.to}) {
            for (const auto& term : selector->terms)
                kinds.insert(term.kind);
        }
        for (const auto& spec : rule.ports)
            protos.insert(spec.proto);
        actions.insert(rule.action);
    }
    EXPECT_EQ(kinds.size(), 5u) << "every selector kind";
    EXPECT_EQ(protos.size(), 6u) << "every protocol";
    EXPECT_EQ(actions.size(), 2u) << "both actions";
}

}  // namespace
}  // namespace bulkhead
