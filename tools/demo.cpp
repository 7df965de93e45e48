// `bulkhead demo`: a LAN of network namespaces, XDP on the servers,
// examples/demo-policy.yaml applied, real TCP, UDP and ICMP traffic, and a
// table of expected against observed outcomes. See DESIGN.md "The demo".
#include "cli.hpp"
#include "demo_policy.hpp"  // generated: kDemoPolicy, the YAML text
#include "netlab.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <future>
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

const char* kPhaseNames[] = {"TCP", "UDP", "ICMP"};

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
        lab.tcp_servers.push_back(nl::tcp_listen(*db.ns, db.addr(v6), 5432));
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

    fmt::print("bulkhead demo: a LAN of network namespaces, XDP on the servers\n\n");
    fmt::print("workloads:\n");
    build_lab(lab);
    start_services(lab);

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
    fmt::print("\n");

    std::vector<DemoFlow> flows = demo_flows();
    std::vector<Row> rows;
    bool all_ok = true;
    for (int phase = 0; phase < 3; ++phase) {
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

        bool phase_ok = true;
        for (auto& [f, future] : running) {
            Explanation e = dp.explain(explain_flow(lab, *f));
            Row row;
            row.flow = flow_label(*f);
            row.expected = fmt::format("{}: {}", verdict_label(f->verdict, f->rule), f->expected);
            row.observed = fmt::format("{}: {}", verdict_label(e.verdict.kind, e.verdict.rule),
                                       future.get());
            row.ok = row.observed == row.expected;
            phase_ok = phase_ok && row.ok;
            rows.push_back(std::move(row));
        }
        all_ok = all_ok && phase_ok;
        if (!phase_ok && !options.keep_going && phase < 2) {
            fmt::print("unexpected outcome in the {} phase; stopping (--keep-going runs every "
                       "phase)\n", kPhaseNames[phase]);
            break;
        }
    }

    fmt::print("\n");
    print_table(rows);
    fmt::print("\ncounters (packets that reached XDP on web0, db0, metrics0):\n");
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
