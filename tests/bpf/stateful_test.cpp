// Stateful verdicts under BPF_PROG_TEST_RUN: connection tracking, echo ids,
// related ICMP errors, fragments, revocation by a new generation, eviction
// from a small tracking table, failsafe ports and cgroup identities.
//
// Every case is a row: a description, the hook that sees the packet, a packet
// built by fields, whether it passes, the verdict reason counter that moves by
// exactly one (and by the frame's bytes), the rule counter that moves ("" for
// none) and the counter kept besides the verdict ("ct-miss", "revoked"; ""
// for none). Rows of one table run in order against one dataplane, so a row
// about a reply relies on the rows before it; each test applies its policy
// before its tables.
//
// How the kernel runs a cgroup_skb program under BPF_PROG_TEST_RUN (checked
// by CgroupSkbTestRunTakesAnEthernetFrame below): the input is an Ethernet
// frame, as for XDP. The kernel builds an skb from it and calls
// eth_type_trans(), which sets skb->protocol from the ethertype and pulls the
// 14-byte header, so the program sees data starting at the IP header and
// skb->protocol set, exactly as at a real cgroup hook. struct __sk_buff as
// ctx_in cannot set the protocol (the kernel refuses a non-zero protocol
// field). A bare IP packet is therefore misread: its first bytes become the
// MAC addresses and bytes 12-13 of the IP header the ethertype. The skb's
// socket is a dummy one allocated in the caller's cgroup, so a test run made
// from a process inside a cgroup sees that cgroup as the local end.
#include "support/bpf_env.hpp"
#include "support/packet.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include "netlab.hpp"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------
// Addresses and policies the tables share
// ---------------------------------------------------------------------------

// client is a subnet of workloads, web the protected server, router an
// address no identity covers (world), host this machine's own addresses
// (Options::host_addresses), local an address of a process on this machine
// that has no identity of its own.
constexpr const char* kClient4 = "203.0.113.9";
constexpr const char* kClientOther4 = "203.0.113.10";
constexpr const char* kClientOutsideMgmt4 = "203.0.113.99";
constexpr const char* kClient6 = "2001:db8:1::9";
constexpr const char* kClientOutsideMgmt6 = "2001:db8:1:1::9";
constexpr const char* kWeb4 = "198.51.100.2";
constexpr const char* kWeb6 = "2001:db8::2";
constexpr const char* kOther4 = "198.51.100.3";
constexpr const char* kRouter4 = "203.0.113.254";
constexpr const char* kRouter6 = "2001:db8:ffff::1";
constexpr const char* kHost4 = "198.51.100.250";
constexpr const char* kHost6 = "2001:db8::fe";
constexpr const char* kLocal4 = "198.51.100.7";
constexpr const char* kOpen4 = "198.51.100.8";
constexpr const char* kOutsider4 = "198.51.100.77";

// The reason counters that are verdicts: every packet moves exactly one.
const std::set<std::string> kVerdictReasons = {
    "allow-rule",  "deny-rule", "audit-rule", "allow-default", "deny-default", "audit-default",
    "not-ip",      "neighbour-discovery",     "malformed",     "no-policy",    "tracked",
    "failsafe",
};
// Counted besides a verdict.
const std::set<std::string> kSideReasons = {"ct-miss", "revoked"};

constexpr bool kPass = true;
constexpr bool kDrop = false;

// Everything enforces in both directions, world included: only what a rule
// allows passes, and traffic the other way passes only as tracked. `rules`
// are flow-style YAML mappings in file order.
std::string policy(const std::vector<std::string>& rules,
                   const std::string& failsafe = "{enabled: false}",
                   const std::string& more_identities = "")
{
    std::string text = fmt::format(R"(apiVersion: bulkhead/v1
defaults: {{ingress: enforce, egress: enforce}}
failsafe: {}
identities:
  - {{name: web, labels: {{app: web}}, ingress: enforce, egress: enforce,
     cidrs: [198.51.100.2/32, "2001:db8::2/128"]}}
  - {{name: client, labels: {{app: client}}, ingress: enforce, egress: enforce,
     cidrs: [203.0.113.0/25, "2001:db8:1::/48"]}}
  - {{name: open, labels: {{app: open}}, ingress: allow, egress: allow, cidrs: [198.51.100.8/32]}}
{})",
                                   failsafe, more_identities);
    if (rules.empty())
        return text;
    text += "rules:\n";
    for (const std::string& rule : rules)
        text += "  - " + rule + "\n";
    return text;
}

std::string allow(const std::string& name, const std::string& from, const std::string& to,
                  const std::string& ports)
{
    return fmt::format("{{name: {}, from: {{app: {}}}, to: {{app: {}}}, ports: [{}], "
                       "action: allow}}",
                       name, from, to, ports);
}

const std::string kDenyAll = "{name: deny-all, from: any, to: any, ports: [any], action: deny}";

// ---------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------

bool is_v6(const std::string& addr)
{
    return addr.find(':') != std::string::npos;
}

Packet ip(const std::string& src, const std::string& dst, std::uint16_t ip_id = 0x4242)
{
    Packet p;
    if (is_v6(src))
        return p.ipv6({.src = src, .dst = dst});
    return p.ipv4({.src = src, .dst = dst, .id = ip_id});
}

Packet tcp(const std::string& src, std::uint16_t sport, const std::string& dst,
           std::uint16_t dport, std::uint8_t flags)
{
    return ip(src, dst).tcp({.sport = sport, .dport = dport, .flags = flags});
}

Packet udp(const std::string& src, std::uint16_t sport, const std::string& dst,
           std::uint16_t dport)
{
    return ip(src, dst).udp({.sport = sport, .dport = dport}).payload(32, 0x55);
}

// An echo request (reply = false) or reply with `id`, ICMP or ICMPv6 by family.
Packet echo(const std::string& src, const std::string& dst, std::uint16_t id, bool reply,
            std::uint16_t seq = 1)
{
    if (is_v6(src)) {
        return ip(src, dst)
            .icmpv6({.type = static_cast<std::uint8_t>(reply ? 129 : 128), .id = id, .seq = seq})
            .payload(16, 0x61);
    }
    return ip(src, dst)
        .icmp({.type = static_cast<std::uint8_t>(reply ? 0 : 8), .id = id, .seq = seq})
        .payload(16, 0x61);
}

// The bytes an ICMP error quotes: the IP header of `quoted` and the first
// `transport_bytes` bytes after it (RFC 792 asks for 8).
Bytes quote(const Packet& quoted, std::size_t transport_bytes = 8)
{
    Bytes frame = quoted.bytes();
    Layout at = quoted.layout();
    std::size_t end = std::min(frame.size(), at.l4 + transport_bytes);
    return Bytes(frame.begin() + static_cast<std::ptrdiff_t>(at.l3),
                 frame.begin() + static_cast<std::ptrdiff_t>(end));
}

// An ICMP (type 3 code 4, fragmentation needed) or ICMPv6 (type 2, packet too
// big) error from `src` to `dst` about `quoted`, announcing `mtu`. Other
// types and codes by argument.
Packet too_big(const std::string& src, const std::string& dst, const Packet& quoted,
               std::uint16_t mtu = 1400, std::optional<std::uint8_t> type = std::nullopt,
               std::uint8_t code = 0, std::size_t transport_bytes = 8)
{
    // the MTU is the low 16 bits of the second word: "seq" in the builder
    if (is_v6(src)) {
        return ip(src, dst)
            .icmpv6({.type = type.value_or(2), .code = code, .id = 0, .seq = mtu})
            .payload(quote(quoted, transport_bytes));
    }
    return ip(src, dst)
        .icmp({.type = type.value_or(3), .code = type ? code : std::uint8_t{4}, .id = 0,
               .seq = mtu})
        .payload(quote(quoted, transport_bytes));
}

// ---------------------------------------------------------------------------
// Running programs
// ---------------------------------------------------------------------------

