// The bulkhead CLI as a user runs it: the binary (BULKHEAD_CLI) started as a
// child process, its exit status, stdout and stderr checked. Commands that
// need BPF run on a pin directory of their own; commands that need an
// interface run inside a network namespace made for the test.
#include "support/bpf_env.hpp"

#include "netlab.hpp"

#include <bulkhead/dataplane.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

namespace bulkhead {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::StartsWith;

const std::string kDemoPolicy = std::string(BULKHEAD_SOURCE_DIR) + "/examples/demo-policy.yaml";

// Runs the CLI with `args`, inside `ns` when given.
netlab::CommandResult cli(std::vector<std::string> args, const netlab::NetNs* ns = nullptr) {
    args.insert(args.begin(), BULKHEAD_CLI);
    return netlab::run_command(args, ns);
}

// Parses stdout as exactly one JSON document; fails the test otherwise.
json parse_json(const netlab::CommandResult& r) {
    try {
        return json::parse(r.out);
    } catch (const json::exception& e) {
        ADD_FAILURE() << "stdout is not one JSON document (" << e.what() << "):\n" << r.out;
        return json();
    }
}

// A file under /tmp removed with the object.
class TempFile {
public:
    TempFile(const std::string& tag, const std::string& text)
        : path_(fmt::format("/tmp/bulkhead-cli-test-{}-{}.yaml", getpid(), tag)) {
        std::ofstream(path_) << text;
    }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;
    ~TempFile() { std::filesystem::remove(path_); }

    const std::string& path() const { return path_; }

private:
    std::string path_;
};

// ---------------------------------------------------------------------------
// No privileges needed
// ---------------------------------------------------------------------------

TEST(Cli, ValidateGoodFilePrintsCounts) {
    auto r = cli({"policy", "validate", kDemoPolicy});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, kDemoPolicy + ": valid (6 identities, 7 rules)\n");
}

TEST(Cli, ValidateBadFileNamesFileLineAndColumn) {
    TempFile bad("bad", "apiVersion: bulkhead/v1\n"
                        "identities:\n"
                        "  - name: web\n"
                        "    labels: {app: web}\n"
                        "    ingress: enforcing\n");
    auto r = cli({"policy", "validate", bad.path()});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_THAT(r.err, StartsWith("bulkhead: " + bad.path() + ":5:14: "));
    EXPECT_THAT(r.err, HasSubstr("enforce"));  // says what was expected
}

TEST(Cli, ValidateJsonOnBadFileIsOneDocument) {
    TempFile bad("badjson", "apiVersion: bulkhead/v2\n");
    auto r = cli({"policy", "validate", "--json", bad.path()});
    EXPECT_EQ(r.exit_code, 1);
    json doc = parse_json(r);
    EXPECT_EQ(doc.value("valid", true), false);
    EXPECT_THAT(doc.value("error", ""), StartsWith(bad.path() + ":1:"));
}

