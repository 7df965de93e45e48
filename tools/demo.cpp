// `bulkhead demo`: a LAN of network namespaces, XDP on the servers, the
// cgroup hooks on a process identified by its cgroup,
// examples/demo-policy.yaml applied, real TCP, UDP and ICMP traffic, and a
// table of expected against observed outcomes. See DESIGN.md "The demo".
#include "cli.hpp"
#include "demo_policy.hpp"  // generated: kDemoPolicy, the YAML text
#include "netlab.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace bulkhead::cli {

namespace {

using namespace std::chrono_literals;
namespace nl = netlab;

// How long a flow that policy drops is given before it counts as dropped.
constexpr auto kConnectTimeout = 1000ms;
constexpr auto kUdpWait = 700ms;
constexpr int kUdpDatagrams = 3;

// One workload: a namespace with one interface on the demo LAN.
struct Host {
    std::string name;    // the identity's name in demo-policy.yaml
    std::string ifname;  // its interface, unique across the lab (pinned link names)
    std::string v4;
    std::string v6;
    std::unique_ptr<nl::NetNs> ns;

    const std::string& addr(bool v6_flow) const { return v6_flow ? v6 : v4; }
};

enum class Kind { tcp, udp, ping };

// One row of the table: what to send, and what demo-policy.yaml says must
// happen to it.
struct DemoFlow {
    int phase;  // flows of one phase run at the same time
    std::string from;
    std::string to;
    Kind kind;
    std::uint16_t port;  // tcp and udp
    bool v6;
    VerdictKind verdict;            // what explain must say
    std::optional<std::string> rule;
    std::string expected;           // the outcome on the wire
};

const char* kPhaseNames[] = {"TCP", "UDP", "ICMP", "cgroup"};
constexpr int kAgentPhase = 3;

// The agent's cgroup as examples/demo-policy.yaml lists it (relative to the
// cgroup v2 mount). Each run puts its process in a child cgroup of its own
// and attaches there, so that two demos never share an attachment; the child
// inherits the agent identity from this, its nearest listed ancestor.
constexpr const char* kAgentCgroup = "/bulkhead-demo/agent";
constexpr std::uint16_t kAgentListenPort = 7000;
constexpr std::string_view kAgentRequest = "SELECT 1;\n";  // db echoes it back

// The flows, phase by phase. Keep in sync with examples/demo-policy.yaml.
std::vector<DemoFlow> demo_flows() {
    using V = VerdictKind;
    const std::optional<std::string> deflt;  // no rule: the identity's mode decided
    return {
        {0, "frontend", "db", Kind::tcp, 5432, false, V::allow, "frontend-to-db", "connected"},
        {0, "frontend", "db", Kind::tcp, 5432, true, V::allow, "frontend-to-db", "connected"},
        {0, "intruder", "db", Kind::tcp, 5432, false, V::deny, "partner-no-db", "timeout"},
        {0, "intruder", "db", Kind::tcp, 5432, true, V::deny, "partner-no-db", "timeout"},
        {0, "frontend", "web", Kind::tcp, 80, false, V::allow, "web-http", "connected"},
        {0, "intruder", "web", Kind::tcp, 80, true, V::allow, "web-http", "connected"},
        {0, "frontend", "web", Kind::tcp, 8080, false, V::deny, deflt, "timeout"},
        {0, "intruder", "web", Kind::tcp, 8080, true, V::deny, deflt, "timeout"},
        {0, "frontend", "metrics", Kind::tcp, 9100, false, V::allow, "frontend-scrapes-metrics",
         "connected"},
        {0, "intruder", "metrics", Kind::tcp, 9100, false, V::audit, deflt, "connected"},
        {1, "frontend", "db", Kind::udp, 5000, false, V::allow, "frontend-logs", "delivered"},
        {1, "frontend", "db", Kind::udp, 5000, true, V::allow, "frontend-logs", "delivered"},
        {1, "intruder", "db", Kind::udp, 5000, false, V::deny, deflt, "dropped"},
        {2, "frontend", "web", Kind::ping, 0, false, V::allow, "frontend-ping", "reply"},
        {2, "frontend", "db", Kind::ping, 0, true, V::allow, "frontend-ping", "reply"},
        {2, "intruder", "web", Kind::ping, 0, false, V::deny, deflt, "no reply"},
        {2, "intruder", "metrics", Kind::ping, 0, true, V::audit, deflt, "reply"},
    };
}

// One flow of the agent: a process in frontend's namespace whose identity
// comes from its cgroup. explain() judges addresses, and the agent shares
// frontend's, so these rows compare outcomes only; which hook decides is in
// the comments.
enum class AgentKind {
    request,  // connect() from the agent, a request, the server's reply
    connect,  // connect() from the agent
    sendto,   // one unconnected UDP datagram from the agent
    inbound,  // a connection from `peer` to a listener of the agent
};

struct AgentFlow {
    AgentKind kind;
    std::string peer;
    std::uint16_t port;
    bool v6;
    std::string expected;
};

// Keep in sync with the agent and agent-to-db in examples/demo-policy.yaml.
std::vector<AgentFlow> agent_flows() {
    using K = AgentKind;
    return {
        // connect4/6 and cgroup_skb egress: agent-to-db; db's XDP sees
        // frontend's address (frontend-to-db); db's SYN-ACK and its answer
        // pass the agent's enforcing ingress only because the flow is tracked
        {K::request, "db", 5432, false, "answered, replies tracked"},
        {K::request, "db", 5432, true, "answered, replies tracked"},
        // connect4/6: no rule lets agent out there; its egress enforces.
        // frontend, from the same namespace and address, gets through to
        // metrics, and times out at web's XDP on 8080.
        {K::connect, "metrics", 9100, false, "EPERM"},
        {K::connect, "web", 8080, true, "EPERM"},
        // sendmsg4/6: frontend-logs is frontend's, not agent's
        {K::sendto, "db", 5000, false, "EPERM"},
        {K::sendto, "db", 5000, true, "EPERM"},
        // cgroup_skb ingress: nothing allows db -> agent, and this is no reply
        {K::inbound, "db", kAgentListenPort, false, "timeout"},
    };
}

std::string agent_flow_label(const AgentFlow& f) {
    const char* family = f.v6 ? "IPv6" : "IPv4";
    switch (f.kind) {
    case AgentKind::request:
    case AgentKind::connect: return fmt::format("agent -> {} tcp/{} {}", f.peer, f.port, family);
    case AgentKind::sendto: return fmt::format("agent -> {} udp/{} {}", f.peer, f.port, family);
    case AgentKind::inbound: return fmt::format("{} -> agent tcp/{} {}", f.peer, f.port, family);
    }
    return "?";
}

std::string flow_label(const DemoFlow& f) {
    std::string what = f.kind == Kind::tcp   ? fmt::format("tcp/{}", f.port)
                       : f.kind == Kind::udp ? fmt::format("udp/{}", f.port)
                                             : std::string("ping");
    return fmt::format("{} -> {} {} {}", f.from, f.to, what, f.v6 ? "IPv6" : "IPv4");
}

std::string verdict_label(VerdictKind kind, const std::optional<std::string>& rule) {
    return fmt::format("{} {}", verdict_word(kind), rule ? *rule : "(default)");
}

// Everything the lab is made of. Members are destroyed in reverse order:
// sockets first, then namespaces (which takes the veths and XDP links with
// them), then the pinned state.
struct Lab {
    std::filesystem::path pin_dir;
    std::uint64_t pin_cleanup = 0;
    std::unique_ptr<nl::Cgroup> agent_cgroup;  // removed after the pinned state and its links
    std::vector<Host> hosts;
    std::unique_ptr<nl::Lan> lan;
    std::vector<std::unique_ptr<nl::TcpServer>> tcp_servers;
    std::vector<std::unique_ptr<nl::UdpReceiver>> udp_receivers;

