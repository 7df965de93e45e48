// Atomic policy updates (DESIGN.md "Atomic policy updates"): packets never
// see a mix of two generations, re-applying an unchanged policy drops nothing
// (field case U1), a commit that does not fit changes nothing, SIGKILL in the
// middle of a commit leaves a whole generation in force, a pinned map of
// another layout is refused, and commits of two processes are serialized
// without loss.
//
// Traffic is bh_xdp under BPF_PROG_TEST_RUN from threads pinned to CPUs; the
// other writers are forked children that have only the forking thread.
// Nothing here measures time: every assertion is on verdicts, counters,
// tables and bookkeeping.
#include "support/bpf_env.hpp"
#include "support/child_process.hpp"
#include "support/packet.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include "netlab.hpp"

#include <bpf/bpf.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

// S sends to D; the policies decide who S is and whom D admits.
constexpr const char* kSrc4 = "203.0.113.10";
constexpr const char* kDst4 = "198.51.100.20";

// ---------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------

// A policy over identities and rules given as flow-style YAML mappings. D
// enforces at ingress, and so does everything by default; failsafes are off.
std::string yaml_policy(const std::vector<std::string>& identities,
                        const std::vector<std::string>& rules)
{
    std::string text =
        "apiVersion: bulkhead/v1\n"
        "defaults: {ingress: enforce, egress: allow}\n"
        "failsafe: {enabled: false}\n"
        "identities:\n";
    for (const std::string& identity : identities)
        text += "  - " + identity + "\n";
    text += fmt::format("  - {{name: d, labels: {{app: d}}, cidrs: [{}/32], ingress: enforce}}\n",
                        kDst4);
    text += "rules:\n";
    for (const std::string& rule : rules)
        text += "  - " + rule + "\n";
    return text;
}

std::string identity(const std::string& app, const std::vector<std::string>& cidrs)
{
    return fmt::format("{{name: {0}, labels: {{app: {0}}}, cidrs: [{1}]}}", app,
                       fmt::join(cidrs, ", "));
}

std::string rule(const std::string& name, const std::string& from, const std::string& ports,
                 const std::string& action = "allow")
{
    return fmt::format("{{name: {}, from: {{app: {}}}, to: {{app: d}}, ports: [{}], action: {}}}",
                       name, from, ports, action);
}

Policy parse(const std::string& yaml)
{
    return Policy::parse(yaml, "<atomicity>");
}

// The rule names of the policy in force, in file order.
std::vector<std::string> rules_in_force(const Dataplane& dp)
{
    std::vector<std::string> names;
    if (std::optional<Policy> p = dp.current_policy()) {
        for (const Rule& r : p->rules)
            names.push_back(r.name);
    }
    return names;
}

// ---------------------------------------------------------------------------
// Packets and counters
// ---------------------------------------------------------------------------

Bytes tcp_frame(std::uint16_t dport, std::uint16_t sport)
{
    return Packet()
        .ipv4({.src = kSrc4, .dst = kDst4})
        .tcp({.sport = sport, .dport = dport})
        .bytes();
}

// An echo reply opens no tracking state, so every one of them is judged by
// the policy tables; a TCP flow is judged by them only on its first packet
// and on its first packet after each new generation.
Bytes echo_reply_frame()
{
    return Packet().ipv4({.src = kSrc4, .dst = kDst4}).icmp({.type = 0, .id = 0x77}).bytes();
}

Flow flow_to_dst(const char* src, std::uint16_t dport)
{
    return Flow{*IpAddr::parse(src), *IpAddr::parse(kDst4), kProtoTcp, dport};
}

std::uint64_t reason_packets(const Stats& stats, std::string_view reason)
{
    for (const auto& [name, counter] : stats.reasons) {
        if (name == reason)
            return counter.packets;
    }
    ADD_FAILURE() << "stats() has no reason counter '" << reason << "'";
    return 0;
}

// How many packets each reason counter moved between two snapshots.
std::map<std::string, std::uint64_t> reason_deltas(const Stats& before, const Stats& after)
{
    std::map<std::string, std::uint64_t> out;
    for (const auto& [name, counter] : after.reasons)
        out[name] = counter.packets - reason_packets(before, name);
    return out;
}

// ---------------------------------------------------------------------------
// Traffic: test runs in threads pinned to CPUs
// ---------------------------------------------------------------------------

// The CPUs this process may run on, in order.
std::vector<int> usable_cpus()
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        throw_errno("read this process's CPU affinity");
    std::vector<int> cpus;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (CPU_ISSET(cpu, &set))
            cpus.push_back(cpu);
    }
    return cpus;
}