TEST(Cli, ValidateMissingFileIsAnError) {
    auto r = cli({"policy", "validate", "/nonexistent/policy.yaml"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_THAT(r.err, StartsWith("bulkhead: "));
    EXPECT_THAT(r.err, HasSubstr("/nonexistent/policy.yaml"));
}

TEST(Cli, BadUsageExitsTwo) {
    const std::vector<std::vector<std::string>> cases = {
        {},                                                   // no subcommand
        {"policy"},                                           // no policy subcommand
        {"policy", "validate"},                               // no FILE
        {"attach", "xdp", "veth0", "--mode", "turbo"},        // not a mode
        {"explain", "--from", "198.51.100.1"},                // --to, --proto missing
        {"explain", "--from", "198.51.100.1", "--to", "198.51.100.2", "--proto", "tcp",
         "--port", "70000"},                                  // port out of range
        {"status", "--no-such-option"},
    };
    for (const auto& args : cases) {
        auto r = cli(args);
        EXPECT_EQ(r.exit_code, 2) << fmt::format("bulkhead {}", fmt::join(args, " "));
        EXPECT_THAT(r.err, HasSubstr("--help"));
    }
}

TEST(Cli, HelpAndVersionExitZero) {
    auto help = cli({"--help"});
    EXPECT_EQ(help.exit_code, 0);
    EXPECT_THAT(help.out, HasSubstr("explain"));

    auto version = cli({"version"});
    EXPECT_EQ(version.exit_code, 0);
    EXPECT_THAT(version.out, StartsWith("bulkhead "));
}

// ---------------------------------------------------------------------------
// Root: BPF state, namespaces, the demo
// ---------------------------------------------------------------------------

class CliRoot : public ::testing::Test {
protected:
    void SetUp() override {
        if (auto why = test::bpf_skip_reason()) GTEST_SKIP() << *why;
    }

    std::vector<std::string> pinned(std::vector<std::string> args) const {
        args.insert(args.begin(), {"--pin-dir", pins_.path().string()});
        return args;
    }

    test::ScopedPinDir pins_;
};

TEST_F(CliRoot, UnknownInterfaceNamesItAndSaysWhatToDo) {
    netlab::NetNs ns("cli-noif");
    auto r = cli(pinned({"attach", "xdp", "nope0"}), &ns);
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "bulkhead: cannot attach XDP to 'nope0': no such interface in this network "
                     "namespace; check `ip link`\n");
}

TEST_F(CliRoot, NonRootGetsOneLineAndExitOne) {
    // A copy under /tmp, so that user nobody can execute it wherever the build is.
    std::filesystem::path copy = fmt::format("/tmp/bulkhead-cli-test-{}", getpid());
    std::filesystem::copy_file(BULKHEAD_CLI, copy,
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::permissions(copy, std::filesystem::perms(0755));

    // setpriv (util-linux) drops to nobody, which has no capabilities.
    auto r = netlab::run_command({"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                  copy.string(), "--pin-dir", pins_.path().string(), "status"});
    std::filesystem::remove(copy);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_EQ(r.err, "bulkhead: status needs root (CAP_BPF, CAP_NET_ADMIN); run it with sudo\n");
}

TEST_F(CliRoot, ReadingCommandsCreateNoStateWhereThereIsNone) {
    for (const char* command : {"status", "stats"}) {
        auto r = cli(pinned({command}));
        EXPECT_EQ(r.exit_code, 1) << command;
        EXPECT_THAT(r.err, HasSubstr("no bulkhead state under " + pins_.path().string()));
    }
    auto diff = cli(pinned({"policy", "diff", kDemoPolicy}));
    EXPECT_EQ(diff.exit_code, 0) << diff.err;
    EXPECT_THAT(diff.out, HasSubstr("identities: 6 added"));
    EXPECT_FALSE(std::filesystem::exists(pins_.path()));
}

TEST_F(CliRoot, ApplyStatusStatsExplainDiffAsJson) {
    auto apply = cli(pinned({"policy", "apply", "--json", kDemoPolicy}));
    ASSERT_EQ(apply.exit_code, 0) << apply.err;
    json applied = parse_json(apply);
    EXPECT_EQ(applied.value("generation", 0), 1);
    EXPECT_EQ(applied.value("unchanged", true), false);

    auto again = cli(pinned({"policy", "apply", "--json", kDemoPolicy}));
    ASSERT_EQ(again.exit_code, 0) << again.err;
    EXPECT_EQ(parse_json(again).value("unchanged", false), true);

    auto status = cli(pinned({"status", "--json"}));
    ASSERT_EQ(status.exit_code, 0) << status.err;
    json s = parse_json(status);
    EXPECT_EQ(s.value("pin_dir", ""), pins_.path().string());
    EXPECT_EQ(s.value("generation", 0), 1);
    EXPECT_EQ(s.value("identities", 0), 6);
    EXPECT_EQ(s.value("rules", 0), 7);
    EXPECT_EQ(s.value("policy_source", ""), kDemoPolicy);
    EXPECT_TRUE(s["attachments"].is_array());
    EXPECT_FALSE(s["maps"].empty());

    auto stats = cli(pinned({"stats", "--json"}));
    ASSERT_EQ(stats.exit_code, 0) << stats.err;
    json st = parse_json(stats);
    for (const char* reason : {"allow-rule", "deny-rule", "audit-default", "malformed", "tracked",
                               "failsafe", "ct-miss", "revoked"}) {
        EXPECT_TRUE(st["reasons"].contains(reason)) << reason;
    }
    ASSERT_EQ(st["rules"].size(), 7u);
    EXPECT_EQ(st["rules"][0].value("name", ""), "partner-no-db");
    EXPECT_EQ(st["rules"][0].value("action", ""), "deny");
    EXPECT_TRUE(st["rules"][0].contains("packets"));
    bool has_ct = std::any_of(st["maps"].begin(), st["maps"].end(),
                              [](const json& m) { return m.value("name", "") == "bh_ct"; });
    EXPECT_TRUE(has_ct) << st["maps"].dump();

    // An explicit deny rule decides.
    auto deny = cli(pinned({"explain", "--json", "--from", "203.0.113.30", "--to",
                            "198.51.100.11", "--proto", "tcp", "--port", "5432"}));
    ASSERT_EQ(deny.exit_code, 0) << deny.err;
    json d = parse_json(deny);
    EXPECT_EQ(d.value("verdict", ""), "deny");
    EXPECT_EQ(d.value("rule", ""), "partner-no-db");
    EXPECT_EQ(d.value("reason", ""), "rule");
    EXPECT_EQ(d["from_identity"], json({{"zone", "partner"}}));
    EXPECT_EQ(d["to_identity"], json({{"app", "db"}, {"env", "demo"}}));
    EXPECT_EQ(d.value("from_name", ""), "intruder");
    EXPECT_EQ(d.value("to_name", ""), "db");

    // An identity in audit mode: would deny, passes; no rule decided.
    auto audit = cli(pinned({"explain", "--json", "--from", "2001:db8:1::30", "--to",
                             "2001:db8::40", "--proto", "icmpv6"}));
    ASSERT_EQ(audit.exit_code, 0) << audit.err;
    json a = parse_json(audit);
    EXPECT_EQ(a.value("verdict", ""), "audit");
    EXPECT_TRUE(a["rule"].is_null());
    EXPECT_EQ(a.value("reason", ""), "default");

    // An address no identity covers is `world`.
    auto world = cli(pinned({"explain", "--json", "--from", "198.51.100.99", "--to",
                             "198.51.100.10", "--proto", "tcp", "--port", "80"}));
    ASSERT_EQ(world.exit_code, 0) << world.err;
    json w = parse_json(world);
    EXPECT_EQ(w.value("verdict", ""), "allow");
    EXPECT_EQ(w.value("rule", ""), "web-http");
    EXPECT_EQ(w.value("from_name", ""), "world");
    EXPECT_TRUE(w["from_identity"].is_object());

    auto diff = cli(pinned({"policy", "diff", "--json", kDemoPolicy}));
    ASSERT_EQ(diff.exit_code, 0) << diff.err;
    EXPECT_EQ(parse_json(diff).value("identical", false), true);
}

TEST_F(CliRoot, DiffNamesAddedRemovedAndChanged) {
    TempFile before("before", "apiVersion: bulkhead/v1\n"
                              "identities:\n"
                              "  - {name: web, labels: {app: web}, cidrs: [198.51.100.10/32]}\n"
                              "  - {name: old, labels: {app: old}, cidrs: [198.51.100.12/32]}\n"
                              "rules:\n"
                              "  - {name: http, from: any, to: {app: web}, ports: [tcp/80],"
                              " action: allow}\n"
                              "  - {name: gone, from: any, to: {app: old}, ports: [tcp/22],"
                              " action: allow}\n");
    TempFile after("after", "apiVersion: bulkhead/v1\n"
                            "identities:\n"
                            "  - {name: web, labels: {app: web}, cidrs: [198.51.100.10/32],"
                            " ingress: enforce}\n"
                            "  - {name: new, labels: {app: new}, cidrs: [198.51.100.13/32]}\n"
                            "rules:\n"
                            "  - {name: http, from: any, to: {app: web}, ports: [tcp/80, tcp/443],"
                            " action: allow}\n");
    ASSERT_EQ(cli(pinned({"policy", "apply", before.path()})).exit_code, 0);

    auto r = cli(pinned({"policy", "diff", "--json", after.path()}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    json d = parse_json(r);
    EXPECT_EQ(d["identities"]["added"], json({"new"}));
    EXPECT_EQ(d["identities"]["removed"], json({"old"}));
    ASSERT_EQ(d["identities"]["changed"].size(), 1u);
    EXPECT_EQ(d["identities"]["changed"][0].value("name", ""), "web");
    EXPECT_EQ(d["rules"]["removed"], json({"gone"}));
    ASSERT_EQ(d["rules"]["changed"].size(), 1u);
    EXPECT_EQ(d["rules"]["changed"][0].value("name", ""), "http");

    auto text = cli(pinned({"policy", "diff", after.path()}));
    EXPECT_THAT(text.out, HasSubstr("+ new"));
    EXPECT_THAT(text.out, HasSubstr("- gone"));
    EXPECT_THAT(text.out, HasSubstr("ingress: allow -> enforce"));
}

TEST_F(CliRoot, AttachStatusDetachInANamespace) {
    netlab::NetNs a("cli-a");
    netlab::NetNs b("cli-b");
    netlab::VethPair veth(a, "clia0", b, "clib0");

    auto attach = cli(pinned({"attach", "xdp", "clia0", "--json"}), &a);
    ASSERT_EQ(attach.exit_code, 0) << attach.err;
    json at = parse_json(attach);
    EXPECT_EQ(at.value("interface", ""), "clia0");
    EXPECT_THAT(at.value("mode", ""), ::testing::AnyOf("native", "generic"));

    auto status = cli(pinned({"status", "--json"}), &a);
    ASSERT_EQ(status.exit_code, 0) << status.err;
    json s = parse_json(status);
    ASSERT_EQ(s["attachments"].size(), 1u);
    EXPECT_EQ(s["attachments"][0].value("interface", ""), "clia0");

    auto detach = cli(pinned({"detach", "xdp", "clia0"}), &a);
    EXPECT_EQ(detach.exit_code, 0) << detach.err;
    auto after = parse_json(cli(pinned({"status", "--json"}), &a));
    EXPECT_TRUE(after["attachments"].empty());

    ASSERT_EQ(cli(pinned({"attach", "xdp", "clia0", "--mode", "generic"}), &a).exit_code, 0);
    auto all = cli(pinned({"detach", "all"}), &a);
    EXPECT_EQ(all.exit_code, 0) << all.err;
    EXPECT_EQ(all.out, "detached 1 link\n");
}

// The max_entries of one map as `status --json` reports it; 0 if absent.
std::uint64_t max_entries(const json& status, const std::string& map) {
    for (const auto& m : status["maps"]) {
        if (m.value("name", "") == map) return m.value("max_entries", std::uint64_t{0});
    }
    return 0;
}

TEST_F(CliRoot, TableSizesFromApplyAndAWarningWhenFixed) {
    auto first = cli(pinned({"policy", "apply", "--max-connections", "1024", "--max-cgroups",
                             "512", kDemoPolicy}));
    ASSERT_EQ(first.exit_code, 0) << first.err;
    EXPECT_THAT(first.err, ::testing::Not(HasSubstr("ignored")));
    json s = parse_json(cli(pinned({"status", "--json"})));
    EXPECT_EQ(max_entries(s, "bh_ct"), 1024u);
    EXPECT_EQ(max_entries(s, "bh_cgroups"), 512u);

    // The tracking table is sized once, with the state: say so, apply anyway.
    auto again = cli(pinned({"policy", "apply", "--max-connections", "2048", kDemoPolicy}));
    EXPECT_EQ(again.exit_code, 0) << again.err;
    EXPECT_THAT(again.err, HasSubstr("--max-connections 2048 ignored: bh_ct was created with "
                                     "1024 entries"));
}

TEST_F(CliRoot, AttachStatusDetachCgroup) {
    netlab::Cgroup cgroup("cli-cg");
    const std::string path = cgroup.path().string();
    const std::string relative =
        "/" + cgroup.path().lexically_relative(netlab::cgroup2_mount()).string();

    auto attach = cli(pinned({"attach", "cgroup", path, "--json"}));
    ASSERT_EQ(attach.exit_code, 0) << attach.err;
    json at = parse_json(attach);
    EXPECT_EQ(at.value("hook", ""), "cgroup");
    EXPECT_EQ(at.value("interface", ""), path);
    EXPECT_EQ(at.value("mode", ""), "ingress,egress,connect4,connect6,sendmsg4,sendmsg6");
    EXPECT_THAT(attach.err, HasSubstr("no identity of the policy in force lists " + path));

    // Again, by the path relative to the cgroup v2 mount: the same links,
    // one program per hook. With a policy that lists the cgroup, it says whose.
    TempFile listed("cg", fmt::format("apiVersion: bulkhead/v1\n"
                                      "identities:\n"
                                      "  - {{name: probe, labels: {{app: probe}},"
                                      " cgroups: [{}]}}\n",
                                      relative));
    ASSERT_EQ(cli(pinned({"policy", "apply", listed.path()})).exit_code, 0);
    auto again = cli(pinned({"attach", "cgroup", relative}));
    ASSERT_EQ(again.exit_code, 0) << again.err;
    EXPECT_EQ(again.out, fmt::format("attached to cgroup {} (ingress,egress,connect4,connect6,"
                                     "sendmsg4,sendmsg6; identity probe)\n", path));
    EXPECT_EQ(again.err, "");

    auto status = cli(pinned({"status", "--json"}));
    ASSERT_EQ(status.exit_code, 0) << status.err;
    json s = parse_json(status);
    ASSERT_EQ(s["attachments"].size(), 1u) << s["attachments"].dump();
    EXPECT_EQ(s["attachments"][0].value("hook", ""), "cgroup");
    EXPECT_EQ(s["attachments"][0].value("interface", ""), path);
    EXPECT_EQ(s["attachments"][0].value("defunct", true), false);
    EXPECT_THAT(cli(pinned({"status"})).out,
                HasSubstr(fmt::format("  cgroup {} (ingress,egress,connect4,connect6,sendmsg4,"
                                      "sendmsg6)\n", path)));

    auto detach = cli(pinned({"detach", "cgroup", relative}));
    EXPECT_EQ(detach.exit_code, 0) << detach.err;
    EXPECT_EQ(detach.out, "detached from cgroup " + path + "\n");
    EXPECT_TRUE(parse_json(cli(pinned({"status", "--json"})))["attachments"].empty());

    // Nothing attached there any more: an error that says so and where to look.
    auto none = cli(pinned({"detach", "cgroup", path}));
    EXPECT_EQ(none.exit_code, 1);
    EXPECT_EQ(none.out, "");
    EXPECT_EQ(none.err, fmt::format("bulkhead: cannot detach from cgroup '{}': bulkhead has no "
                                    "links there; see `bulkhead status`\n", path));
}

TEST_F(CliRoot, AttachCgroupThatDoesNotExistFails) {
    const std::string missing = (netlab::cgroup2_mount() / "bulkhead-netlab" /
                                 fmt::format("bh-{}-no-such-cgroup", getpid())).string();
    auto r = cli(pinned({"attach", "cgroup", missing}));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_THAT(r.err, StartsWith("bulkhead: cannot attach to cgroup '" + missing + "'"));
    EXPECT_THAT(r.err, HasSubstr("create the cgroup first"));

    auto usage = cli(pinned({"attach", "cgroup"}));
    EXPECT_EQ(usage.exit_code, 2);
}

TEST_F(CliRoot, DemoRunsCleanAndExitsZero) {
    auto r = cli({"demo"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_THAT(r.out, HasSubstr("all 24 flows behaved as the policy says"));
    // The process identified by its cgroup: EPERM at once; a request
    // answered, the answer passing its enforcing ingress as tracked.
    EXPECT_THAT(r.out, HasSubstr("agent -> metrics tcp/9100 IPv4    | EPERM"));
    EXPECT_THAT(r.out, HasSubstr("| answered, replies tracked                 | yes"));

    // It removed what it made: the namespaces and the pin directory it named.
    std::smatch m;
    std::string out = r.out;
    int namespaces = 0;
    for (std::regex netns(R"(netns (bh-\d+-[a-z-]+))"); std::regex_search(out, m, netns);
         out = m.suffix()) {
        EXPECT_FALSE(std::filesystem::exists("/run/netns/" + m[1].str())) << m[1];
        ++namespaces;
    }
    EXPECT_EQ(namespaces, 5);
    ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(pinned under (\S+))")));
    EXPECT_FALSE(std::filesystem::exists(m[1].str())) << m[1];
    ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(cgroup (/\S+/bh-\d+-agent))")));
    EXPECT_FALSE(std::filesystem::exists(m[1].str())) << m[1];
}

}  // namespace
}  // namespace bulkhead