enum class Hook { xdp, cg_ingress, cg_egress };

const char* hook_name(Hook hook)
{
    switch (hook) {
    case Hook::xdp:
        return "bh_xdp";
    case Hook::cg_ingress:
        return "bh_cg_ingress";
    case Hook::cg_egress:
        return "bh_cg_egress";
    }
    return "?";
}

// Runs a program once on `frame` and returns its return value.
std::uint32_t test_run(int prog_fd, const Bytes& frame)
{
    Bytes out(frame.size() + 512);
    bpf_test_run_opts opts;
    std::memset(&opts, 0, sizeof(opts));  // libbpf checks that unknown tail bytes are zero
    opts.sz = sizeof(opts);
    opts.data_in = frame.data();
    opts.data_size_in = static_cast<std::uint32_t>(frame.size());
    opts.data_out = out.data();
    opts.data_size_out = static_cast<std::uint32_t>(out.size());
    opts.repeat = 1;
    if (bpf_prog_test_run_opts(prog_fd, &opts) != 0)
        throw_errno(fmt::format("BPF_PROG_TEST_RUN of program fd {} on a {}-byte frame", prog_fd,
                                frame.size()));
    return opts.retval;
}

// Runs `frame` through `prog_fd` from a child process placed in the cgroup
// directory `cgroup`: the test run's socket is allocated in the caller's
// cgroup, so the program sees that cgroup as the local end. The child only
// makes system calls (it is a fork of a process with threads).
std::uint32_t test_run_in_cgroup(const fs::path& cgroup, int prog_fd, const Bytes& frame)
{
    const std::string procs = (cgroup / "cgroup.procs").string();
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
        throw_errno("create a pipe");
    netlab::Fd read_end(fds[0]);
    netlab::Fd write_end(fds[1]);

    pid_t pid = ::fork();
    if (pid < 0)
        throw_errno("fork a child for a test run in a cgroup");
    if (pid == 0) {
        std::uint32_t result = 0xffffffffu;  // "could not run"
        int procs_fd = ::open(procs.c_str(), O_WRONLY | O_CLOEXEC);
        const char* pid_text = nullptr;
        char buf[16];
        if (procs_fd >= 0) {
            int n = std::snprintf(buf, sizeof buf, "%d", static_cast<int>(::getpid()));
            pid_text = buf;
            if (::write(procs_fd, pid_text, static_cast<std::size_t>(n)) == n) {
                bpf_test_run_opts opts;
                std::memset(&opts, 0, sizeof(opts));
                opts.sz = sizeof(opts);
                opts.data_in = frame.data();
                opts.data_size_in = static_cast<std::uint32_t>(frame.size());
                opts.repeat = 1;
                if (bpf_prog_test_run_opts(prog_fd, &opts) == 0)
                    result = opts.retval;
            }
        }
        ssize_t written = ::write(write_end.get(), &result, sizeof result);
        ::_exit(written == sizeof result ? 0 : 1);
    }
    write_end.reset();

    std::uint32_t result = 0xffffffffu;
    ssize_t got = ::read(read_end.get(), &result, sizeof result);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (got != sizeof result || result == 0xffffffffu)
        throw std::runtime_error(fmt::format("test run of program fd {} in cgroup {} failed",
                                             prog_fd, cgroup.string()));
    return result;
}

// A cgroup directory inside another (netlab's Cgroup), removed on destruction:
// for nested cgroups that inherit their parent's identity.
class NestedCgroup {
public:
    explicit NestedCgroup(fs::path path) : path_(std::move(path))
    {
        if (::mkdir(path_.c_str(), 0755) != 0)
            throw_errno(fmt::format("create cgroup {}", path_.string()));
    }
    NestedCgroup(const NestedCgroup&) = delete;
    NestedCgroup& operator=(const NestedCgroup&) = delete;
    ~NestedCgroup()
    {
        // a child that was just reaped can keep it busy for a moment
        for (int i = 0; i < 300; i++) {
            if (::rmdir(path_.c_str()) == 0 || errno == ENOENT)
                return;
            if (errno != EBUSY)
                break;
            ::usleep(10000);
        }
        std::fprintf(stderr, "cannot remove cgroup %s: %s\n", path_.c_str(), std::strerror(errno));
    }

    const fs::path& path() const noexcept { return path_; }

private:
    fs::path path_;
};

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

struct Step {
    std::string description;
    Hook hook = Hook::xdp;
    Packet packet;
    bool pass = false;
    std::string reason{};  // the verdict reason counter that moves by one
    std::string rule{};    // the rule counter that moves by one, "" for none
    std::string side{};    // "ct-miss" or "revoked" moving by one, "" for neither
    // the test run is made from a process in this cgroup directory
    std::optional<fs::path> cgroup{};
};

struct Outcome {
    bool pass = false;
    std::string reason;  // see moved_one()
    std::string rule;
    std::string side;
};

class StatefulTest : public DataplaneTest {
protected:
    void SetUp() override
    {
        DataplaneTest::SetUp();
        if (IsSkipped())
            return;
        options_.host_addresses = std::vector<Prefix>{*Prefix::parse(std::string(kHost4) + "/32"),
                                                      *Prefix::parse(std::string(kHost6) + "/128")};
    }

    ApplyResult apply(const std::string& yaml)
    {
        return dp().apply(Policy::parse(yaml, "<test>"), "<test>");
    }

    std::uint32_t run(Hook hook, const Bytes& frame, const std::optional<fs::path>& cgroup)
    {
        int fd = dp().program_fd(hook_name(hook));
        return cgroup ? test_run_in_cgroup(*cgroup, fd, frame) : test_run(fd, frame);
    }

    Outcome send(const Step& step)
    {
        Bytes frame = step.packet.bytes();
        Stats before = dp().stats();
        std::uint32_t retval = run(step.hook, frame, step.cgroup);
        Stats after = dp().stats();
        CounterDelta delta = counter_delta(before, after);

        std::map<std::string, Counter> verdicts;
        std::map<std::string, Counter> sides;
        for (const auto& [name, counter] : delta.reasons) {
            if (kSideReasons.count(name) != 0)
                sides.emplace(name, counter);
            else
                verdicts.emplace(name, counter);
        }
        // XDP counts the frame; a cgroup hook sees the skb from its network
        // header on, so it counts the IP packet
        std::size_t bytes = step.hook == Hook::xdp ? frame.size() : frame.size() - 14;
        if (verdicts.size() == 1) {
            EXPECT_EQ(verdicts.begin()->second.bytes, bytes) << "reason bytes";
        }
        bool pass = step.hook == Hook::xdp ? retval == kXdpPass : retval == 1;
        return Outcome{pass, moved_one(verdicts, 1), moved_one(delta.rules, 1),
                       moved_one(sides, 1)};
    }

    void expect(const Step& step)
    {
        SCOPED_TRACE(fmt::format("case '{}' at {}: {}", step.description, hook_name(step.hook),
                                 step.packet.describe()));
        Outcome out = send(step);
        EXPECT_EQ(std::string(out.pass ? "pass" : "drop"), std::string(step.pass ? "pass" : "drop"));
        EXPECT_EQ(out.reason, step.reason);
        EXPECT_EQ(out.rule, step.rule);
        EXPECT_EQ(out.side, step.side);
    }

    void expect_all(const std::vector<Step>& steps)
    {
        for (const Step& step : steps)
            expect(step);
    }

};

// Field cases of /work/shared/cases/field-cases.md, with the same fixture.
class StatefulFieldCase : public StatefulTest {};

constexpr Hook kXdp = Hook::xdp;
constexpr Hook kCgIn = Hook::cg_ingress;
constexpr Hook kCgOut = Hook::cg_egress;

constexpr std::uint8_t kSynAck = kTcpSyn | kTcpAck;
constexpr std::uint8_t kFinAck = kTcpFin | kTcpAck;

