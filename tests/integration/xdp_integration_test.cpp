// XDP on a real interface: two network namespaces joined by a veth pair, the
// program on the server's end, real sockets on both sides. Run in native and
// in generic mode.
//
// Nothing here touches the root namespace's interfaces: the pair is created
// inside the namespaces (netlab), and the program is attached from a thread
// that has entered the server's namespace.
#include "support/bpf_env.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include "netlab.hpp"

#include <chrono>
#include <optional>
#include <set>
#include <ostream>
#include <memory>
#include <string>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

using namespace std::chrono_literals;
using netlab::ConnectResult;

constexpr const char* kClient4 = "198.51.100.1";
constexpr const char* kServer4 = "198.51.100.2";
constexpr const char* kClient6 = "2001:db8::1";
constexpr const char* kServer6 = "2001:db8::2";
constexpr std::uint16_t kAllowedTcp = 8080;
constexpr std::uint16_t kDeniedTcp = 9090;
constexpr std::uint16_t kAllowedUdp = 6000;
constexpr std::uint16_t kDeniedUdp = 7000;

// Everything enforces by default, so neighbour discovery must pass on its
// own for IPv6 to work at all (field case I3, end to end).
constexpr const char* kPolicy = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
failsafe: {enabled: false}
identities:
  - {name: client, labels: {app: client}, cidrs: [198.51.100.1/32, "2001:db8::1/128"]}
  - {name: server, labels: {app: server}, cidrs: [198.51.100.2/32, "2001:db8::2/128"],
     ingress: enforce}
rules:
  - {name: client-tcp, from: {app: client}, to: {app: server}, ports: [tcp/8080], action: allow}
  - {name: client-udp, from: {app: client}, to: {app: server}, ports: [udp/6000], action: allow}
  - {name: no-udp-7000, from: any, to: {app: server}, ports: [udp/7000], action: deny}
  - {name: client-ping, from: {app: client}, to: {app: server}, ports: [icmp/8, icmpv6/128],
     action: allow}
)";

std::uint64_t packets(const Stats& stats, const std::string& reason)
{
    for (const auto& [name, counter] : stats.reasons) {
        if (name == reason)
            return counter.packets;
    }
    return 0;
}

std::uint64_t rule_packets(const Stats& stats, const std::string& rule)
{
    for (const RuleCounter& r : stats.rules) {
        if (r.name == rule)
            return r.counter.packets;
    }
    return 0;
}

// Stats once the counters have stopped moving (a closed connection's last
// ACK arrives after connect() returned), waiting at most two seconds.
Stats settled_stats(const Dataplane& dp)
{
    auto total = [](const Stats& s) {
        std::uint64_t sum = 0;
        for (const auto& [name, counter] : s.reasons)
            sum += counter.packets;
        return sum;
    };
    Stats last = dp.stats();
    for (int i = 0; i < 10; i++) {
        std::this_thread::sleep_for(200ms);
        Stats now = dp.stats();
        if (total(now) == total(last))
            return now;
        last = std::move(now);
    }
    return last;
}

class XdpIntegration : public ::testing::TestWithParam<XdpMode> {
protected:
    void SetUp() override
    {
        if (auto why = bpf_skip_reason())
            GTEST_SKIP() << *why;

        pin_ = std::make_unique<ScopedPinDir>();
        client_ = std::make_unique<netlab::NetNs>("xdp-cli");
        server_ = std::make_unique<netlab::NetNs>("xdp-srv");
        veth_ = std::make_unique<netlab::VethPair>(*client_, "veth-c", *server_, "veth-s");
        netlab::add_address(*client_, "veth-c", std::string(kClient4) + "/24");
        netlab::add_address(*server_, "veth-s", std::string(kServer4) + "/24");
        netlab::add_address(*client_, "veth-c", std::string(kClient6) + "/64");
        netlab::add_address(*server_, "veth-s", std::string(kServer6) + "/64");

        dp_ = std::make_unique<Dataplane>(Dataplane::open(test_options(pin_->path())));
        dp_->apply(Policy::parse(kPolicy, "<integration>"), "<integration>");
        attachment_ = attach_in_server(GetParam());
    }

    void TearDown() override
    {
        // the namespaces go first (and the veth with them), then the pins
        veth_.reset();
        server_.reset();
        client_.reset();
        dp_.reset();
        pin_.reset();
    }