// The i-th usable CPU (wrapping around on a machine with fewer).
int nth_cpu(std::size_t i)
{
    std::vector<int> cpus = usable_cpus();
    return cpus.at(i % cpus.size());
}

struct TrafficTotals {
    std::uint64_t packets = 0;
    std::uint64_t passes = 0;
    std::uint64_t drops = 0;
    std::vector<std::uint64_t> packets_per_frame;
};

// Runs bh_xdp on `frames`, in turn and round again, without pause, in a
// thread pinned to `cpu`, until stop(). One packet per BPF_PROG_TEST_RUN
// call: the action of each packet is seen, and with repeat > 1 the kernel
// swaps the XDP dispatcher's program before and after every call, which
// waits for RCU grace periods (about 25 calls a second here, against some
// 700,000 with one packet each).
class TrafficLoop {
public:
    TrafficLoop(int prog_fd, std::vector<Bytes> frames, int cpu)
        : prog_fd_(prog_fd), frames_(std::move(frames)), cpu_(cpu), thread_([this] { run(); })
    {
    }
    TrafficLoop(const TrafficLoop&) = delete;
    TrafficLoop& operator=(const TrafficLoop&) = delete;
    ~TrafficLoop()
    {
        stop_ = true;
        if (thread_.joinable())
            thread_.join();
    }

    // Returns once the thread has completed a call, so the traffic is on.
    void wait_running() const
    {
        auto deadline = std::chrono::steady_clock::now() + 10s;
        while (packets_.load() == 0 && !failed_.load()) {
            if (std::chrono::steady_clock::now() > deadline)
                throw std::runtime_error(fmt::format("no test run on CPU {} within 10 s", cpu_));
            std::this_thread::sleep_for(1ms);
        }
    }

    // Stops the thread; rethrows what it failed with.
    TrafficTotals stop()
    {
        stop_ = true;
        if (thread_.joinable())
            thread_.join();
        if (failure_)
            std::rethrow_exception(failure_);
        return totals_;
    }

private:
    void run()
    {
        try {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpu_, &set);
            if (int err = pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
                throw std::system_error(err, std::generic_category(),
                                        fmt::format("pin a traffic thread to CPU {}", cpu_));
            totals_.packets_per_frame.assign(frames_.size(), 0);
            for (std::size_t i = 0; !stop_.load(std::memory_order_relaxed); i++) {
                std::size_t f = i % frames_.size();
                XdpRun r = run_xdp(prog_fd_, frames_[f]);
                totals_.packets++;
                totals_.packets_per_frame[f]++;
                totals_.passes += r.retval == kXdpPass;
                totals_.drops += r.retval == kXdpDrop;
                packets_.store(totals_.packets, std::memory_order_relaxed);
            }
        } catch (...) {
            failure_ = std::current_exception();
            failed_ = true;
        }
    }

    int prog_fd_;
    std::vector<Bytes> frames_;
    int cpu_;
    std::atomic<bool> stop_{false};
    std::atomic<bool> failed_{false};
    std::atomic<std::uint64_t> packets_{0};
    TrafficTotals totals_;
    std::exception_ptr failure_;
    std::thread thread_;  // last: starts once everything it uses exists
};

// ---------------------------------------------------------------------------
// The generation in force, checked whole
// ---------------------------------------------------------------------------

// Entries in a map, by walking its keys.
std::size_t count_entries(int fd)
{
    bpf_map_info info{};
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0)
        throw_errno("read a map's info");
    std::vector<std::uint8_t> key(info.key_size), next(info.key_size);
    std::size_t n = 0;
    const void* cursor = nullptr;
    while (bpf_map_get_next_key(fd, cursor, next.data()) == 0) {
        ++n;
        key.swap(next);
        cursor = key.data();
    }
    return n;
}

// Every per-generation table of the generation in force holds as many
// entries as its bookkeeping says (status().maps).
void expect_tables_match_bookkeeping(const Dataplane& dp)
{
    Status status = dp.status();
    for (const char* table : {"bh_ipc_host", "bh_ipc_lpm", "bh_policy", "bh_cgroups"}) {
        auto fill = std::find_if(status.maps.begin(), status.maps.end(),
                                 [&](const MapFill& m) { return m.name == table; });
        ASSERT_NE(fill, status.maps.end()) << "status() does not list " << table;
        BpfFd inner = active_inner_map(dp, table);
        EXPECT_EQ(count_entries(inner.get()), fill->entries)
            << table << " of generation " << status.generation;
    }
}

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