    Lab() = default;
    Lab(const Lab&) = delete;
    Lab& operator=(const Lab&) = delete;

    ~Lab() {
        tcp_servers.clear();
        udp_receivers.clear();
        hosts.clear();
        lan.reset();
        nl::remove_cleanup(pin_cleanup);
        try {
            Dataplane::destroy(pin_dir);
        } catch (const std::exception& e) {
            fmt::print(stderr, "bulkhead: cannot remove the demo's pinned state: {}\n", e.what());
        }
        agent_cgroup.reset();
    }

    const Host& host(const std::string& name) const {
        for (const auto& h : hosts) {
            if (h.name == name) return h;
        }
        throw Error(fmt::format("demo: no host '{}'", name));  // a bug in demo_flows()
    }

    // The UDP receivers are both on db, IPv4 first: see start_services().
    const nl::UdpReceiver& udp_receiver(bool v6) const { return *udp_receivers.at(v6 ? 1 : 0); }
};

void build_lab(Lab& lab) {
    // The addresses of examples/demo-policy.yaml.
    const char* table[][4] = {
        {"web", "web0", "198.51.100.10", "2001:db8::10"},
        {"db", "db0", "198.51.100.11", "2001:db8::11"},
        {"metrics", "metrics0", "198.51.100.40", "2001:db8::40"},
        {"frontend", "frontend0", "198.51.100.20", "2001:db8::20"},
        {"intruder", "intruder0", "203.0.113.30", "2001:db8:1::30"},
    };
    lab.lan = std::make_unique<nl::Lan>("demo-lan");

    for (const auto& row : table) {
        Host& h = lab.hosts.emplace_back(Host{row[0], row[1], row[2], row[3], nullptr});
        h.ns = std::make_unique<nl::NetNs>(h.name);
        bool partner = h.name == "intruder";
        lab.lan->join(*h.ns, h.ifname, {h.v4 + "/24", h.v6 + "/64"});

        // Two subnets share the LAN: reach the other one on-link.
        nl::add_route(*h.ns, partner ? "198.51.100.0/24" : "203.0.113.0/24", h.ifname);
        nl::add_route(*h.ns, partner ? "2001:db8::/64" : "2001:db8:1::/64", h.ifname);
        fmt::print("  {:<9} {:<14} {:<15} netns {}\n", h.name, h.v4, h.v6, h.ns->name());
    }
}

void start_services(Lab& lab) {
    const Host& web = lab.host("web");
    const Host& db = lab.host("db");
    const Host& metrics = lab.host("metrics");
    for (bool v6 : {false, true}) {
        lab.tcp_servers.push_back(nl::tcp_listen(*web.ns, web.addr(v6), 80));
        lab.tcp_servers.push_back(nl::tcp_listen(*web.ns, web.addr(v6), 8080));
        lab.tcp_servers.push_back(nl::tcp_listen(*db.ns, db.addr(v6), 5432, true));  // echo
        lab.tcp_servers.push_back(nl::tcp_listen(*metrics.ns, metrics.addr(v6), 9100));
        lab.udp_receivers.push_back(std::make_unique<nl::UdpReceiver>(*db.ns, db.addr(v6), 5000));
    }
}

// Runs one flow and reports what happened on the wire.
std::string observe(const Lab& lab, const DemoFlow& f) {
    const Host& from = lab.host(f.from);
    const Host& to = lab.host(f.to);
    const std::string& dst = to.addr(f.v6);

    switch (f.kind) {
    case Kind::tcp:
        return std::string(to_string(nl::tcp_connect(*from.ns, from.addr(f.v6), dst, f.port,
                                                     kConnectTimeout)));
    case Kind::udp: {
        const nl::UdpReceiver& rx = lab.udp_receiver(f.v6);
        int sent = nl::udp_send(*from.ns, from.addr(f.v6), dst, f.port, kUdpDatagrams);
        if (sent != kUdpDatagrams) return fmt::format("sent {} of {}", sent, kUdpDatagrams);
        if (rx.wait_for(kUdpDatagrams, kUdpWait, from.addr(f.v6))) return "delivered";
        std::uint64_t got = rx.received_from(from.addr(f.v6));
        return got == 0 ? "dropped" : fmt::format("{} of {} delivered", got, kUdpDatagrams);
    }
    case Kind::ping:
        return nl::ping(*from.ns, dst, kConnectTimeout) ? "reply" : "no reply";
    }
    return "?";
}

// The flow as explain() takes it.
Flow explain_flow(const Lab& lab, const DemoFlow& f) {
    Flow flow;
    flow.src = *IpAddr::parse(lab.host(f.from).addr(f.v6));
    flow.dst = *IpAddr::parse(lab.host(f.to).addr(f.v6));
    switch (f.kind) {
    case Kind::tcp: flow.proto = 6; flow.port = f.port; break;
    case Kind::udp: flow.proto = 17; flow.port = f.port; break;
    case Kind::ping:
        flow.proto = f.v6 ? 58 : 1;
        flow.port = f.v6 ? 128 << 8 : 8 << 8;  // echo request, code 0
        break;
    }
    return flow;
}

// Expected and observed both read "VERDICT RULE: OUTCOME": the verdict and
// deciding rule that explain() computes from the tables in force, and what
// happened on the wire.
struct Row {
    std::string flow;
    std::string expected;
    std::string observed;
    bool ok = false;
};

void print_table(const std::vector<Row>& rows) {
    std::size_t w_flow = 4, w_expected = 8, w_observed = 8;
    for (const auto& r : rows) {
        w_flow = std::max(w_flow, r.flow.size());
        w_expected = std::max(w_expected, r.expected.size());
        w_observed = std::max(w_observed, r.observed.size());
    }
    fmt::print("  {:<{}} | {:<{}} | {:<{}} | {}\n", "flow", w_flow, "expected", w_expected,
               "observed", w_observed, "ok");
    fmt::print("  {:-<{}}-+-{:-<{}}-+-{:-<{}}-+---\n", "", w_flow, "", w_expected, "", w_observed);
    for (const auto& r : rows) {
        fmt::print("  {:<{}} | {:<{}} | {:<{}} | {}\n", r.flow, w_flow, r.expected, w_expected,
                   r.observed, w_observed, r.ok ? "yes" : "NO");
    }
}

// Runs the flows of one phase at the same time and adds their rows; true if
// every outcome matched.
bool run_phase(const Lab& lab, const Dataplane& dp, const std::vector<DemoFlow>& flows,
               int phase, std::vector<Row>& rows) {
    std::vector<std::pair<const DemoFlow*, std::future<std::string>>> running;
    for (const auto& f : flows) {
        if (f.phase != phase) continue;
        running.emplace_back(&f, std::async(std::launch::async, [&lab, &f] {
            try {
                return observe(lab, f);
            } catch (const std::exception& e) {
                return fmt::format("error: {}", e.what());
            }
        }));
    }
    fmt::print("{}: {} flows at once\n", kPhaseNames[phase], running.size());

    bool ok = true;
    for (auto& [f, future] : running) {
        Explanation e = dp.explain(explain_flow(lab, *f));
        Row row;
        row.flow = flow_label(*f);
        row.expected = fmt::format("{}: {}", verdict_label(f->verdict, f->rule), f->expected);
        row.observed =
            fmt::format("{}: {}", verdict_label(e.verdict.kind, e.verdict.rule), future.get());
        row.ok = row.observed == row.expected;
        ok = ok && row.ok;
        rows.push_back(std::move(row));
    }
    return ok;
}

// The agent's cgroup: a child of kAgentCgroup made for this run.
std::unique_ptr<nl::Cgroup> make_agent_cgroup() {
    std::filesystem::path listed = resolve_cgroup_path(kAgentCgroup);
    auto cgroup = std::make_unique<nl::Cgroup>(
        "agent", std::filesystem::path(kAgentCgroup).relative_path());
    if (cgroup->path().parent_path() != listed) {
        throw Error(fmt::format("demo: made the agent's cgroup under {}, but the policy's {} is "
                                "{} here; the machine has more than one cgroup v2 mount",
                                cgroup->path().parent_path().string(), kAgentCgroup,
                                listed.string()));
    }
    return cgroup;
}

// A connection from the peer to a listener the agent opened: the listener's
// socket belongs to the agent's cgroup, so its ingress hook judges the SYN.
std::string observe_inbound(const Lab& lab, const AgentFlow& f) {
    const Host& frontend = lab.host("frontend");
    const std::string& addr = frontend.addr(f.v6);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) < 0) throw Error("demo: cannot create a pipe", errno);
    nl::Fd ready_r(fds[0]), ready_w(fds[1]);

    // the listener waits a little longer than the connection attempt
    auto wait = kConnectTimeout + 500ms;
    auto listener = std::async(std::launch::async, [&] {
        return nl::run_in_cgroup(*lab.agent_cgroup, [&] {
            return nl::tcp_accept_once(addr, f.port, ready_w.get(), wait) ? 0 : 1;
        }, frontend.ns.get());
    });
    pollfd ready = {ready_r.get(), POLLIN, 0};
    if (::poll(&ready, 1, 3000) != 1) {
        listener.get();  // throws if the child failed
        return "the agent's listener did not start";
    }
    nl::ConnectResult result = nl::tcp_connect(*lab.host(f.peer).ns, addr, f.port, kConnectTimeout);
    bool accepted = listener.get() == 0;
    return fmt::format("{}{}", to_string(result), accepted ? ", accepted" : "");
}

