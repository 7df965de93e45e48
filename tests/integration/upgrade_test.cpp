// Upgrades keeping the maps (DESIGN.md "Atomic policy updates", issue 4 item
// 5): a new process opens the pinned state and attaches XDP again. The
// program inside the pinned link is replaced, the link stays, the maps stay
// (with connection tracking entries and counters), and traffic is policed
// throughout.
//
// The new process is a fork that loads the programs anew: the same object
// stands in for a newer build, which is what the kernel sees of one (a new
// program id over the same maps). The veth pair lives in namespaces made here
// (netlab); nothing touches the root namespace's interfaces.
#include "support/bpf_env.hpp"
#include "support/child_process.hpp"
#include "support/packet.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include "netlab.hpp"

#include <arpa/inet.h>
#include <bpf/bpf.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

using namespace std::chrono_literals;
using netlab::ConnectResult;

constexpr const char* kClient4 = "198.51.100.1";
constexpr const char* kServer4 = "198.51.100.2";
constexpr std::uint16_t kAllowedTcp = 8080;
constexpr std::uint16_t kDeniedTcp = 9090;
constexpr std::uint16_t kAllowedUdp = 6000;
constexpr std::uint16_t kDeniedUdp = 7000;
constexpr std::uint16_t kTrackedSport = 33333;

constexpr const char* kPolicy = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
failsafe: {enabled: false}
identities:
  - {name: client, labels: {app: client}, cidrs: [198.51.100.1/32]}
  - {name: server, labels: {app: server}, cidrs: [198.51.100.2/32], ingress: enforce}
rules:
  - {name: client-tcp, from: {app: client}, to: {app: server}, ports: [tcp/8080], action: allow}
  - {name: client-udp, from: {app: client}, to: {app: server}, ports: [udp/6000], action: allow}
)";

// What the new process reports.
struct Upgrade {
    std::uint32_t link_id = 0;  // as attach_xdp() returned it
    std::uint32_t attachment_prog_id = 0;
    std::uint32_t loaded_prog_id = 0;  // the id of the program it loaded
};

std::uint32_t prog_id_of_fd(int prog_fd)
{
    bpf_prog_info info{};
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(prog_fd, &info, &len) != 0)
        throw_errno("read a program's info");
    return info.id;
}

std::uint32_t map_id_of_fd(int map_fd)
{
    bpf_map_info info{};
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(map_fd, &info, &len) != 0)
        throw_errno("read a map's info");
    return info.id;
}

// The maps program `prog_id` uses, by id.
std::set<std::uint32_t> maps_of_program(std::uint32_t prog_id)
{
    BpfFd prog(bpf_prog_get_fd_by_id(prog_id));
    if (prog.get() < 0)
        throw_errno(fmt::format("open program id {}", prog_id));
    std::vector<std::uint32_t> ids(64);
    bpf_prog_info info{};
    info.nr_map_ids = static_cast<__u32>(ids.size());
    info.map_ids = reinterpret_cast<std::uintptr_t>(ids.data());
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(prog.get(), &info, &len) != 0)
        throw_errno(fmt::format("read the maps of program id {}", prog_id));
    ids.resize(std::min<std::size_t>(info.nr_map_ids, ids.size()));
    return {ids.begin(), ids.end()};
}

// The tracking key of a TCP flow client:sport -> server:dport opened at an
// ingress point (XDP).
bh_ct_key tcp_flow_key(std::uint16_t sport, std::uint16_t dport)
{
    bh_ct_key key{};
    IpAddr src = *IpAddr::parse(kClient4);
    IpAddr dst = *IpAddr::parse(kServer4);
    std::memcpy(key.src.bytes, src.bytes.data(), sizeof(key.src.bytes));
    std::memcpy(key.dst.bytes, dst.bytes.data(), sizeof(key.dst.bytes));
    key.sport = htons(sport);
    key.dport = htons(dport);
    key.proto = kProtoTcp;
    key.point = BH_CT_POINT_INGRESS;
    return key;
}

std::map<std::string, std::uint64_t> reason_packets(const Stats& stats)
{
    std::map<std::string, std::uint64_t> out;
    for (const auto& [name, counter] : stats.reasons)
        out[name] = counter.packets;
    return out;
}