// ---------------------------------------------------------------------------
// How the kernel test-runs cgroup_skb programs
// ---------------------------------------------------------------------------

TEST_F(StatefulTest, CgroupSkbTestRunTakesAnEthernetFrame)
{
    apply(policy({allow("https", "client", "web", "tcp/443")}));
    const Packet syn = tcp(kClient4, 41000, kWeb4, 443, kTcpSyn);
    const Bytes frame = syn.bytes();
    const Bytes bare_ip(frame.begin() + 14, frame.end());

    // an Ethernet frame: classified like at XDP
    Stats before = dp().stats();
    EXPECT_EQ(run(kCgOut, frame, std::nullopt), 1u);
    EXPECT_EQ(moved_one(counter_delta(before, dp().stats()).reasons, 1), "allow-rule");

    // a bare IP packet: its bytes 12-13 become the ethertype, so it is not IP
    before = dp().stats();
    EXPECT_EQ(run(kCgOut, bare_ip, std::nullopt), 1u);
    EXPECT_EQ(moved_one(counter_delta(before, dp().stats()).reasons, 1), "not-ip");

    // struct __sk_buff cannot carry the protocol: the kernel refuses it
    __sk_buff ctx{};
    ctx.protocol = htons(0x0800);
    bpf_test_run_opts opts;
    std::memset(&opts, 0, sizeof(opts));
    opts.sz = sizeof(opts);
    opts.data_in = bare_ip.data();
    opts.data_size_in = static_cast<std::uint32_t>(bare_ip.size());
    opts.ctx_in = &ctx;
    opts.ctx_size_in = sizeof(ctx);
    EXPECT_NE(bpf_prog_test_run_opts(dp().program_fd("bh_cg_egress"), &opts), 0);
    EXPECT_EQ(errno, EINVAL);
}

// ---------------------------------------------------------------------------
// Connection tracking
// ---------------------------------------------------------------------------

TEST_F(StatefulTest, TrackedRepliesPassWithoutARuleForTheReverseDirection)
{
    apply(policy({allow("https", "client", "web", "tcp/443"),
                  allow("dns", "client", "web", "udp/53")}));
    expect_all({
        // description, hook, packet, pass, reason, rule, side counter
        {"IPv4 SYN client -> web:443", kXdp, tcp(kClient4, 41000, kWeb4, 443, kTcpSyn), kPass,
         "allow-rule", "https"},
        {"its SYN-ACK web:443 -> client: no rule, tracked", kXdp,
         tcp(kWeb4, 443, kClient4, 41000, kSynAck), kPass, "tracked", "https"},
        {"the client's ACK: tracked", kXdp, tcp(kClient4, 41000, kWeb4, 443, kTcpAck), kPass,
         "tracked", "https"},
        {"data from web: tracked", kXdp,
         tcp(kWeb4, 443, kClient4, 41000, kTcpAck).payload(100, 0x42), kPass, "tracked", "https"},
        {"a reply to another client port: no entry, a tracking miss", kXdp,
         tcp(kWeb4, 443, kClient4, 41001, kTcpAck), kDrop, "deny-default", "", "ct-miss"},
        {"a reply from another address of web's port", kXdp,
         tcp(kOther4, 443, kClient4, 41000, kTcpAck), kDrop, "deny-default", "", "ct-miss"},
        {"a new connection web -> client: no rule", kXdp, tcp(kWeb4, 41000, kClient4, 443, kTcpSyn),
         kDrop, "deny-default"},

        {"IPv6 SYN client -> web:443", kXdp, tcp(kClient6, 41000, kWeb6, 443, kTcpSyn), kPass,
         "allow-rule", "https"},
        {"its SYN-ACK: tracked", kXdp, tcp(kWeb6, 443, kClient6, 41000, kSynAck), kPass,
         "tracked", "https"},
        {"an IPv6 reply to another port: a tracking miss", kXdp,
         tcp(kWeb6, 443, kClient6, 41002, kTcpAck), kDrop, "deny-default", "", "ct-miss"},

        {"UDP client -> web:53", kXdp, udp(kClient4, 42000, kWeb4, 53), kPass, "allow-rule",
         "dns"},
        {"its reply: tracked", kXdp, udp(kWeb4, 53, kClient4, 42000), kPass, "tracked", "dns"},
        {"a UDP reply nobody asked for: denied, no TCP miss counted", kXdp,
         udp(kWeb4, 53, kClient4, 42001), kDrop, "deny-default"},
        {"IPv6 UDP client -> web:53", kXdp, udp(kClient6, 42000, kWeb6, 53), kPass,
         "allow-rule", "dns"},
        {"its reply: tracked", kXdp, udp(kWeb6, 53, kClient6, 42000), kPass, "tracked", "dns"},
    });
}

// Only a SYN without ACK opens a connection: every other TCP packet that
// finds no entry is mid-flow, and a SYN-ACK is a reply by definition.
TEST_F(StatefulTest, ASynAckWithoutItsSynIsATrackingMiss)
{
    apply(policy({allow("https", "client", "web", "tcp/443")}));
    expect_all({
        {"SYN-ACK web:443 -> client, no SYN seen", kXdp,
         tcp(kWeb4, 443, kClient4, 41500, kSynAck), kDrop, "deny-default", "", "ct-miss"},
        {"the same at cgroup ingress", kCgIn, tcp(kWeb4, 443, kClient4, 41501, kSynAck), kDrop,
         "deny-default", "", "ct-miss"},
        {"IPv6", kXdp, tcp(kWeb6, 443, kClient6, 41502, kSynAck), kDrop, "deny-default", "",
         "ct-miss"},
        {"a SYN is no miss", kXdp, tcp(kWeb4, 41503, kClient4, 443, kTcpSyn), kDrop,
         "deny-default"},
    });
}

// cgroup_skb: egress judges the local source, ingress the local destination;
// the reply of a flow opened at egress passes ingress as tracked.
TEST_F(StatefulTest, RepliesOfFlowsOpenedAtCgroupEgressPassCgroupIngress)
{
    apply(policy({allow("https", "client", "web", "tcp/443")}));
    expect_all({
        {"egress SYN client -> web:443", kCgOut, tcp(kClient4, 43000, kWeb4, 443, kTcpSyn),
         kPass, "allow-rule", "https"},
        {"egress SYN client -> web:80: client's egress enforces", kCgOut,
         tcp(kClient4, 43001, kWeb4, 80, kTcpSyn), kDrop, "deny-default"},
        {"ingress SYN-ACK web:443 -> client: tracked", kCgIn,
         tcp(kWeb4, 443, kClient4, 43000, kSynAck), kPass, "tracked", "https"},
        {"ingress reply of the refused flow: a miss", kCgIn,
         tcp(kWeb4, 80, kClient4, 43001, kTcpAck), kDrop, "deny-default", "", "ct-miss"},
        {"egress ACK: tracked", kCgOut, tcp(kClient4, 43000, kWeb4, 443, kTcpAck), kPass,
         "tracked", "https"},
        {"the same reply at XDP: the table is shared", kXdp,
         tcp(kWeb4, 443, kClient4, 43000, kTcpAck), kPass, "tracked", "https"},
        {"IPv6 egress SYN", kCgOut, tcp(kClient6, 43000, kWeb6, 443, kTcpSyn), kPass,
         "allow-rule", "https"},
        {"IPv6 ingress SYN-ACK: tracked", kCgIn, tcp(kWeb6, 443, kClient6, 43000, kSynAck),
         kPass, "tracked", "https"},
    });
}