// Runs one agent flow from a child process in the agent's cgroup.
std::string observe_agent(const Lab& lab, const AgentFlow& f) {
    const Host& frontend = lab.host("frontend");
    const std::string& dst = lab.host(f.peer).addr(f.v6);
    int rc = 0;

    switch (f.kind) {
    case AgentKind::request:
        // the child's exit status: the ConnectResult, or 100 + whether the
        // server's answer came back
        rc = nl::run_in_cgroup(*lab.agent_cgroup, [&] {
            nl::RequestResult r = nl::tcp_request(*frontend.ns, dst, f.port, kAgentRequest,
                                                  kConnectTimeout);
            if (r.connect != nl::ConnectResult::connected) return static_cast<int>(r.connect);
            return 100 + (r.reply == kAgentRequest ? 1 : 0);
        }, frontend.ns.get());
        if (rc == 101) return "answered";
        if (rc == 100) return "connected, no answer";
        if (rc > static_cast<int>(nl::ConnectResult::unreachable)) return "error in the agent";
        return std::string(to_string(static_cast<nl::ConnectResult>(rc)));
    case AgentKind::connect:
        rc = nl::run_in_cgroup(*lab.agent_cgroup, [&] {
            return static_cast<int>(nl::tcp_connect(*frontend.ns, dst, f.port, kConnectTimeout));
        }, frontend.ns.get());
        if (rc > static_cast<int>(nl::ConnectResult::unreachable)) return "error in the agent";
        return std::string(to_string(static_cast<nl::ConnectResult>(rc)));
    case AgentKind::sendto:
        rc = nl::run_in_cgroup(*lab.agent_cgroup, [&] {
            return nl::udp_send(*frontend.ns, std::nullopt, dst, f.port, 1);
        }, frontend.ns.get());
        return rc == 0 ? "EPERM" : rc == 1 ? "sent" : "error in the agent";
    case AgentKind::inbound:
        return observe_inbound(lab, f);
    }
    return "?";
}