class AtomicityTest : public DataplaneTest {
protected:
    int xdp() { return dp().program_fd("bh_xdp"); }

    ApplyResult apply(const Policy& policy, const std::string& source = "<atomicity>")
    {
        return dp().apply(policy, source);
    }
};

// Field cases of /work/shared/cases/field-cases.md about commits.
class AtomicityFieldCase : public AtomicityTest {};

// ---------------------------------------------------------------------------
// Never a mix
// ---------------------------------------------------------------------------

// The policy of round `who`: identity `who` has S's address, the others
// exist without one, and only `who` may reach D on tcp/80 (and send it echo
// replies). Any two of them mixed, the IP cache of one and the policy table
// of another, name S an identity that no rule admits: a default deny.
std::string owner_policy(const std::string& who)
{
    std::vector<std::string> identities;
    for (const std::string app : {"a", "b", "c"}) {
        std::vector<std::string> cidrs;
        if (app == who)
            cidrs.push_back(fmt::format("{}/32", kSrc4));
        identities.push_back(identity(app, cidrs));
    }
    return yaml_policy(identities, {rule(who + "-to-d", who, "tcp/80, icmp/0")});
}

TEST_F(AtomicityTest, PacketsNeverSeeAMixOfTwoGenerations)
{
    // Policies A and B as the issue pairs them, and a third, C, of the same
    // kind: committing A and B in turn would find the slot it writes already
    // holding the policy it commits (two generations back), and write
    // nothing there. With three in turn, every commit rewrites S's IP cache
    // entry and the policy entry in the slot that packets used two
    // generations before. (A datapath that read the generation again for its
    // policy lookup failed here with about a hundred mixed verdicts.)
    const std::vector<Policy> policies = {parse(owner_policy("a")), parse(owner_policy("b")),
                                          parse(owner_policy("c"))};
    constexpr int kFlips = 2100;

    for (const Policy& p : policies) {
        // each alone lets S in, by its own rule
        apply(p);
        Explanation e = dp().explain(flow_to_dst(kSrc4, 80));
        ASSERT_EQ(e.verdict.kind, VerdictKind::allow) << p.rules[0].name;
        ASSERT_EQ(e.verdict.rule, p.rules[0].name);
    }

    // per CPU: TCP flows (judged by the tables when new and on their first
    // packet after each commit, else tracked) between echo replies (every
    // one judged by the tables)
    Stats before = dp().stats();
    std::vector<std::unique_ptr<TrafficLoop>> loops;
    for (std::size_t cpu = 0; cpu < 2; cpu++) {
        std::vector<Bytes> frames;
        for (std::uint16_t flow = 0; flow < 256; flow++) {
            frames.push_back(tcp_frame(80, static_cast<std::uint16_t>(30000 + cpu * 1000 + flow)));
            frames.push_back(echo_reply_frame());
        }
        loops.push_back(std::make_unique<TrafficLoop>(xdp(), std::move(frames), nth_cpu(cpu)));
    }
    for (const auto& loop : loops)
        loop->wait_running();
    const std::uint64_t first = current_generation(dp());

    std::size_t commits_writing_nothing = 0;
    for (int flip = 1; flip <= kFlips; flip++) {
        // A, B, C, A, ...: never the policy in force, nor the one in the slot
        ApplyResult r = apply(policies[static_cast<std::size_t>(flip - 1) % policies.size()]);
        ASSERT_EQ(r.generation, first + static_cast<std::uint64_t>(flip));
        commits_writing_nothing += r.written == 0;
    }

    std::vector<TrafficTotals> totals;
    for (const auto& loop : loops)
        totals.push_back(loop->stop());
    Stats after = dp().stats();
    auto moved = reason_deltas(before, after);

    std::uint64_t packets = 0;
    std::uint64_t echo_replies = 0;
    for (std::size_t i = 0; i < totals.size(); i++) {
        SCOPED_TRACE(fmt::format("traffic thread {}", i));
        EXPECT_EQ(totals[i].drops, 0u) << "of " << totals[i].packets << " packets";
        EXPECT_GT(totals[i].packets, 0u);
        packets += totals[i].packets;
        for (std::size_t f = 1; f < totals[i].packets_per_frame.size(); f += 2)
            echo_replies += totals[i].packets_per_frame[f];
    }
    RecordProperty("packets", std::to_string(packets));
    EXPECT_EQ(commits_writing_nothing, 0u) << "commits that rewrote nothing test nothing";
    // a mix denies by default, in a first packet, an echo reply or the
    // re-check of a tracked flow (which also counts as revoked)
    EXPECT_EQ(moved["deny-default"], 0u) << "packets judged by a mix of two generations";
    EXPECT_EQ(moved["revoked"], 0u);
    EXPECT_EQ(moved["deny-rule"] + moved["malformed"] + moved["no-policy"], 0u);
    EXPECT_EQ(moved["allow-rule"] + moved["tracked"], packets) << "every packet passed";
    EXPECT_GE(moved["allow-rule"], echo_replies) << "every echo reply was judged by the tables";
}