// Tracking lets replies back; it must not let a flow past an enforcement
// point whose own policy refuses it. `open` may send anything (egress allow),
// web accepts only what a rule allows (ingress enforce): a SYN that open's
// egress let out is still judged by web's ingress when it arrives there.
TEST_F(StatefulTest, AFlowAllowedAtOnePointIsStillJudgedAtTheDestinationsIngress)
{
    apply(policy({}));
    expect_all({
        {"egress SYN open -> web:8443: open's egress allows", kCgOut,
         tcp(kOpen4, 44000, kWeb4, 8443, kTcpSyn), kPass, "allow-default"},
        {"the same SYN at web's XDP: web's ingress enforces", kXdp,
         tcp(kOpen4, 44000, kWeb4, 8443, kTcpSyn), kDrop, "deny-default"},
        {"the same SYN at web's cgroup ingress", kCgIn, tcp(kOpen4, 44000, kWeb4, 8443, kTcpSyn),
         kDrop, "deny-default"},
        {"UDP: egress open -> web:9000 allowed", kCgOut, udp(kOpen4, 44001, kWeb4, 9000), kPass,
         "allow-default"},
        {"UDP: at web's XDP", kXdp, udp(kOpen4, 44001, kWeb4, 9000), kDrop, "deny-default"},
    });
}

// I2: ICMP is tracked on the echo id; type and code are for policy only.
TEST_F(StatefulFieldCase, EchoRepliesMatchEchoRequestsById)
{
    apply(policy({allow("ping", "client", "web", "icmp/8, icmpv6/128")}));
    expect_all({
        {"echo request client -> web, id 0x1234", kXdp, echo(kClient4, kWeb4, 0x1234, false),
         kPass, "allow-rule", "ping"},
        {"echo reply web -> client, id 0x1234: tracked", kXdp,
         echo(kWeb4, kClient4, 0x1234, true), kPass, "tracked", "ping"},
        {"the next reply, seq 2: tracked", kXdp, echo(kWeb4, kClient4, 0x1234, true, 2), kPass,
         "tracked", "ping"},
        {"echo reply, id 0x4321: no request", kXdp, echo(kWeb4, kClient4, 0x4321, true), kDrop,
         "deny-default"},
        {"echo reply id 0x1234 from another address", kXdp,
         echo(kOther4, kClient4, 0x1234, true), kDrop, "deny-default"},
        {"echo reply id 0x1234 to another client", kXdp,
         echo(kWeb4, kClientOther4, 0x1234, true), kDrop, "deny-default"},
        {"a request web -> client: no rule", kXdp, echo(kWeb4, kClient4, 0x5555, false), kDrop,
         "deny-default"},
        {"an unanswered reply does not open a flow: its request back is denied", kXdp,
         echo(kClient4, kWeb4, 0x4321, true), kDrop, "deny-default"},

        {"ICMPv6 echo request, id 0x1234", kXdp, echo(kClient6, kWeb6, 0x1234, false), kPass,
         "allow-rule", "ping"},
        {"ICMPv6 echo reply, id 0x1234: tracked", kXdp, echo(kWeb6, kClient6, 0x1234, true),
         kPass, "tracked", "ping"},
        {"ICMPv6 echo reply, id 0x4321", kXdp, echo(kWeb6, kClient6, 0x4321, true), kDrop,
         "deny-default"},
    });
}

// I1: ICMP errors that quote a tracked flow pass; quoting an unknown flow,
// they meet policy (and the router's address has no rule).
TEST_F(StatefulFieldCase, ErrorsAboutAnAllowedFlowAreRelated)
{
    apply(policy({allow("http", "client", "web", "tcp/80"),
                  allow("dns", "client", "web", "udp/53"),
                  allow("ping", "client", "web", "icmp/8, icmpv6/128")}));
    const Packet to_web = tcp(kClient4, 45000, kWeb4, 80, kTcpAck);
    const Packet from_web = tcp(kWeb4, 80, kClient4, 45000, kTcpAck);
    const Packet unknown = tcp(kWeb4, 80, kClient4, 45999, kTcpAck);
    const Packet to_web6 = tcp(kClient6, 45000, kWeb6, 80, kTcpAck);
    const Packet from_web6 = tcp(kWeb6, 80, kClient6, 45000, kTcpAck);
    const Packet unknown6 = tcp(kWeb6, 80, kClient6, 45999, kTcpAck);
    const std::optional<std::uint8_t> unreachable = 3;
    const std::optional<std::uint8_t> time_exceeded = 11;

    expect_all({
        {"SYN client -> web:80", kXdp, tcp(kClient4, 45000, kWeb4, 80, kTcpSyn), kPass,
         "allow-rule", "http"},
        {"SYN-ACK: tracked", kXdp, tcp(kWeb4, 80, kClient4, 45000, kSynAck), kPass, "tracked", "http"},
        {"frag-needed (3/4, MTU 1400) router -> web quoting web's reply", kXdp,
         too_big(kRouter4, kWeb4, from_web), kPass, "tracked"},
        {"frag-needed router -> client quoting the client's packet", kXdp,
         too_big(kRouter4, kClient4, to_web), kPass, "tracked"},
        {"frag-needed quoting an unknown flow", kXdp, too_big(kRouter4, kWeb4, unknown), kDrop,
         "deny-default"},
        {"frag-needed quoting a flow to web:22", kXdp,
         too_big(kRouter4, kWeb4, tcp(kWeb4, 22, kClient4, 45000, kTcpAck)), kDrop,
         "deny-default"},
        {"time exceeded quoting the tracked flow", kXdp,
         too_big(kRouter4, kClient4, to_web, 0, time_exceeded, 0), kPass, "tracked"},
        {"a quote cut after 4 transport bytes still names the ports", kXdp,
         too_big(kRouter4, kWeb4, from_web, 1400, std::nullopt, 0, 4), kPass, "tracked"},
        {"a quote cut inside the ports is not related", kXdp,
         too_big(kRouter4, kWeb4, from_web, 1400, std::nullopt, 0, 2), kDrop, "deny-default"},

        {"UDP client -> web:53", kXdp, udp(kClient4, 45001, kWeb4, 53), kPass, "allow-rule",
         "dns"},
        {"port unreachable (3/3) web -> client quoting it", kXdp,
         too_big(kWeb4, kClient4, udp(kClient4, 45001, kWeb4, 53), 0, unreachable, 3), kPass,
         "tracked"},
        {"port unreachable quoting an unknown UDP flow", kXdp,
         too_big(kWeb4, kClient4, udp(kClient4, 45002, kWeb4, 53), 0, unreachable, 3), kDrop,
         "deny-default"},

        {"echo request client -> web, id 0x77", kXdp, echo(kClient4, kWeb4, 0x77, false), kPass,
         "allow-rule", "ping"},
        {"time exceeded quoting the echo request", kXdp,
         too_big(kRouter4, kClient4, echo(kClient4, kWeb4, 0x77, false), 0, time_exceeded, 0),
         kPass, "tracked"},
        {"time exceeded quoting an echo request of another id", kXdp,
         too_big(kRouter4, kClient4, echo(kClient4, kWeb4, 0x78, false), 0, time_exceeded, 0),
         kDrop, "deny-default"},

        {"IPv6 SYN client -> web:80", kXdp, tcp(kClient6, 45000, kWeb6, 80, kTcpSyn), kPass,
         "allow-rule", "http"},
        {"packet too big (ICMPv6 2, MTU 1280) router -> web quoting web's reply", kXdp,
         too_big(kRouter6, kWeb6, from_web6, 1280), kPass, "tracked"},
        {"packet too big router -> client quoting the client's packet", kXdp,
         too_big(kRouter6, kClient6, to_web6, 1280), kPass, "tracked"},
        {"packet too big quoting an unknown flow", kXdp, too_big(kRouter6, kWeb6, unknown6, 1280),
         kDrop, "deny-default"},
    });
}

// ---------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------