std::map<std::string, std::uint64_t> rule_packets(const Stats& stats)
{
    std::map<std::string, std::uint64_t> out;
    for (const RuleCounter& r : stats.rules)
        out[r.name] = r.counter.packets;
    return out;
}

const Attachment* xdp_attachment(const Status& status, const std::string& interface)
{
    for (const Attachment& a : status.attachments) {
        if (a.hook == "xdp" && a.interface == interface)
            return &a;
    }
    return nullptr;
}

class UpgradeTest : public ::testing::Test {
protected:
    void SetUp() override
    {
        if (auto why = bpf_skip_reason())
            GTEST_SKIP() << *why;

        pin_ = std::make_unique<ScopedPinDir>();
        options_ = test_options(pin_->path());
        client_ = std::make_unique<netlab::NetNs>("upg-cli");
        server_ = std::make_unique<netlab::NetNs>("upg-srv");
        veth_ = std::make_unique<netlab::VethPair>(*client_, "veth-c", *server_, "veth-s");
        netlab::add_address(*client_, "veth-c", std::string(kClient4) + "/24");
        netlab::add_address(*server_, "veth-s", std::string(kServer4) + "/24");
        dp_ = std::make_unique<Dataplane>(Dataplane::open(options_));
        dp_->apply(Policy::parse(kPolicy, "<upgrade>"), "<upgrade>");
    }

    void TearDown() override
    {
        veth_.reset();
        server_.reset();
        client_.reset();
        dp_.reset();
        pin_.reset();
    }

    // Attaches XDP to the server's veth from a thread inside its namespace.
    Attachment attach_in_server()
    {
        Attachment out;
        std::exception_ptr failure;
        std::thread worker([&] {
            try {
                out = netlab::run_in_netns(*server_, [&] { return dp_->attach_xdp("veth-s"); });
            } catch (...) {
                failure = std::current_exception();
            }
        });
        worker.join();
        if (failure)
            std::rethrow_exception(failure);
        return out;
    }

    Options options_;
    std::unique_ptr<ScopedPinDir> pin_;
    std::unique_ptr<netlab::NetNs> client_;
    std::unique_ptr<netlab::NetNs> server_;
    std::unique_ptr<netlab::VethPair> veth_;
    std::unique_ptr<Dataplane> dp_;
};