// ---------------------------------------------------------------------------
// Field case U1
// ---------------------------------------------------------------------------

// A (S) to B (D) on `ports`.
std::string a_to_b(const std::string& ports)
{
    return yaml_policy({identity("a", {fmt::format("{}/32", kSrc4)})},
                       {rule("a-to-b", "a", ports)});
}

// U1, first half: an unchanged policy applied in a loop while an allowed
// flow sends packets, by this handle and by new handles as a CLI would.
TEST_F(AtomicityFieldCase, ReapplyingTheSamePolicyDropsNothing)
{
    const Policy p1 = parse(a_to_b("tcp/80, tcp/443"));

    const std::uint64_t generation = apply(p1).generation;
    Stats before = dp().stats();
    std::vector<std::unique_ptr<TrafficLoop>> loops;
    for (std::size_t cpu = 0; cpu < 2; cpu++) {
        std::vector<Bytes> frames;
        for (std::uint16_t flow = 0; flow < 64; flow++) {
            auto sport = static_cast<std::uint16_t>(30000 + cpu * 1000 + flow);
            frames.push_back(tcp_frame(443, sport));
            frames.push_back(tcp_frame(80, sport));
        }
        loops.push_back(std::make_unique<TrafficLoop>(xdp(), std::move(frames), nth_cpu(cpu)));
    }
    for (const auto& loop : loops)
        loop->wait_running();

    for (int i = 0; i < 200; i++) {
        ApplyResult r = i % 2 == 0 ? apply(p1) : Dataplane::open(options_).apply(p1, "<again>");
        EXPECT_TRUE(r.unchanged) << "apply " << i;
        EXPECT_EQ(r.generation, generation) << "apply " << i;
        EXPECT_EQ(r.written + r.deleted, 0u) << "apply " << i;
    }

    std::uint64_t packets = 0;
    for (const auto& loop : loops) {
        TrafficTotals t = loop->stop();
        EXPECT_EQ(t.drops, 0u);
        packets += t.packets;
    }
    auto moved = reason_deltas(before, dp().stats());
    EXPECT_EQ(moved["deny-default"] + moved["deny-rule"] + moved["malformed"], 0u);
    EXPECT_EQ(moved["allow-rule"] + moved["tracked"], packets);
    EXPECT_EQ(current_generation(dp()), generation);
    EXPECT_EQ(rules_in_force(dp()), std::vector<std::string>{"a-to-b"});
}

// U1, second half: switching between P1 {80, 443} and P2 {443, 8443}, port 22
// never passes and 443 never drops, in any packet.
TEST_F(AtomicityFieldCase, SwitchingPoliciesNeverOpensTheClosedPortNorClosesTheKeptOne)
{
    // P3 {443, 9443} joins the round so that every commit rewrites the slot
    // it fills (P1 and P2 alone would find it holding the same policy)
    const std::vector<Policy> policies = {parse(a_to_b("tcp/80, tcp/443")),
                                          parse(a_to_b("tcp/443, tcp/8443")),
                                          parse(a_to_b("tcp/443, tcp/9443"))};
    constexpr int kSwitches = 900;

    apply(policies[0]);
    // new flows over and over, so that packets are judged by the tables and
    // not only by tracking
    std::vector<Bytes> ssh, https;
    for (std::uint16_t flow = 0; flow < 4096; flow++) {
        ssh.push_back(tcp_frame(22, static_cast<std::uint16_t>(20000 + flow)));
        https.push_back(tcp_frame(443, static_cast<std::uint16_t>(40000 + flow)));
    }
    Stats before = dp().stats();
    TrafficLoop ssh_loop(xdp(), std::move(ssh), nth_cpu(0));
    TrafficLoop https_loop(xdp(), std::move(https), nth_cpu(1));
    ssh_loop.wait_running();
    https_loop.wait_running();

    std::size_t commits_writing_nothing = 0;
    for (int i = 1; i <= kSwitches; i++)
        commits_writing_nothing += apply(policies[static_cast<std::size_t>(i) % 3]).written == 0;

    TrafficTotals ssh_totals = ssh_loop.stop();
    TrafficTotals https_totals = https_loop.stop();
    auto moved = reason_deltas(before, dp().stats());

    EXPECT_EQ(commits_writing_nothing, 0u);
    EXPECT_EQ(ssh_totals.passes, 0u) << "tcp/22 passed, of " << ssh_totals.packets << " packets";
    EXPECT_EQ(https_totals.drops, 0u)
        << "tcp/443 dropped, of " << https_totals.packets << " packets";
    EXPECT_GT(ssh_totals.packets, 0u);
    EXPECT_GT(https_totals.packets, 0u);
    EXPECT_EQ(moved["deny-default"], ssh_totals.packets);
    EXPECT_EQ(moved["allow-rule"] + moved["tracked"], https_totals.packets);
    EXPECT_EQ(moved["revoked"], 0u) << "a tracked tcp/443 flow was cut";
}