// A later IPv4 fragment (no transport header) of `id`, at `offset` (8-byte
// units), carrying `payload`.
Packet later4(const std::string& src, const std::string& dst, std::uint16_t id,
              std::uint8_t proto, Bytes payload, std::uint16_t offset = 185, bool more = false)
{
    return Packet()
        .ipv4({.src = src, .dst = dst, .frag_offset = offset, .more_fragments = more, .id = id})
        .raw_l4(proto)
        .payload(std::move(payload));
}

// A first IPv4 TCP fragment (offset 0, MF) of `id` to `dport`. A SYN, so
// that no tracking miss is counted besides its verdict.
Packet first4(const std::string& src, const std::string& dst, std::uint16_t id,
              std::uint16_t dport)
{
    return Packet()
        .ipv4({.src = src, .dst = dst, .more_fragments = true, .id = id})
        .tcp({.sport = static_cast<std::uint16_t>(id), .dport = dport, .flags = kTcpSyn})
        .payload(1460, 0x01);  // 20 + 1460 = 1480 = 185 * 8
}

// Payloads a parser that reads ports from a later fragment would misread.
const std::vector<std::pair<std::string, Bytes>> kPayloads = {
    {"01 BB 01 BB (443, 443)", {0x01, 0xbb, 0x01, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02}},
    {"00 16 00 16 (22, 22)", {0x00, 0x16, 0x00, 0x16, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02}},
    {"one byte", {0x01}},
    {"40 bytes of ff", Bytes(40, 0xff)},
};

// F1: a non-first fragment has no ports; tracked by (src, dst, proto, id).
TEST_F(StatefulFieldCase, NonFirstFragmentPayloadIsNotPorts)
{
    apply(policy({allow("https", "client", "web", "tcp/443")}));
    expect_all({
        {"first fragment to 443, id 0x7001", kXdp, first4(kClient4, kWeb4, 0x7001, 443), kPass,
         "allow-rule", "https"},
        {"first fragment to 22, id 0x7002", kXdp, first4(kClient4, kWeb4, 0x7002, 22), kDrop,
         "deny-default"},
    });
    // the verdict never depends on the payload bytes
    for (const auto& [what, bytes] : kPayloads) {
        SCOPED_TRACE("payload " + what);
        expect_all({
            {"a later fragment of the allowed first: tracked", kXdp,
             later4(kClient4, kWeb4, 0x7001, kProtoTcp, bytes), kPass, "tracked"},
            {"a middle fragment (MF set) of it: tracked", kXdp,
             later4(kClient4, kWeb4, 0x7001, kProtoTcp, bytes, 90, true), kPass, "tracked"},
            {"a later fragment of the denied first: port-less verdict", kXdp,
             later4(kClient4, kWeb4, 0x7002, kProtoTcp, bytes), kDrop, "deny-default"},
            {"a later fragment of no first fragment", kXdp,
             later4(kClient4, kWeb4, 0x7003, kProtoTcp, bytes), kDrop, "deny-default"},
            {"the allowed id from another source", kXdp,
             later4(kClientOther4, kWeb4, 0x7001, kProtoTcp, bytes), kDrop, "deny-default"},
            {"the allowed id to another destination", kXdp,
             later4(kClient4, kOther4, 0x7001, kProtoTcp, bytes), kDrop, "deny-default"},
            {"the allowed id with another protocol (UDP)", kXdp,
             later4(kClient4, kWeb4, 0x7001, kProtoUdp, bytes), kDrop, "deny-default"},
        });
    }

    // only a rule for every port of the protocol passes a fragment on its own
    apply(policy({allow("all-tcp", "client", "web", "tcp")}));
    for (const auto& [what, bytes] : kPayloads) {
        SCOPED_TRACE("payload " + what);
        expect_all({
            {"no first fragment, every TCP port allowed", kXdp,
             later4(kClient4, kWeb4, 0x7004, kProtoTcp, bytes), kPass, "allow-rule", "all-tcp"},
            {"no first fragment, UDP", kXdp, later4(kClient4, kWeb4, 0x7004, kProtoUdp, bytes),
             kDrop, "deny-default"},
        });
    }
}

// F2: the trailing fragment of a 1501-byte echo request is one byte.
TEST_F(StatefulFieldCase, TrailingIcmpFragmentShorterThanIcmpHeader)
{
    auto first = [](std::uint16_t id) {
        return Packet()
            .ipv4({.src = kClient4, .dst = kWeb4, .more_fragments = true, .id = id})
            .icmp({.type = 8, .id = 0x99})
            .payload(1472, 0xab);  // 8 + 1472 = 1480 = 185 * 8
    };
    // the one byte is 0x08, an echo request's type, for a parser that reads it
    auto trailing = [](std::uint16_t id) { return later4(kClient4, kWeb4, id, kProtoIcmp, {0x08}); };

    apply(policy({allow("echo", "client", "web", "icmp/8")}));
    expect_all({
        {"first fragment of the echo request", kXdp, first(0x7101), kPass, "allow-rule", "echo"},
        {"its trailing 1-byte fragment: tracked", kXdp, trailing(0x7101), kPass, "tracked"},
        {"a trailing fragment of no first fragment: port-less, echo only", kXdp,
         trailing(0x7102), kDrop, "deny-default"},
        {"the echo reply, unfragmented: tracked by its id", kXdp,
         echo(kWeb4, kClient4, 0x99, true), kPass, "tracked", "echo"},
    });
    apply(policy({allow("all-icmp", "client", "web", "icmp")}));
    expect_all({
        {"every ICMP type allowed: a lone trailing fragment passes", kXdp, trailing(0x7103),
         kPass, "allow-rule", "all-icmp"},
    });
}

// F3: IPv6 fragments behind a fragment header; atomic fragments are whole.
TEST_F(StatefulFieldCase, Ipv6FragmentHeader)
{
    auto first = [](std::uint32_t id) {
        return Packet()
            .ipv6({.src = kClient6, .dst = kWeb6})
            .ext(Ipv6Ext::fragment(0, true, id))
            .icmpv6({.type = 128, .id = static_cast<std::uint16_t>(id)})  // a new echo flow
            .payload(1224, 0xab);  // 8 + 1224 = 1232 = 154 * 8
    };
    auto second = [](std::uint32_t id, std::uint8_t proto = kProtoIcmpv6) {
        return Packet()
            .ipv6({.src = kClient6, .dst = kWeb6})
            .ext(Ipv6Ext::fragment(154, false, id))
            .raw_l4(proto)
            .payload(16, 0x80);  // starts like an echo request
    };
    auto atomic = [](std::uint32_t id) {
        return Packet().ipv6({.src = kClient6, .dst = kWeb6}).ext(Ipv6Ext::fragment(0, false, id));
    };

    apply(policy({"{name: everything, from: {app: client}, to: {app: web}, ports: [any], "
                  "action: allow}"}));
    expect_all({
        {"first fragment, everything allowed", kXdp, first(0x71000001), kPass, "allow-rule",
         "everything"},
        {"second fragment: tracked, no parse gap counted as a deny", kXdp, second(0x71000001),
         kPass, "tracked"},
        {"a second fragment of no first: everything allowed", kXdp, second(0x71000002), kPass,
         "allow-rule", "everything"},
    });

    apply(policy({allow("echo", "client", "web", "icmpv6/128"),
                  allow("https", "client", "web", "tcp/443")}));
    expect_all({
        {"first fragment: matched as ICMPv6 echo behind the fragment header", kXdp,
         first(0x71000003), kPass, "allow-rule", "echo"},
        {"second fragment: tracked", kXdp, second(0x71000003), kPass, "tracked"},
        {"second fragment of no first: port-less, echo only", kXdp, second(0x71000004), kDrop,
         "deny-default"},
        {"second fragment of the tracked id, another protocol", kXdp,
         second(0x71000003, kProtoTcp), kDrop, "deny-default"},
        {"atomic fragment (offset 0, M clear), echo: a whole packet", kXdp,
         atomic(0x71000005).icmpv6({.type = 128}), kPass, "allow-rule", "echo"},
        {"atomic fragment, TCP to 443", kXdp, atomic(0x71000006).tcp({.dport = 443}), kPass,
         "allow-rule", "https"},
        {"atomic fragment, TCP to 80", kXdp, atomic(0x71000007).tcp({.dport = 80}), kDrop,
         "deny-default"},
        {"an atomic fragment starts no fragment train", kXdp, second(0x71000005), kDrop,
         "deny-default"},
    });
}