// Counter changes between two readings: reasons, then rules, non-zero only.
std::vector<std::pair<std::string, std::uint64_t>> moved(const Stats& before, const Stats& after) {
    std::map<std::string, std::uint64_t> was;
    for (const auto& [name, c] : before.reasons) was[name] = c.packets;
    for (const auto& r : before.rules) was["rule " + r.name] = r.counter.packets;

    std::vector<std::pair<std::string, std::uint64_t>> out;
    auto note = [&](const std::string& name, std::uint64_t now) {
        if (now > was[name]) out.emplace_back(name, now - was[name]);
    };
    for (const auto& [name, c] : after.reasons) note(name, c.packets);
    for (const auto& r : after.rules) note("rule " + r.name, r.counter.packets);
    return out;
}

std::uint64_t moved_by(const std::vector<std::pair<std::string, std::uint64_t>>& deltas,
                       std::string_view name) {
    for (const auto& [n, d] : deltas) {
        if (n == name) return d;
    }
    return 0;
}

// The agent's flows, one at a time so that the counters each one moves are
// its own; adds their rows and prints what the counters did. True if every
// outcome matched.
bool run_agent_phase(const Lab& lab, const Dataplane& dp, std::vector<Row>& rows) {
    std::vector<AgentFlow> flows = agent_flows();
    fmt::print("{}: {} flows of agent, one at a time\n", kPhaseNames[kAgentPhase], flows.size());

    Stats first = dp.stats();
    bool ok = true;
    for (const auto& f : flows) {
        Stats before = dp.stats();
        std::string observed;
        try {
            observed = observe_agent(lab, f);
        } catch (const std::exception& e) {
            observed = fmt::format("error: {}", e.what());
        }
        // its ingress enforces and no rule lets db in: the replies got
        // through only as tracked traffic, and the counter says so
        if (f.kind == AgentKind::request && observed == "answered") {
            bool tracked = moved_by(moved(before, dp.stats()), "tracked") > 0;
            observed += tracked ? ", replies tracked" : ", replies NOT counted as tracked";
        }

        Row row{agent_flow_label(f), f.expected, observed, observed == f.expected};
        ok = ok && row.ok;
        rows.push_back(std::move(row));
    }

    std::vector<std::string> reasons, rules;
    for (const auto& [name, delta] : moved(first, dp.stats())) {
        bool rule = name.rfind("rule ", 0) == 0;
        (rule ? rules : reasons).push_back(fmt::format("{} +{}", rule ? name.substr(5) : name,
                                                        delta));
    }
    fmt::print("  counters moved meanwhile: {}; rules: {}\n", fmt::join(reasons, ", "),
               fmt::join(rules, ", "));
    return ok;
}

}  // namespace