// ---------------------------------------------------------------------------
// Fail whole
// ---------------------------------------------------------------------------

// `n` IPv6 host addresses for identity `app`, quoted for YAML.
std::vector<std::string> host_addresses(const std::string& group, std::size_t n)
{
    std::vector<std::string> out;
    for (std::size_t i = 1; i <= n; i++)
        out.push_back(fmt::format("\"2001:db8:{}::{:x}/128\"", group, i));
    return out;
}

// A policy that fits the policy table but not an IP cache host table of
// 1024 (field case M1 is the policy table; this is the other side).
TEST_F(AtomicityTest, ACommitThatDoesNotFitLeavesThePreviousGenerationInForce)
{
    options_.max_ipcache_hosts = 1024;
    const std::string src = fmt::format("{}/32", kSrc4);
    const Policy in_force =
        parse(yaml_policy({identity("a", {src})}, {rule("a-in", "a", "tcp/80")}));
    // 1 + 1 + 1024 host entries, and a rule that turns S away
    const Policy too_big =
        parse(yaml_policy({identity("a", {src}), identity("crowd", host_addresses("c", 1024))},
                          {rule("a-out", "a", "tcp/80", "deny")}));
    const Policy fits =
        parse(yaml_policy({identity("a", {src}), identity("crowd", host_addresses("c", 1000))},
                          {rule("a-out", "a", "tcp/80", "deny")}));

    const std::uint64_t generation = apply(in_force, "in-force").generation;
    ASSERT_EQ(run_xdp(xdp(), tcp_frame(80, 1000)).retval, kXdpPass);

    try {
        apply(too_big, "too-big");
        ADD_FAILURE() << "1026 host addresses were committed into a table of 1024";
    } catch (const Error& e) {
        std::string what = e.what();
        RecordProperty("error", what);
        EXPECT_NE(what.find("bh_ipc_host"), std::string::npos) << what;
        EXPECT_NE(what.find("1024"), std::string::npos) << what;
        EXPECT_NE(what.find("--max-ipcache-hosts"), std::string::npos) << what;
    }

    // the previous generation, whole: counters, bookkeeping, tables, verdicts
    Status status = dp().status();
    EXPECT_EQ(status.generation, generation);
    EXPECT_EQ(current_generation(dp()), generation);
    EXPECT_EQ(status.policy_source, "in-force");
    EXPECT_EQ(rules_in_force(dp()), std::vector<std::string>{"a-in"});
    expect_tables_match_bookkeeping(dp());
    for (const MapFill& fill : status.maps) {
        if (fill.name == "bh_ipc_host") {
            EXPECT_EQ(fill.max_entries, 1024u);
        }
    }
    Explanation e = dp().explain(flow_to_dst(kSrc4, 80));
    EXPECT_EQ(e.verdict.kind, VerdictKind::allow);
    EXPECT_EQ(e.verdict.rule, "a-in");
    Stats before = dp().stats();
    EXPECT_EQ(xdp_action_name(run_xdp(xdp(), tcp_frame(80, 1001)).retval), "pass");
    EXPECT_EQ(moved_one(counter_delta(before, dp().stats()).rules, 1), "a-in");

    // and the next commit that fits goes through
    ApplyResult next = apply(fits, "fits");
    EXPECT_EQ(next.generation, generation + 1);
    EXPECT_EQ(dp().explain(flow_to_dst(kSrc4, 80)).verdict.rule, "a-out");
    EXPECT_EQ(xdp_action_name(run_xdp(xdp(), tcp_frame(80, 1002)).retval), "drop");
    expect_tables_match_bookkeeping(dp());
}

// ---------------------------------------------------------------------------
// SIGKILL during commits
// ---------------------------------------------------------------------------

constexpr std::size_t kBigHosts = 20000;