// A commit that still allows a fragmented packet's flow does not lose the
// fragments in flight (field case U1: 443 never drops during a switch); a
// commit that revokes it leaves them to the port-less verdict.
TEST_F(StatefulTest, FragmentsInFlightSurviveACommitThatKeepsTheirRule)
{
    const std::string https = policy({allow("https", "client", "web", "tcp/443")});
    const std::string https_and_http = policy({allow("https", "client", "web", "tcp/443"),
                                               allow("http", "client", "web", "tcp/80")});
    const std::string http = policy({allow("http", "client", "web", "tcp/80")});
    const Bytes bytes = kPayloads.front().second;

    apply(https);
    expect(
        {"first fragment to 443", kXdp, first4(kClient4, kWeb4, 0x7201, 443), kPass, "allow-rule",
         "https"});
    apply(https_and_http);
    expect({"after a commit that keeps https: the next fragment", kXdp,
            later4(kClient4, kWeb4, 0x7201, kProtoTcp, bytes), kPass, "tracked"});
    apply(http);
    expect({"after a commit that drops https: port-less verdict", kXdp,
            later4(kClient4, kWeb4, 0x7201, kProtoTcp, bytes), kDrop, "deny-default"});
}

// A fragmented packet of a flow that is already tracked (a large UDP reply,
// the second large datagram of a flow, a large echo reply): its first
// fragment passes as tracked, and the fragments after it follow it.
TEST_F(StatefulTest, FragmentsOfATrackedFlowFollowTheirFirstFragment)
{
    apply(policy({allow("dns", "client", "web", "udp/53"),
                  allow("ping", "client", "web", "icmp/8, icmpv6/128")}));
    // the first fragment of a 3000-byte UDP datagram, and its second
    auto first_udp = [](const std::string& src, std::uint16_t sport, const std::string& dst,
                        std::uint16_t dport, std::uint32_t id) {
        Packet p = is_v6(src) ? Packet().ipv6({.src = src, .dst = dst}).ext(
                                    Ipv6Ext::fragment(0, true, id))
                              : Packet().ipv4({.src = src,
                                               .dst = dst,
                                               .more_fragments = true,
                                               .id = static_cast<std::uint16_t>(id)});
        return p.udp({.sport = sport, .dport = dport, .length = 3008}).payload(1472, 0x33);
    };
    auto second_udp = [](const std::string& src, const std::string& dst, std::uint32_t id) {
        if (is_v6(src)) {
            return Packet()
                .ipv6({.src = src, .dst = dst})
                .ext(Ipv6Ext::fragment(185, true, id))
                .raw_l4(kProtoUdp)
                .payload(1480, 0x33);
        }
        return later4(src, dst, static_cast<std::uint16_t>(id), kProtoUdp, Bytes(1480, 0x33),
                      185, true);
    };
    auto first_echo_reply = [](std::uint16_t echo_id, std::uint16_t id) {
        return Packet()
            .ipv4({.src = kWeb4, .dst = kClient4, .more_fragments = true, .id = id})
            .icmp({.type = 0, .id = echo_id})
            .payload(1472, 0x61);
    };

    expect_all({
        {"UDP client -> web:53 opens the flow", kXdp, udp(kClient4, 48100, kWeb4, 53), kPass,
         "allow-rule", "dns"},
        {"a large reply, first fragment: tracked", kXdp,
         first_udp(kWeb4, 53, kClient4, 48100, 0x7301), kPass, "tracked", "dns"},
        {"its second fragment: follows the first", kXdp, second_udp(kWeb4, kClient4, 0x7301),
         kPass, "tracked"},
        {"a large second request, first fragment: tracked", kXdp,
         first_udp(kClient4, 48100, kWeb4, 53, 0x7302), kPass, "tracked", "dns"},
        {"its second fragment: follows the first", kXdp, second_udp(kClient4, kWeb4, 0x7302),
         kPass, "tracked"},

        {"IPv6 UDP client -> web:53", kXdp, udp(kClient6, 48100, kWeb6, 53), kPass, "allow-rule",
         "dns"},
        {"a large IPv6 reply, first fragment: tracked", kXdp,
         first_udp(kWeb6, 53, kClient6, 48100, 0x73000003), kPass, "tracked", "dns"},
        {"its second fragment", kXdp, second_udp(kWeb6, kClient6, 0x73000003), kPass, "tracked"},

        {"echo request client -> web, id 0x4801", kXdp, echo(kClient4, kWeb4, 0x4801, false),
         kPass, "allow-rule", "ping"},
        {"a large echo reply, first fragment: tracked", kXdp, first_echo_reply(0x4801, 0x7304),
         kPass, "tracked", "ping"},
        {"its second fragment", kXdp, second_udp(kWeb4, kClient4, 0x7304).ipv4({.src = kWeb4,
         .dst = kClient4, .frag_offset = 185, .id = 0x7304}).raw_l4(kProtoIcmp), kPass,
         "tracked"},
    });
}

// ---------------------------------------------------------------------------
// Revocation and re-application
// ---------------------------------------------------------------------------

TEST_F(StatefulTest, RevokingARuleCutsTrackedFlowsAtTheirNextPacket)
{
    const std::string https = policy({allow("https", "client", "web", "tcp/443"),
                                      allow("ping", "client", "web", "icmp/8")});
    const std::string none = policy({allow("http", "client", "web", "tcp/80")});

    apply(https);
    expect_all({
        {"flow 1: SYN", kXdp, tcp(kClient4, 47001, kWeb4, 443, kTcpSyn), kPass, "allow-rule",
         "https"},
        {"flow 1: SYN-ACK", kXdp, tcp(kWeb4, 443, kClient4, 47001, kSynAck), kPass, "tracked", "https"},
        {"flow 1: ACK", kXdp, tcp(kClient4, 47001, kWeb4, 443, kTcpAck), kPass, "tracked", "https"},
        {"flow 2: SYN", kXdp, tcp(kClient4, 47002, kWeb4, 443, kTcpSyn), kPass, "allow-rule",
         "https"},
        {"flow 2: SYN-ACK", kXdp, tcp(kWeb4, 443, kClient4, 47002, kSynAck), kPass, "tracked", "https"},
        {"flow 3: cgroup egress SYN", kCgOut, tcp(kClient4, 47003, kWeb4, 443, kTcpSyn), kPass,
         "allow-rule", "https"},
        {"echo request id 0x4701", kXdp, echo(kClient4, kWeb4, 0x4701, false), kPass,
         "allow-rule", "ping"},
    });

    apply(none);
    expect_all({
        {"flow 1, the client's next packet: revoked", kXdp,
         tcp(kClient4, 47001, kWeb4, 443, kTcpAck).payload(10, 1), kDrop, "deny-default", "",
         "revoked"},
        {"flow 1, web's reply after that: no entry any more", kXdp,
         tcp(kWeb4, 443, kClient4, 47001, kTcpAck), kDrop, "deny-default", "", "ct-miss"},
        {"flow 2, web's reply first: revoked", kXdp, tcp(kWeb4, 443, kClient4, 47002, kTcpAck),
         kDrop, "deny-default", "", "revoked"},
        {"flow 2, then the client: no entry", kXdp, tcp(kClient4, 47002, kWeb4, 443, kTcpAck),
         kDrop, "deny-default", "", "ct-miss"},
        {"flow 3, at cgroup egress: revoked", kCgOut, tcp(kClient4, 47003, kWeb4, 443, kTcpAck),
         kDrop, "deny-default", "", "revoked"},
        {"the echo reply: revoked", kXdp, echo(kWeb4, kClient4, 0x4701, true), kDrop,
         "deny-default", "", "revoked"},
    });

    // allowed again: a mid-flow packet is judged afresh and tracked again
    apply(https);
    expect_all({
        {"flow 1 after the rule is back: judged by the rule (a miss)", kXdp,
         tcp(kClient4, 47001, kWeb4, 443, kTcpAck), kPass, "allow-rule", "https", "ct-miss"},
        {"and its reply is tracked again", kXdp, tcp(kWeb4, 443, kClient4, 47001, kTcpAck),
         kPass, "tracked", "https"},
    });
}