int run_demo(const DemoOptions& options) {
    // Before any thread starts, so every thread inherits the blocked signals
    // and only the cleanup thread receives them.
    nl::install_signal_cleanup();
    auto started = std::chrono::steady_clock::now();

    Policy policy = Policy::parse(kDemoPolicy, "examples/demo-policy.yaml");
    for (const auto& warning : policy.warnings) fmt::print(stderr, "{}\n", warning);

    Lab lab;
    lab.pin_dir = fmt::format("/sys/fs/bpf/bulkhead-demo-{}", ::getpid());
    lab.pin_cleanup = nl::add_cleanup([dir = lab.pin_dir] { Dataplane::destroy(dir); });

    fmt::print("bulkhead demo: a LAN of network namespaces, XDP on the servers, cgroup hooks "
               "on a process\n\n");
    fmt::print("workloads:\n");
    build_lab(lab);
    start_services(lab);
    lab.agent_cgroup = make_agent_cgroup();  // before the apply: it registers existing cgroups
    fmt::print("  {:<9} {:<30} cgroup {} (in frontend's namespace)\n", "agent",
               "(frontend's addresses)", lab.agent_cgroup->path().string());

    Options dp_options;
    dp_options.pin_dir = lab.pin_dir;
    dp_options.host_addresses = std::vector<Prefix>{};  // the lab has no `host`: keep ours out
    Dataplane dp = Dataplane::open(dp_options);
    ApplyResult applied = dp.apply(policy, "examples/demo-policy.yaml");
    fmt::print("\napplied examples/demo-policy.yaml as generation {} ({} identities, {} rules), "
               "pinned under {}\n", applied.generation, policy.identities.size(),
               policy.rules.size(), lab.pin_dir.string());

    for (const char* server : {"web", "db", "metrics"}) {
        const Host& h = lab.host(server);
        // The library attaches in the calling thread's network namespace.
        Attachment a = nl::run_in_netns(*h.ns, [&] { return dp.attach_xdp(h.ifname); });
        fmt::print("attached XDP to {} in {} ({} mode)\n", a.interface, h.ns->name(), a.mode);
    }
    Attachment hooks = dp.attach_cgroup(lab.agent_cgroup->path());
    fmt::print("attached the cgroup hooks to {} ({}); it is agent by its ancestor {}\n",
               hooks.interface, hooks.mode, kAgentCgroup);
    fmt::print("\n");

    std::vector<DemoFlow> flows = demo_flows();
    std::vector<Row> rows;
    bool all_ok = true;
    for (int phase = 0; phase <= kAgentPhase; ++phase) {
        bool phase_ok = phase == kAgentPhase ? run_agent_phase(lab, dp, rows)
                                             : run_phase(lab, dp, flows, phase, rows);
        all_ok = all_ok && phase_ok;
        if (!phase_ok && !options.keep_going && phase < kAgentPhase) {
            fmt::print("unexpected outcome in the {} phase; stopping (--keep-going runs every "
                       "phase)\n", kPhaseNames[phase]);
            break;
        }
    }

    fmt::print("\n");
    print_table(rows);
    fmt::print("\nagent rows compare outcomes only: explain judges addresses, and agent has "
               "frontend's.\n");
    fmt::print("\ncounters (XDP on web0, db0, metrics0; the agent's cgroup hooks, connect and "
               "sendmsg with 0 bytes):\n");
    print_stats(stdout, dp.stats(), true);

    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started);
    std::size_t failed = static_cast<std::size_t>(
        std::count_if(rows.begin(), rows.end(), [](const Row& r) { return !r.ok; }));
    if (all_ok) {
        fmt::print("\nall {} flows behaved as the policy says ({:.1f} s); removing the lab\n",
                   rows.size(), seconds.count());
    } else {
        fmt::print("\n{} of {} flows did NOT behave as expected ({:.1f} s); removing the lab\n",
                   failed, rows.size(), seconds.count());
    }
    return all_ok ? 0 : 1;
}

}  // namespace bulkhead::cli