// Large policies that differ from each other in every host address: policy
// `index` gives its identity 20,000 IPv6 host addresses of its own. Even
// indices are "x" and include S, so S reaches D on tcp/80 by rule x-to-d;
// odd ones are "y" without S, so S is world and denied by default.
Policy big_policy(std::uint32_t index)
{
    const bool x = index % 2 == 0;
    Policy p;
    p.default_ingress = Mode::enforce;
    p.failsafe.enabled = false;

    Identity owner;
    owner.name = x ? "x" : "y";
    owner.labels = {{"app", owner.name}};
    for (std::size_t j = 1; j <= kBigHosts; j++)
        owner.cidrs.push_back(*Prefix::parse(
            fmt::format("2001:db8:{:x}:{:x}::{:x}/128", x ? 1 : 2, index & 0xffff, j)));
    if (x)
        owner.cidrs.push_back(*Prefix::parse(kSrc4));
    Identity d;
    d.name = "d";
    d.labels = {{"app", "d"}};
    d.cidrs = {*Prefix::parse(kDst4)};
    d.ingress = Mode::enforce;
    p.identities = {owner, d};

    auto by_app = [](const std::string& app) {
        return Selector{{SelectorTerm{SelectorTerm::Kind::labels, {{"app", {app}}}, {}}}};
    };
    p.rules.push_back(Rule{owner.name + "-to-d",
                           by_app(owner.name),
                           by_app("d"),
                           {PortSpec{PortSpec::Proto::tcp, 80, 80}},
                           Action::allow,
                           {}});
    return p;
}

std::string big_source(std::uint32_t index)
{
    return fmt::format("big-{}", index);
}

// The index a policy_source of big_source() names, or nullopt.
std::optional<std::uint32_t> big_index(const std::string& source)
{
    if (source.rfind("big-", 0) != 0)
        return std::nullopt;
    return static_cast<std::uint32_t>(std::stoul(source.substr(4)));
}

// The host addresses of a policy, as the IP cache host table keys them.
std::set<std::array<std::uint8_t, 16>> host_keys(const Policy& p)
{
    std::set<std::array<std::uint8_t, 16>> out;
    for (const Identity& ident : p.identities) {
        for (const Prefix& prefix : ident.cidrs) {
            if (prefix.is_host())
                out.insert(prefix.addr.bytes);
        }
    }
    return out;
}

// After a kill: the generation in force is one the children or the test
// committed, complete (bookkeeping, tables), and its verdict for S is the
// one its policy gives, by explain and by the program alike.
void expect_whole_generation(const Dataplane& dp, int prog_fd, std::uint16_t probe_sport)
{
    Status status = dp.status();
    EXPECT_EQ(status.generation, current_generation(dp));
    std::optional<std::uint32_t> index = big_index(status.policy_source);
    ASSERT_TRUE(index.has_value()) << "policy source '" << status.policy_source << "'";
    const Policy expected = big_policy(*index);
    const bool x = *index % 2 == 0;

    std::optional<Policy> in_force = dp.current_policy();
    ASSERT_TRUE(in_force.has_value());
    ASSERT_EQ(in_force->identities.size(), expected.identities.size());
    EXPECT_EQ(in_force->identities[0].cidrs, expected.identities[0].cidrs);
    EXPECT_EQ(rules_in_force(dp), std::vector<std::string>{expected.rules[0].name});

    BpfFd hosts = active_inner_map(dp, "bh_ipc_host");
    std::set<std::array<std::uint8_t, 16>> keys;
    for (const auto& [key, value] : dump_map<bh_ipcache_host_key, bh_identity_info>(hosts.get())) {
        std::array<std::uint8_t, 16> bytes{};
        std::memcpy(bytes.data(), key.addr.bytes, bytes.size());
        keys.insert(bytes);
    }
    EXPECT_TRUE(keys == host_keys(expected))
        << "the host table of generation " << status.generation << " holds " << keys.size()
        << " addresses; its policy has " << host_keys(expected).size();
    expect_tables_match_bookkeeping(dp);

    Explanation e = dp.explain(flow_to_dst(kSrc4, 80));
    EXPECT_EQ(e.verdict.kind, x ? VerdictKind::allow : VerdictKind::deny);
    EXPECT_EQ(e.verdict.rule, x ? std::optional<std::string>("x-to-d") : std::nullopt);
    XdpRun run = run_xdp(prog_fd, tcp_frame(80, probe_sport));
    EXPECT_EQ(xdp_action_name(run.retval), e.verdict.passes() ? "pass" : "drop");
}