TEST_F(StatefulTest, ReapplyingPoliciesThatStillAllowAFlowKeepsItTracked)
{
    const std::string https = policy({allow("https", "client", "web", "tcp/443")});
    const std::string https_and_more = policy(
        {allow("https", "client", "web", "tcp/443"), allow("http", "client", "web", "tcp/80")});

    apply(https);
    expect_all({
        {"SYN", kXdp, tcp(kClient4, 48000, kWeb4, 443, kTcpSyn), kPass, "allow-rule", "https"},
        {"SYN-ACK", kXdp, tcp(kWeb4, 443, kClient4, 48000, kSynAck), kPass, "tracked", "https"},
    });
    const std::uint64_t generation = current_generation(dp());
    for (int i = 0; i < 5; i++) {
        SCOPED_TRACE(fmt::format("unchanged re-apply #{}", i));
        EXPECT_TRUE(apply(https).unchanged);
        expect_all({
            {"client's packet", kXdp, tcp(kClient4, 48000, kWeb4, 443, kTcpAck), kPass,
             "tracked", "https"},
            {"web's reply", kXdp, tcp(kWeb4, 443, kClient4, 48000, kTcpAck), kPass, "tracked", "https"},
        });
    }
    EXPECT_EQ(current_generation(dp()), generation) << "an unchanged policy is no new generation";

    // new generations that still allow the flow: re-checked, never cut
    for (int i = 0; i < 4; i++) {
        SCOPED_TRACE(fmt::format("changed re-apply #{}", i));
        EXPECT_FALSE(apply(i % 2 == 0 ? https_and_more : https).unchanged);
        expect_all({
            {"web's reply first", kXdp, tcp(kWeb4, 443, kClient4, 48000, kTcpAck), kPass,
             "tracked", "https"},
            {"client's packet", kXdp, tcp(kClient4, 48000, kWeb4, 443, kTcpAck), kPass,
             "tracked", "https"},
        });
    }
    EXPECT_EQ(current_generation(dp()), generation + 4);
}

// C1: a tracking table of 1024 entries, one long-lived flow, 5000 others.
TEST_F(StatefulFieldCase, ReplyWhoseEntryWasEvicted)
{
    options_.max_connections = 1024;
    apply(policy({allow("https", "client", "web", "tcp/443")}));
    expect_all({
        {"long-lived flow: SYN", kXdp, tcp(kClient4, 1000, kWeb4, 443, kTcpSyn), kPass,
         "allow-rule", "https"},
        {"long-lived flow: SYN-ACK", kXdp, tcp(kWeb4, 443, kClient4, 1000, kSynAck), kPass,
         "tracked", "https"},
        {"second long-lived flow: SYN", kXdp, tcp(kClient4, 1001, kWeb4, 443, kTcpSyn), kPass,
         "allow-rule", "https"},
        {"second long-lived flow: SYN-ACK", kXdp, tcp(kWeb4, 443, kClient4, 1001, kSynAck),
         kPass, "tracked", "https"},
    });

    const int prog = dp().program_fd("bh_xdp");
    int passed = 0;
    for (std::uint16_t i = 0; i < 5000; i++) {
        Packet syn = tcp(kClient6, static_cast<std::uint16_t>(10000 + i), kWeb6, 443, kTcpSyn);
        passed += test_run(prog, syn.bytes()) == kXdpPass ? 1 : 0;
    }
    EXPECT_EQ(passed, 5000) << "every short flow is allowed: a full table refuses no flow";

    // the table is full and says so
    Stats stats = dp().stats();
    auto ct = std::find_if(stats.maps.begin(), stats.maps.end(),
                           [](const MapFill& m) { return m.name == "bh_ct"; });
    ASSERT_NE(ct, stats.maps.end()) << "stats() reports no bh_ct fill level";
    EXPECT_EQ(ct->max_entries, 1024u);
    EXPECT_GE(ct->entries, 900u);
    EXPECT_LE(ct->entries, 1024u);

    // what happens to the long-lived flow's reply depends only on whether its
    // entry survived the LRU: either it passes as tracked, or it is dropped
    // and counted as a tracking miss the user can see; never silently
    bh_ct_key key{};
    IpAddr client = *IpAddr::parse(kClient4);
    IpAddr web = *IpAddr::parse(kWeb4);
    std::memcpy(key.src.bytes, client.bytes.data(), 16);
    std::memcpy(key.dst.bytes, web.bytes.data(), 16);
    key.sport = htons(1000);
    key.dport = htons(443);
    key.proto = kProtoTcp;
    key.point = BH_CT_POINT_INGRESS;  // opened at XDP
    bh_ct_value value{};
    bool survived = bpf_map_lookup_elem(dp().map_fd("bh_ct"), &key, &value) == 0;
    fmt::print("C1: the long-lived flow's entry {} the 5000 others\n",
               survived ? "survived" : "was evicted by");
    if (survived) {
        expect({"the reply, entry still there", kXdp, tcp(kWeb4, 443, kClient4, 1000, kTcpAck),
                kPass, "tracked", "https"});
    } else {
        expect({"the reply, entry evicted: dropped and counted as a miss", kXdp,
                tcp(kWeb4, 443, kClient4, 1000, kTcpAck), kDrop, "deny-default", "", "ct-miss"});
    }
    expect({"a new connection web -> client:443 is dropped", kXdp,
            tcp(kWeb4, 1000, kClient4, 443, kTcpSyn), kDrop, "deny-default"});

    // the other branch, made certain: a second long-lived flow whose entry
    // is removed as the LRU would remove it
    key.sport = htons(1001);
    if (bpf_map_delete_elem(dp().map_fd("bh_ct"), &key) != 0) {
        ASSERT_EQ(errno, ENOENT) << "remove the second long-lived flow's entry";
    }
    expect_all({
        {"the reply of a flow whose entry is gone: dropped, a tracking miss", kXdp,
         tcp(kWeb4, 443, kClient4, 1001, kTcpAck), kDrop, "deny-default", "", "ct-miss"},
        {"and a new connection on its ports the other way: dropped", kXdp,
         tcp(kWeb4, 443, kClient4, 1001, kTcpSyn), kDrop, "deny-default"},
    });
}

// ---------------------------------------------------------------------------
// Failsafe
// ---------------------------------------------------------------------------