    // Runs fn() on a thread inside the server's namespace; the test's own
    // thread never leaves the root namespace.
    template <typename Fn>
    auto in_server(Fn&& fn) -> decltype(fn())
    {
        std::optional<decltype(fn())> out;
        std::exception_ptr failure;
        std::thread worker([&] {
            try {
                out = netlab::run_in_netns(*server_, fn);
            } catch (...) {
                failure = std::current_exception();
            }
        });
        worker.join();
        if (failure)
            std::rethrow_exception(failure);
        return std::move(*out);
    }

    // Attaches XDP to the server's veth from a thread inside its namespace.
    Attachment attach_in_server(XdpMode mode, const std::string& interface = "veth-s")
    {
        return in_server([&] { return dp_->attach_xdp(interface, mode); });
    }

    std::unique_ptr<ScopedPinDir> pin_;
    std::unique_ptr<netlab::NetNs> client_;
    std::unique_ptr<netlab::NetNs> server_;
    std::unique_ptr<netlab::VethPair> veth_;
    std::unique_ptr<Dataplane> dp_;
    Attachment attachment_;
};

TEST_P(XdpIntegration, AttachesInTheRequestedMode)
{
    EXPECT_EQ(attachment_.hook, "xdp");
    EXPECT_EQ(attachment_.interface, "veth-s");
    EXPECT_EQ(attachment_.mode, to_string(GetParam()));
    EXPECT_NE(attachment_.ifindex, 0u);
    EXPECT_FALSE(attachment_.defunct);

    Status status = dp_->status();
    ASSERT_EQ(status.attachments.size(), 1u);
    EXPECT_EQ(status.attachments.front().interface, "veth-s");
}

// Pin names are files in bpffs, which refuses '.' in a name; interface
// names may hold dots ("eth0.100" is the usual name of a VLAN interface).
TEST_P(XdpIntegration, InterfaceNamesWithDotsAttachAndDetach)
{
    netlab::VethPair dotted(*client_, "vc.1", *server_, "vs.1");
    netlab::VethPair escaped(*client_, "v.c..2", *server_, "v.s..2");

    Attachment a = attach_in_server(GetParam(), "vs.1");
    Attachment b = attach_in_server(GetParam(), "v.s..2");
    EXPECT_EQ(a.interface, "vs.1");
    EXPECT_EQ(b.interface, "v.s..2");
    EXPECT_NE(a.ifindex, b.ifindex);

    auto names = [&] {
        std::set<std::string> out;
        for (const Attachment& at : dp_->status().attachments)
            out.insert(at.interface);
        return out;
    };
    EXPECT_EQ(names(), (std::set<std::string>{"veth-s", "vs.1", "v.s..2"}));

    in_server([&] {
        dp_->detach_xdp("vs.1");
        return 0;
    });
    EXPECT_EQ(names(), (std::set<std::string>{"veth-s", "v.s..2"}));
    in_server([&] {
        dp_->detach_xdp("v.s..2");
        return 0;
    });
    EXPECT_EQ(names(), (std::set<std::string>{"veth-s"}));
}

TEST_P(XdpIntegration, AllowedTcpConnectsAndDeniedTcpTimesOut)
{
    netlab::TcpServer allowed(*server_, kServer4, kAllowedTcp);
    netlab::TcpServer denied(*server_, kServer4, kDeniedTcp);

    Stats before = dp_->stats();
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp), ConnectResult::connected);
    Stats after_allowed = settled_stats(*dp_);
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kDeniedTcp, 1000ms), ConnectResult::timeout);
    Stats after_denied = settled_stats(*dp_);

    // the handshake's SYN and ACK at least, all counted to the rule: the SYN
    // decided by it, the packets after it passing as its tracked flow
    std::uint64_t allowed_packets =
        rule_packets(after_allowed, "client-tcp") - rule_packets(before, "client-tcp");
    EXPECT_GE(allowed_packets, 2u);
    EXPECT_EQ(packets(after_allowed, "allow-rule") - packets(before, "allow-rule"), 1u);
    EXPECT_EQ(packets(after_allowed, "tracked") - packets(before, "tracked"),
              allowed_packets - 1);
    // the SYN (and any retransmission) of the denied attempt
    EXPECT_GE(packets(after_denied, "deny-default") - packets(after_allowed, "deny-default"), 1u);
    EXPECT_EQ(rule_packets(after_denied, "client-tcp"), rule_packets(after_allowed, "client-tcp"))
        << "the denied attempt must not count as the allow rule";

    // the listener thread may take a moment to count
    for (int i = 0; i < 50 && allowed.accepted() == 0; i++)
        std::this_thread::sleep_for(20ms);
    EXPECT_EQ(allowed.accepted(), 1u);
    EXPECT_EQ(denied.accepted(), 0u);
}