TEST_F(AtomicityTest, SigkillDuringCommitsLeavesAWholeGenerationInForce)
{
    constexpr int kRounds = 20;
    constexpr std::uint32_t kCycle = 8;  // distinct policies each child cycles through
    const std::uint32_t seed = std::random_device{}();
    RecordProperty("seed", std::to_string(seed));
    SCOPED_TRACE(fmt::format("seed {}", seed));
    std::mt19937 random(seed);

    // two full commits: how long one takes here sets the window for kills
    apply(big_policy(0), big_source(0));
    auto start = std::chrono::steady_clock::now();
    apply(big_policy(1), big_source(1));
    auto commit_time = std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - start);
    RecordProperty("commit_us", std::to_string(commit_time.count()));
    const int prog_fd = xdp();

    std::uint64_t landed = 0;  // rounds in which a child's commit was in force
    for (int round = 0; round < kRounds; round++) {
        SCOPED_TRACE(fmt::format("round {}", round));
        const auto base = static_cast<std::uint32_t>(1000 * (round + 1));
        const std::uint64_t generation_before = current_generation(dp());
        Pipe ready;

        // the child: open, build its policies, say so, then commit in a loop
        ChildProcess child([&] {
            ready.read_end.reset();
            Dataplane own = Dataplane::open(options_);
            std::vector<Policy> cycle;
            for (std::uint32_t k = 0; k < kCycle; k++)
                cycle.push_back(big_policy(base + k));
            char byte = 1;
            ready.write(&byte, 1);
            auto deadline = std::chrono::steady_clock::now() + 60s;
            for (std::uint32_t k = 0; std::chrono::steady_clock::now() < deadline; k++)
                own.apply(cycle[k % kCycle], big_source(base + k % kCycle));
            return 0;
        });
        ready.write_end.reset();
        char byte = 0;
        ASSERT_TRUE(ready.read(&byte, 1, 30000ms)) << "the child did not start";

        // kill it somewhere in its first three commits
        std::uniform_int_distribution<std::int64_t> delay(0, 3 * commit_time.count());
        std::this_thread::sleep_for(std::chrono::microseconds(delay(random)));
        int status = child.kill_and_reap();
        ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
            << "the child ended before it was killed (status " << status << ")";

        landed += current_generation(dp()) > generation_before;
        expect_whole_generation(dp(), prog_fd, static_cast<std::uint16_t>(2000 + round * 2));

        // this process commits on top of whatever the kill left
        const std::uint32_t own_index = base + 500 + static_cast<std::uint32_t>(round % 2);
        ApplyResult r = apply(big_policy(own_index), big_source(own_index));
        EXPECT_EQ(r.generation, current_generation(dp()));
        EXPECT_FALSE(r.unchanged);
        expect_whole_generation(dp(), prog_fd, static_cast<std::uint16_t>(2001 + round * 2));
        if (HasFatalFailure() || HasFailure())
            break;
    }
    RecordProperty("rounds_with_a_child_commit_in_force", std::to_string(landed));
}

// ---------------------------------------------------------------------------
// A pinned map of another layout
// ---------------------------------------------------------------------------

// Every path under `dir`, relative to it.
std::set<std::string> tree(const fs::path& dir)
{
    std::set<std::string> out;
    for (const auto& entry : fs::recursive_directory_iterator(dir))
        out.insert(fs::relative(entry.path(), dir).string());
    return out;
}

TEST_F(AtomicityTest, APinnedMapOfAnotherLayoutIsRefusedAndNothingIsCreated)
{
    const fs::path dir = pin_->path();
    const fs::path old_map = dir / fmt::format("bh_policy_v{}", BH_ABI_VERSION);
    ASSERT_EQ(mkdir(dir.c_str(), 0700), 0) << std::strerror(errno);

    // an array with 8-byte values where this build has an array of maps
    BpfFd map(bpf_map_create(BPF_MAP_TYPE_ARRAY, "bh_policy", sizeof(std::uint32_t),
                             sizeof(std::uint64_t), 2, nullptr));
    ASSERT_GE(map.get(), 0) << std::strerror(errno);
    ASSERT_EQ(bpf_obj_pin(map.get(), old_map.c_str()), 0) << std::strerror(errno);
    bpf_map_info info{};
    __u32 len = sizeof(info);
    ASSERT_EQ(bpf_obj_get_info_by_fd(map.get(), &info, &len), 0);
    const std::set<std::string> before = tree(dir);

    try {
        Dataplane::open(options_);
        ADD_FAILURE() << "open() reused a pinned map of another layout";
    } catch (const Error& e) {
        std::string what = e.what();
        RecordProperty("error", what);
        EXPECT_NE(what.find(old_map.string()), std::string::npos) << what;
        // what to do: remove the old state (or migrate it)
        EXPECT_TRUE(what.find("rm -r") != std::string::npos ||
                    what.find("remove") != std::string::npos)
            << what;
    }

    EXPECT_EQ(tree(dir), before) << "open() created state next to a map it refused";
    BpfFd still(bpf_obj_get(old_map.c_str()));
    ASSERT_GE(still.get(), 0) << "the refused map is gone";
    bpf_map_info now{};
    len = sizeof(now);
    ASSERT_EQ(bpf_obj_get_info_by_fd(still.get(), &now, &len), 0);
    EXPECT_EQ(now.id, info.id) << "the refused map was replaced";
}