TEST_F(StatefulTest, FailsafeKeepsHostPortsOpenToManagementPrefixes)
{
    const std::string mgmt = "{ports: [tcp/22], from: [203.0.113.0/28, \"2001:db8:1::/64\"]}";
    apply(policy({kDenyAll}, mgmt));
    expect_all({
        {"tcp/22 to host from the management prefix, under deny-all", kXdp,
         tcp(kClient4, 49000, kHost4, 22, kTcpSyn), kPass, "failsafe"},
        {"its next packet: tracked", kXdp, tcp(kClient4, 49000, kHost4, 22, kTcpAck), kPass,
         "tracked"},
        {"host's reply: tracked", kXdp, tcp(kHost4, 22, kClient4, 49000, kSynAck), kPass,
         "tracked"},
        {"IPv6 tcp/22 to host from the management prefix", kXdp,
         tcp(kClient6, 49000, kHost6, 22, kTcpSyn), kPass, "failsafe"},
        {"at cgroup ingress too (the local end is host by its address)", kCgIn,
         tcp(kClient4, 49001, kHost4, 22, kTcpSyn), kPass, "failsafe"},
        {"from outside the management prefix", kXdp,
         tcp(kClientOutsideMgmt4, 49000, kHost4, 22, kTcpSyn), kDrop, "deny-rule", "deny-all"},
        {"IPv6 from outside the management prefix", kXdp,
         tcp(kClientOutsideMgmt6, 49000, kHost6, 22, kTcpSyn), kDrop, "deny-rule", "deny-all"},
        {"another port of host", kXdp, tcp(kClient4, 49002, kHost4, 23, kTcpSyn), kDrop,
         "deny-rule", "deny-all"},
        {"udp/22 of host", kXdp, udp(kClient4, 49003, kHost4, 22), kDrop, "deny-rule",
         "deny-all"},
        {"tcp/22 of a workload that is not host", kXdp, tcp(kClient4, 49004, kWeb4, 22, kTcpSyn),
         kDrop, "deny-rule", "deny-all"},
        {"not at an egress point", kCgOut, tcp(kClient4, 49005, kHost4, 22, kTcpSyn), kDrop,
         "deny-rule", "deny-all"},
    });

    apply(policy({kDenyAll}, "{enabled: false}"));
    expect_all({
        {"failsafe off: tcp/22 from the management prefix", kXdp,
         tcp(kClient4, 49010, kHost4, 22, kTcpSyn), kDrop, "deny-rule", "deny-all"},
    });

    // not written at all: SSH from anywhere
    std::string no_failsafe = policy({kDenyAll});
    no_failsafe.replace(no_failsafe.find("failsafe: {enabled: false}\n"),
                        std::string("failsafe: {enabled: false}\n").size(), "");
    apply(no_failsafe);
    expect_all({
        {"default failsafe: tcp/22 from any IPv4 address", kXdp,
         tcp(kClientOutsideMgmt4, 49011, kHost4, 22, kTcpSyn), kPass, "failsafe"},
        {"default failsafe: tcp/22 from any IPv6 address", kXdp,
         tcp(kClientOutsideMgmt6, 49011, kHost6, 22, kTcpSyn), kPass, "failsafe"},
        {"default failsafe: tcp/80 stays denied", kXdp,
         tcp(kClientOutsideMgmt4, 49012, kHost4, 80, kTcpSyn), kDrop, "deny-rule", "deny-all"},
    });

    // an IPv6 prefix shorter than /96 never covers IPv4, and IPv4 /0 no IPv6
    apply(policy({kDenyAll}, "{ports: [tcp/22], from: [\"::/0\"]}"));
    expect_all({
        {"from ::/0 only: IPv6 source", kXdp, tcp(kClient6, 49013, kHost6, 22, kTcpSyn), kPass,
         "failsafe"},
        {"from ::/0 only: IPv4 source", kXdp, tcp(kClient4, 49013, kHost4, 22, kTcpSyn), kDrop,
         "deny-rule", "deny-all"},
    });
    apply(policy({kDenyAll}, "{ports: [tcp/22], from: [0.0.0.0/0]}"));
    expect_all({
        {"from 0.0.0.0/0 only: IPv4 source", kXdp, tcp(kClient4, 49014, kHost4, 22, kTcpSyn),
         kPass, "failsafe"},
        {"from 0.0.0.0/0 only: IPv6 source", kXdp, tcp(kClient6, 49014, kHost6, 22, kTcpSyn),
         kDrop, "deny-rule", "deny-all"},
    });
}

// The failsafe is about the destination being this machine, whatever else
// selects its address: a rule that names the host's address by CIDR (which
// makes the compiler give the address a narrower datapath class) must not
// close it.
TEST_F(StatefulTest, FailsafeHoldsWhenARuleNamesTheHostAddressByCidr)
{
    const std::string mgmt = "{ports: [tcp/22], from: [203.0.113.0/28, \"2001:db8:1::/64\"]}";
    apply(policy({"{name: deny-net, from: any, to: [{cidr: 198.51.100.0/24}, "
                  "{cidr: \"2001:db8::/64\"}], ports: [any], action: deny}"},
                 mgmt));
    expect_all({
        {"tcp/22 to host from the management prefix", kXdp,
         tcp(kClient4, 49100, kHost4, 22, kTcpSyn), kPass, "failsafe"},
        {"IPv6 tcp/22 to host from the management prefix", kXdp,
         tcp(kClient6, 49100, kHost6, 22, kTcpSyn), kPass, "failsafe"},
        {"from outside the management prefix", kXdp,
         tcp(kClientOutsideMgmt4, 49101, kHost4, 22, kTcpSyn), kDrop, "deny-rule", "deny-net"},
    });

    apply(policy({"{name: allow-web-from-net, from: {cidr: 198.51.100.0/24}, to: {app: web}, "
                  "ports: [tcp/443], action: allow}"},
                 mgmt));
    expect_all({
        {"a rule naming host's /24 as a source: tcp/22 to host still open", kXdp,
         tcp(kClient4, 49102, kHost4, 22, kTcpSyn), kPass, "failsafe"},
    });
}

// ---------------------------------------------------------------------------
// cgroup identities
// ---------------------------------------------------------------------------

// The local end of a cgroup hook is the identity of the nearest registered
// ancestor of the process's cgroup; a process in no registered cgroup is
// judged by its address.
TEST_F(StatefulTest, TheLocalProcessHasTheIdentityOfItsNearestRegisteredCgroup)
{
    netlab::Cgroup app_cgroup("stateful-app");
    NestedCgroup nested(app_cgroup.path() / "worker");
    const std::string app = fmt::format(
        "  - {{name: app, labels: {{app: app}}, ingress: enforce, egress: enforce, "
        "cgroups: [\"{}\"]}}\n",
        app_cgroup.path().string());
    apply(policy({allow("app-https", "app", "web", "tcp/443"),
                  allow("web-to-app", "web", "app", "tcp/8080")},
                 "{enabled: false}", app));
    const fs::path in_app = app_cgroup.path();
    const fs::path in_worker = nested.path();

    expect_all({
        {"egress from a process in app's cgroup: app -> web:443", kCgOut,
         tcp(kLocal4, 50000, kWeb4, 443, kTcpSyn), kPass, "allow-rule", "app-https", "", in_app},
        {"its reply at ingress: tracked", kCgIn, tcp(kWeb4, 443, kLocal4, 50000, kSynAck), kPass,
         "tracked", "app-https", "", in_app},
        {"egress from a process in a cgroup below app's: inherited", kCgOut,
         tcp(kLocal4, 50001, kWeb4, 443, kTcpSyn), kPass, "allow-rule", "app-https", "",
         in_worker},
        {"egress from a process in no registered cgroup: its address (world) enforces", kCgOut,
         tcp(kLocal4, 50002, kWeb4, 443, kTcpSyn), kDrop, "deny-default"},
        {"egress from app to web:80: app's egress enforces", kCgOut,
         tcp(kLocal4, 50003, kWeb4, 80, kTcpSyn), kDrop, "deny-default", "", "", in_app},
        {"ingress web -> app:8080", kCgIn, tcp(kWeb4, 50004, kLocal4, 8080, kTcpSyn), kPass,
         "allow-rule", "web-to-app", "", in_app},
        {"ingress web -> app:8080 in the nested cgroup", kCgIn,
         tcp(kWeb4, 50005, kLocal4, 8080, kTcpSyn), kPass, "allow-rule", "web-to-app", "",
         in_worker},
        {"ingress web -> 8080 of a process in no registered cgroup", kCgIn,
         tcp(kWeb4, 50006, kLocal4, 8080, kTcpSyn), kDrop, "deny-default"},
    });
}

}  // namespace
}  // namespace bulkhead::test