TEST_F(UpgradeTest, ANewProcessReplacesTheProgramInTheLinkAndKeepsMapsAndState)
{
    const Attachment first = attach_in_server();
    ASSERT_NE(first.link_id, 0u);
    ASSERT_NE(first.prog_id, 0u);
    auto tcp_server = netlab::tcp_listen(*server_, kServer4, kAllowedTcp);
    netlab::UdpReceiver allowed_udp(*server_, kServer4, kAllowedUdp);
    netlab::UdpReceiver denied_udp(*server_, kServer4, kDeniedUdp);

    // state to keep: a tracked flow (a SYN through the program), counters
    const bh_ct_key tracked = tcp_flow_key(kTrackedSport, kAllowedTcp);
    Bytes syn = Packet()
                    .ipv4({.src = kClient4, .dst = kServer4})
                    .tcp({.sport = kTrackedSport, .dport = kAllowedTcp})
                    .bytes();
    ASSERT_EQ(run_xdp(dp_->program_fd("bh_xdp"), syn).retval, kXdpPass);
    bh_ct_value tracked_before{};
    ASSERT_EQ(bpf_map_lookup_elem(dp_->map_fd("bh_ct"), &tracked, &tracked_before), 0)
        << "the SYN opened no tracking entry";
    ASSERT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp), ConnectResult::connected);
    const Stats before = dp_->stats();

    // denied and allowed datagrams all through the upgrade
    std::atomic<bool> stop{false};
    std::atomic<int> rounds{0};
    std::exception_ptr sender_failure;
    std::thread sender([&] {
        try {
            while (!stop.load()) {
                netlab::udp_send(*client_, std::nullopt, kServer4, kDeniedUdp, 4);
                netlab::udp_send(*client_, std::nullopt, kServer4, kAllowedUdp, 1);
                rounds++;
                std::this_thread::sleep_for(1ms);
            }
        } catch (...) {
            sender_failure = std::current_exception();
        }
    });
    while (rounds.load() < 10 && !sender_failure)
        std::this_thread::sleep_for(1ms);

    // the new process: open the pins, load its programs, attach again
    Pipe report;
    Upgrade upgrade;
    int child_exit = 0;
    {
        ChildProcess newer([&] {
            report.read_end.reset();
            Dataplane own = Dataplane::open(options_);
            Upgrade u;
            u.loaded_prog_id = prog_id_of_fd(own.program_fd("bh_xdp"));
            Attachment a = netlab::run_in_netns(*server_, [&] { return own.attach_xdp("veth-s"); });
            u.link_id = a.link_id;
            u.attachment_prog_id = a.prog_id;
            report.write(&u, sizeof(u));
            return 0;
        });
        report.write_end.reset();
        child_exit = newer.wait(60s);
    }
    ASSERT_EQ(child_exit, 0) << "the new process failed; see its stderr";
    ASSERT_TRUE(report.read(&upgrade, sizeof(upgrade), 1000ms));
    const int sent_before_stop = rounds.load();
    std::this_thread::sleep_for(100ms);  // datagrams sent after the upgrade too
    stop = true;
    sender.join();
    if (sender_failure)
        std::rethrow_exception(sender_failure);

    // the same link, now running the new program, over the same maps
    EXPECT_EQ(upgrade.link_id, first.link_id);
    EXPECT_NE(upgrade.loaded_prog_id, first.prog_id);
    EXPECT_EQ(upgrade.attachment_prog_id, upgrade.loaded_prog_id)
        << "attach_xdp() reports a program id other than the one it put in the link";
    Status status = dp_->status();
    const Attachment* now = xdp_attachment(status, "veth-s");
    ASSERT_NE(now, nullptr);
    EXPECT_EQ(now->link_id, first.link_id);
    EXPECT_EQ(now->prog_id, upgrade.loaded_prog_id);
    EXPECT_FALSE(now->defunct);
    std::set<std::uint32_t> used = maps_of_program(upgrade.loaded_prog_id);
    for (const char* name :
         {"bh_ct", "bh_gen_ctl", "bh_reason_cnt", "bh_rule_cnt", "bh_policy", "bh_ipc_host"})
        EXPECT_EQ(used.count(map_id_of_fd(dp_->map_fd(name))), 1u)
            << "the new program does not use the pinned " << name;

    // tracking entries and counters survived
    bh_ct_value tracked_after{};
    ASSERT_EQ(bpf_map_lookup_elem(dp_->map_fd("bh_ct"), &tracked, &tracked_after), 0)
        << "the tracking entry is gone";
    EXPECT_EQ(tracked_after.generation, tracked_before.generation);
    EXPECT_EQ(tracked_after.rule_id, tracked_before.rule_id);
    const Stats after = dp_->stats();
    auto reasons_before = reason_packets(before);
    for (const auto& [name, packets] : reason_packets(after))
        EXPECT_GE(packets, reasons_before[name]) << "reason counter " << name << " went back";
    auto rules_before = rule_packets(before);
    EXPECT_GE(rules_before["client-tcp"], 1u);
    for (const auto& [name, packets] : rule_packets(after))
        EXPECT_GE(packets, rules_before[name]) << "rule counter " << name << " went back";

    // policed throughout: no denied datagram ever arrived; allowed ones did
    EXPECT_GE(sent_before_stop, 10);
    EXPECT_TRUE(allowed_udp.wait_for(1, 2000ms));
    EXPECT_EQ(denied_udp.received(), 0u) << "denied datagrams got through during the upgrade";

    // and by the new program now: a denied connection times out and counts
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kDeniedTcp, 500ms), ConnectResult::timeout);
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp), ConnectResult::connected);
    EXPECT_GT(reason_packets(dp_->stats())["deny-default"], reason_packets(after)["deny-default"]);
    EXPECT_EQ(denied_udp.received(), 0u);
}

}  // namespace
}  // namespace bulkhead::test