// ---------------------------------------------------------------------------
// Concurrent commits
// ---------------------------------------------------------------------------

// What a child reports of each commit it made.
struct CommitRecord {
    std::uint64_t generation = 0;
    char source[24] = {};
};

// Policy `i` of process `who`: A reaches D on a port of its own, by a rule
// named after both; all 100 differ.
std::string distinct_policy(int who, int i)
{
    return yaml_policy(
        {identity("a", {fmt::format("{}/32", kSrc4)})},
        {rule(fmt::format("p{}-{}", who, i), "a", fmt::format("tcp/{}", 10000 + who * 100 + i))});
}

TEST_F(AtomicityTest, ConcurrentCommitsOfTwoProcessesAllLand)
{
    constexpr int kPerProcess = 50;
    Pipe records;
    Pipe go;

    // both open the new pin directory at once too, then race their commits
    std::vector<std::unique_ptr<ChildProcess>> children;
    for (int who = 0; who < 2; who++) {
        children.push_back(std::make_unique<ChildProcess>([&, who] {
            records.read_end.reset();
            go.write_end.reset();
            char byte = 0;
            if (!go.read(&byte, 1, 30000ms))
                return 3;
            Dataplane own = Dataplane::open(options_);
            for (int i = 0; i < kPerProcess; i++) {
                std::string source = fmt::format("p{}-{}", who, i);
                ApplyResult r = own.apply(parse(distinct_policy(who, i)), source);
                CommitRecord record{r.generation, {}};
                std::memcpy(record.source, source.data(), source.size());
                records.write(&record, sizeof(record));
            }
            return 0;
        }));
    }
    records.write_end.reset();
    go.read_end.reset();
    const char start[2] = {1, 1};  // one byte each: both start
    go.write(start, sizeof(start));
    go.write_end.reset();

    for (auto& child : children)
        EXPECT_EQ(child->wait(120s), 0) << "a child failed; see its stderr";
    std::map<std::uint64_t, std::string> by_generation;
    CommitRecord record;
    int count = 0;
    while (records.read(&record, sizeof(record), 1000ms)) {
        count++;
        auto [it, fresh] = by_generation.emplace(record.generation, record.source);
        EXPECT_TRUE(fresh) << "generation " << record.generation << " committed by both "
                           << it->second << " and " << record.source;
    }
    ASSERT_EQ(count, 2 * kPerProcess);

    // generations 1..100, each once: no commit lost or merged into another
    ASSERT_EQ(by_generation.size(), 2u * kPerProcess);
    EXPECT_EQ(by_generation.begin()->first, 1u);
    EXPECT_EQ(by_generation.rbegin()->first, 2u * kPerProcess);
    EXPECT_EQ(current_generation(dp()), 2u * kPerProcess);
    int turns = 0;  // how often the lock went to the other process
    for (auto it = std::next(by_generation.begin()); it != by_generation.end(); ++it)
        turns += it->second[1] != std::prev(it)->second[1];
    RecordProperty("turns", std::to_string(turns));

    // the generation in force is the last commit, whole
    const std::string& last = by_generation.rbegin()->second;
    Status status = dp().status();
    EXPECT_EQ(status.generation, 2u * kPerProcess);
    EXPECT_EQ(status.policy_source, last);
    EXPECT_EQ(rules_in_force(dp()), std::vector<std::string>{last});
    expect_tables_match_bookkeeping(dp());
    int who = last[1] - '0';
    int i = std::stoi(last.substr(3));
    auto port = static_cast<std::uint16_t>(10000 + who * 100 + i);
    EXPECT_EQ(dp().explain(flow_to_dst(kSrc4, port)).verdict.rule, last);
    EXPECT_EQ(xdp_action_name(run_xdp(xdp(), tcp_frame(port, 3000)).retval), "pass");
}

}  // namespace
}  // namespace bulkhead::test