TEST_P(XdpIntegration, TcpOverIpv6NeedsNeighbourDiscoveryToPass)
{
    netlab::TcpServer allowed(*server_, kServer6, kAllowedTcp);

    Stats before = dp_->stats();
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer6, kAllowedTcp), ConnectResult::connected);
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer6, kDeniedTcp, 1000ms), ConnectResult::timeout);
    Stats after = dp_->stats();

    EXPECT_GE(rule_packets(after, "client-tcp") - rule_packets(before, "client-tcp"), 2u);
    // the client had to resolve the server's address through the XDP program
    EXPECT_GE(packets(after, "neighbour-discovery") - packets(before, "neighbour-discovery"), 1u);
}

TEST_P(XdpIntegration, UdpCountersMoveByTheDatagramsSent)
{
    netlab::UdpReceiver allowed(*server_, kServer4, kAllowedUdp);
    netlab::UdpReceiver denied(*server_, kServer4, kDeniedUdp);
    // resolve the neighbour first, so that no datagram waits for ARP
    ASSERT_TRUE(netlab::ping(*client_, kServer4));

    Stats before = dp_->stats();
    EXPECT_EQ(netlab::udp_send(*client_, std::nullopt, kServer4, kAllowedUdp, 10), 10);
    EXPECT_TRUE(allowed.wait_for(10, 2000ms)) << "received " << allowed.received();
    Stats after_allowed = dp_->stats();
    EXPECT_EQ(netlab::udp_send(*client_, std::nullopt, kServer4, kDeniedUdp, 10), 10);
    EXPECT_FALSE(denied.wait_for(1, 500ms));
    Stats after_denied = dp_->stats();

    EXPECT_EQ(rule_packets(after_allowed, "client-udp") - rule_packets(before, "client-udp"), 10u);
    EXPECT_EQ(
        rule_packets(after_denied, "no-udp-7000") - rule_packets(after_allowed, "no-udp-7000"),
        10u);
    EXPECT_EQ(packets(after_denied, "deny-rule") - packets(after_allowed, "deny-rule"), 10u);
    EXPECT_EQ(allowed.received(), 10u);
    EXPECT_EQ(denied.received(), 0u);
}

TEST_P(XdpIntegration, PingIsAllowedByItsRule)
{
    Stats before = dp_->stats();
    EXPECT_TRUE(netlab::ping(*client_, kServer4));
    EXPECT_TRUE(netlab::ping(*client_, kServer6));
    Stats after = dp_->stats();
    EXPECT_GE(rule_packets(after, "client-ping") - rule_packets(before, "client-ping"), 2u);
}

TEST_P(XdpIntegration, ANewPolicyTakesEffectOnTheAttachedProgram)
{
    netlab::TcpServer server(*server_, kServer4, kAllowedTcp);
    ASSERT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp), ConnectResult::connected);

    std::string closed = kPolicy;
    closed.replace(closed.find("ports: [tcp/8080], action: allow"),
                   std::string("ports: [tcp/8080], action: allow").size(),
                   "ports: [tcp/8080], action: deny");
    dp_->apply(Policy::parse(closed, "<integration>"), "<integration>");
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp, 1000ms),
              ConnectResult::timeout);

    dp_->apply(Policy::parse(kPolicy, "<integration>"), "<integration>");
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp), ConnectResult::connected);
}

std::string mode_name(const ::testing::TestParamInfo<XdpMode>& mode)
{
    return std::string(to_string(mode.param));
}

INSTANTIATE_TEST_SUITE_P(Modes, XdpIntegration,
                         ::testing::Values(XdpMode::native, XdpMode::generic), mode_name);

}  // namespace
}  // namespace bulkhead::test

namespace bulkhead {

// Test names and messages show "native" rather than "1-byte object <01>".
void PrintTo(XdpMode mode, std::ostream* os)
{
    *os << to_string(mode);
}

}  // namespace bulkhead
