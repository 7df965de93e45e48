// The cgroup hooks and the stateful datapath with real sockets: a client
// namespace whose sockets belong to a test cgroup (bulkhead's cgroup
// programs attached with attach_cgroup), a server namespace with bulkhead's
// XDP program on its veth, and default deny everywhere.
//
// cgroup_skb and connect hooks apply to processes in the cgroup whatever
// their network namespace, so the client side runs in a forked child that
// netlab places in the test cgroup and the client namespace. The child opens
// and connects the socket (the socket belongs to the cgroup it was created
// in, and the connect hooks judge the calling process's cgroup) and passes
// it back over a unix socket, so the test can keep using it.
//
// Nothing here touches the root namespace's interfaces or the root cgroup.
#include "support/bpf_env.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include "netlab.hpp"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {
namespace {

using namespace std::chrono_literals;
using netlab::Fd;

constexpr const char* kClient4 = "198.51.100.1";
constexpr const char* kServer4 = "198.51.100.2";
constexpr const char* kClient6 = "2001:db8::1";
constexpr const char* kServer6 = "2001:db8::2";
constexpr const char* kServerMapped = "::ffff:198.51.100.2";
constexpr std::uint16_t kAllowedTcp = 8080;
constexpr std::uint16_t kDeniedTcp = 9090;
constexpr std::uint16_t kAllowedUdp = 6000;
constexpr std::uint16_t kDeniedUdp = 7000;

// Default deny on both sides: the client's cgroup enforces its egress, the
// server's XDP its ingress; replies pass only as tracked. `tcp_action` is
// the action of the client's TCP rule.
std::string policy(const std::string& cgroup, const std::string& tcp_action = "allow",
                   const std::string& extra_rules = "")
{
    return fmt::format(R"(apiVersion: bulkhead/v1
defaults: {{ingress: enforce, egress: enforce}}
failsafe: {{enabled: false}}
identities:
  - {{name: client, labels: {{app: client}}, cgroups: ["{}"], ingress: enforce, egress: enforce,
     cidrs: [198.51.100.1/32, "2001:db8::1/128"]}}
  - {{name: server, labels: {{app: server}}, ingress: enforce, egress: enforce,
     cidrs: [198.51.100.2/32, "2001:db8::2/128"]}}
rules:
  - {{name: client-tcp, from: {{app: client}}, to: {{app: server}}, ports: [tcp/8080],
     action: {}}}
  - {{name: client-udp, from: {{app: client}}, to: {{app: server}}, ports: [udp/6000],
     action: allow}}
  - {{name: client-ping, from: {{app: client}}, to: {{app: server}}, ports: [icmp/8, icmpv6/128],
     action: allow}}
{})",
                       cgroup, tcp_action, extra_rules);
}

std::uint64_t packets(const Stats& stats, const std::string& reason)
{
    for (const auto& [name, counter] : stats.reasons) {
        if (name == reason)
            return counter.packets;
    }
    return 0;
}

std::string moved(const Stats& before, const Stats& after)
{
    return moved_one(counter_delta(before, after).reasons, 0);
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

struct Address {
    sockaddr_storage storage{};
    socklen_t len = 0;
    int family() const { return storage.ss_family; }
    const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

Address address(const std::string& text, std::uint16_t port)
{
    Address a;
    if (text.find(':') != std::string::npos) {
        auto* in6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        if (inet_pton(AF_INET6, text.c_str(), &in6->sin6_addr) != 1)
            throw std::invalid_argument("bad address " + text);
        a.len = sizeof(sockaddr_in6);
    } else {
        auto* in = reinterpret_cast<sockaddr_in*>(&a.storage);
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        if (inet_pton(AF_INET, text.c_str(), &in->sin_addr) != 1)
            throw std::invalid_argument("bad address " + text);
        a.len = sizeof(sockaddr_in);
    }
    return a;
}

// Sends `fd` over the unix socket `channel` (SCM_RIGHTS).
bool send_fd(int channel, int fd)
{
    char byte = 'f';
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    return ::sendmsg(channel, &msg, 0) == 1;
}

Fd receive_fd(int channel)
{
    char byte = 0;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    if (::recvmsg(channel, &msg, MSG_DONTWAIT) != 1)
        throw_errno("receive a socket from the cgroup child");
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    if (cmsg == nullptr || cmsg->cmsg_type != SCM_RIGHTS)
        throw std::runtime_error("the cgroup child sent no socket");
    int fd = -1;
    std::memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
    return Fd(fd);
}

// What a socket call made inside the cgroup came to: 0 and the socket, or
// the errno of the call that failed (EPERM: a hook refused it).
struct CgroupSocket {
    int error = 0;
    Fd fd;
};

// Runs `open` in a child inside `cgroup` and `ns`; `open` returns a socket
// or -errno. The socket comes back to this process.
CgroupSocket socket_in_cgroup(const netlab::Cgroup& cgroup, const netlab::NetNs& ns,
                              const std::function<int()>& open)
{
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, pair) != 0)
        throw_errno("create a unix socket pair");
    Fd ours(pair[0]);
    Fd theirs(pair[1]);
    int rc = netlab::run_in_cgroup(
        cgroup,
        [&] {
            int fd = open();
            if (fd < 0)
                return -fd;
            return send_fd(theirs.get(), fd) ? 0 : 254;
        },
        &ns);
    CgroupSocket out;
    out.error = rc;
    if (rc == 0)
        out.fd = receive_fd(ours.get());
    return out;
}

// A TCP connect with a deadline, from the process that calls it.
int connect_tcp(const std::string& dst, std::uint16_t port)
{
    Address to = address(dst, port);
    int fd = ::socket(to.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    timeval timeout{2, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (::connect(fd, to.get(), to.len) != 0) {
        int err = errno == EINPROGRESS ? ETIMEDOUT : errno;
        ::close(fd);
        return -err;
    }
    return fd;
}

// An unconnected UDP send (sendto): the sendmsg hooks judge it.
int sendto_udp(const std::string& dst, std::uint16_t port, std::size_t size = 8)
{
    Address to = address(dst, port);
    int fd = ::socket(to.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    std::string payload(size, 'u');
    if (::sendto(fd, payload.data(), payload.size(), 0, to.get(), to.len) < 0) {
        int err = errno;
        ::close(fd);
        return -err;
    }
    return fd;
}

Fd listen_tcp(const netlab::NetNs& ns, const std::string& addr, std::uint16_t port)
{
    Address a = address(addr, port);
    Fd fd = netlab::run_in_netns(ns, [&] { return Fd(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0)); });
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a.family() == AF_INET6)
        ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (::bind(fd.get(), a.get(), a.len) != 0 || ::listen(fd.get(), 16) != 0)
        throw_errno(fmt::format("listen on {} port {}", addr, port));
    return fd;
}

bool readable(int fd, std::chrono::milliseconds timeout)
{
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(timeout.count())) == 1;
}

Fd accept_one(int listener, std::chrono::milliseconds timeout = 2000ms)
{
    if (!readable(listener, timeout))
        return Fd();
    return Fd(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
}

bool send_text(int fd, const std::string& text)
{
    return ::send(fd, text.data(), text.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(text.size());
}

// Whatever arrives on `fd` within `timeout`, up to `size` bytes ("" for nothing).
std::string receive_text(int fd, std::size_t size, std::chrono::milliseconds timeout = 1500ms)
{
    std::string out;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (out.size() < size) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0 || !readable(fd, left))
            break;
        char buf[4096];
        ssize_t n = ::recv(fd, buf, std::min(sizeof buf, size - out.size()), MSG_DONTWAIT);
        if (n <= 0)
            break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
}

// `ping -c count -s size` from inside `ns`: the number of replies.
int ping_replies(const netlab::NetNs& ns, const std::string& dst, int count, int size)
{
    netlab::CommandResult r = netlab::run_command(
        {"ping", "-n", "-q", "-c", std::to_string(count), "-i", "0.2", "-W", "2", "-s",
         std::to_string(size), dst},
        &ns);
    std::smatch m;
    static const std::regex received(R"((\d+) received)");
    if (!std::regex_search(r.out, m, received))
        return -1;
    return std::stoi(m[1].str());
}

// ---------------------------------------------------------------------------
// The fixture: client namespace + cgroup, server namespace + XDP
// ---------------------------------------------------------------------------

class CgroupIntegration : public ::testing::Test {
protected:
    void SetUp() override
    {
        if (auto why = bpf_skip_reason())
            GTEST_SKIP() << *why;

        pin_ = std::make_unique<ScopedPinDir>();
        cgroup_ = std::make_unique<netlab::Cgroup>("cg-client");
        client_ = std::make_unique<netlab::NetNs>("cg-cli");
        server_ = std::make_unique<netlab::NetNs>("cg-srv");
        veth_ = std::make_unique<netlab::VethPair>(*client_, "veth-c", *server_, "veth-s");
        netlab::add_address(*client_, "veth-c", std::string(kClient4) + "/24");
        netlab::add_address(*server_, "veth-s", std::string(kServer4) + "/24");
        netlab::add_address(*client_, "veth-c", std::string(kClient6) + "/64");
        netlab::add_address(*server_, "veth-s", std::string(kServer6) + "/64");

        dp_ = std::make_unique<Dataplane>(Dataplane::open(options()));
        apply(policy(cgroup_->path().string()));
        netlab::run_in_netns(*server_, [&] { return dp_->attach_xdp("veth-s", XdpMode::native); });
        dp_->attach_cgroup(cgroup_->path());
        // resolve the neighbours first, so no test packet waits for ARP or ND
        // (the client's ping is allowed by its address; the test process is
        // in no registered cgroup)
        ASSERT_TRUE(netlab::ping(*client_, kServer4));
        ASSERT_TRUE(netlab::ping(*client_, kServer6));
    }

    void TearDown() override
    {
        veth_.reset();
        server_.reset();
        client_.reset();
        if (dp_) {
            dp_->detach_all();
            dp_.reset();
        }
        cgroup_.reset();
        pin_.reset();
    }

    virtual Options options() { return test_options(pin_->path()); }

    ApplyResult apply(const std::string& yaml)
    {
        return dp_->apply(Policy::parse(yaml, "<integration>"), "<integration>");
    }

    // A TCP connection from the client cgroup to the server, accepted.
    struct Connection {
        Fd client;
        Fd server;
    };
    Connection connect_from_cgroup(const std::string& dst, int listener)
    {
        CgroupSocket c = socket_in_cgroup(*cgroup_, *client_,
                                          [&] { return connect_tcp(dst, kAllowedTcp); });
        EXPECT_EQ(c.error, 0) << "connect from the cgroup to " << dst << ": "
                              << std::strerror(c.error);
        Connection out{std::move(c.fd), Fd()};
        if (out.client)
            out.server = accept_one(listener);
        return out;
    }

    std::unique_ptr<ScopedPinDir> pin_;
    std::unique_ptr<netlab::Cgroup> cgroup_;
    std::unique_ptr<netlab::NetNs> client_;
    std::unique_ptr<netlab::NetNs> server_;
    std::unique_ptr<netlab::VethPair> veth_;
    std::unique_ptr<Dataplane> dp_;
};

TEST_F(CgroupIntegration, DeniedConnectFailsWithEpermAtOnce)
{
    Fd listener4 = listen_tcp(*server_, kServer4, kAllowedTcp);
    Fd listener6 = listen_tcp(*server_, kServer6, kAllowedTcp);
    struct Case {
        const char* description;
        const char* dst;
        std::uint16_t port;
        int error;  // 0: connected
    };
    const std::vector<Case> cases = {
        {"TCP v4 to an allowed port", kServer4, kAllowedTcp, 0},
        {"TCP v4 to a denied port", kServer4, kDeniedTcp, EPERM},
        {"TCP v6 to an allowed port", kServer6, kAllowedTcp, 0},
        {"TCP v6 to a denied port", kServer6, kDeniedTcp, EPERM},
        {"TCP v4-mapped v6 to an allowed port: judged as v4", kServerMapped, kAllowedTcp, 0},
        {"TCP v4-mapped v6 to a denied port: judged as v4", kServerMapped, kDeniedTcp, EPERM},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.description);
        auto started = std::chrono::steady_clock::now();
        CgroupSocket s = socket_in_cgroup(*cgroup_, *client_,
                                          [&] { return connect_tcp(c.dst, c.port); });
        auto took = std::chrono::steady_clock::now() - started;
        EXPECT_EQ(s.error, c.error) << std::strerror(s.error);
        if (c.error == EPERM) {
            EXPECT_LT(took, 1000ms) << "EPERM comes from the hook, not from a timeout";
        }
    }
}

TEST_F(CgroupIntegration, DeniedUdpSendtoFailsWithEperm)
{
    netlab::UdpReceiver allowed4(*server_, kServer4, kAllowedUdp);
    netlab::UdpReceiver allowed6(*server_, kServer6, kAllowedUdp);
    struct Case {
        const char* description;
        const char* dst;
        std::uint16_t port;
        int error;
    };
    const std::vector<Case> cases = {
        {"UDP v4 to an allowed port", kServer4, kAllowedUdp, 0},
        {"UDP v4 to a denied port", kServer4, kDeniedUdp, EPERM},
        {"UDP v6 to an allowed port", kServer6, kAllowedUdp, 0},
        {"UDP v6 to a denied port", kServer6, kDeniedUdp, EPERM},
        {"UDP v4-mapped v6 to a denied port: judged as v4", kServerMapped, kDeniedUdp, EPERM},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.description);
        CgroupSocket s = socket_in_cgroup(*cgroup_, *client_, [&] { return sendto_udp(c.dst, c.port); });
        EXPECT_EQ(s.error, c.error) << std::strerror(s.error);
    }
    EXPECT_TRUE(allowed4.wait_for(1, 2000ms)) << "the allowed v4 datagram did not arrive";
    EXPECT_TRUE(allowed6.wait_for(1, 2000ms)) << "the allowed v6 datagram did not arrive";
}

// Default deny on both sides: the request passes the client's egress by its
// rule and the server's ingress; the reply passes both as tracked.
TEST_F(CgroupIntegration, AllowedRequestAndReplyPassUnderDefaultDeny)
{
    for (const char* dst : {kServer4, kServer6}) {
        SCOPED_TRACE(dst);
        Fd listener = listen_tcp(*server_, dst, kAllowedTcp);
        Stats before = dp_->stats();
        Connection c = connect_from_cgroup(dst, listener.get());
        ASSERT_TRUE(c.server) << "the server accepted nothing";

        EXPECT_TRUE(send_text(c.client.get(), "request"));
        EXPECT_EQ(receive_text(c.server.get(), 7), "request") << "moved: " << moved(before, dp_->stats());
        EXPECT_TRUE(send_text(c.server.get(), "reply"));
        EXPECT_EQ(receive_text(c.client.get(), 5), "reply") << "moved: " << moved(before, dp_->stats());

        Stats after = dp_->stats();
        EXPECT_GE(packets(after, "tracked") - packets(before, "tracked"), 2u);
        EXPECT_GE(packets(after, "allow-rule") - packets(before, "allow-rule"), 1u);
        EXPECT_EQ(packets(after, "malformed"), packets(before, "malformed"));
        EXPECT_EQ(packets(after, "deny-default"), packets(before, "deny-default"));
    }
}

// A commit that revokes the rule cuts the established flow at its next
// packet: what the client sends after apply() returns is not delivered.
TEST_F(CgroupIntegration, RevocationCutsAnEstablishedFlowAtOnce)
{
    Fd listener = listen_tcp(*server_, kServer4, kAllowedTcp);
    Connection c = connect_from_cgroup(kServer4, listener.get());
    ASSERT_TRUE(c.server);
    ASSERT_TRUE(send_text(c.client.get(), "before"));
    ASSERT_EQ(receive_text(c.server.get(), 6), "before") << "the flow must work before the commit";

    Stats before = dp_->stats();
    apply(policy(cgroup_->path().string(), "deny"));
    EXPECT_TRUE(send_text(c.client.get(), "after"));
    EXPECT_EQ(receive_text(c.server.get(), 5, 1500ms), "")
        << "a packet sent after the commit was delivered";
    EXPECT_TRUE(send_text(c.server.get(), "reply-after"));
    EXPECT_EQ(receive_text(c.client.get(), 11, 1000ms), "")
        << "the server's packet after the commit was delivered";

    // each kind of point that tracked the flow (the cgroup's egress, the
    // server's XDP) revokes its own entry at the flow's next packet there
    Stats after = dp_->stats();
    EXPECT_GE(packets(after, "revoked") - packets(before, "revoked"), 1u)
        << "moved: " << moved(before, after);
    EXPECT_LE(packets(after, "revoked") - packets(before, "revoked"), 2u)
        << "moved: " << moved(before, after);
}

// U1: re-applying the policy in force cuts nothing.
TEST_F(CgroupIntegration, UnchangedReapplyCutsNothing)
{
    Fd listener = listen_tcp(*server_, kServer4, kAllowedTcp);
    Connection c = connect_from_cgroup(kServer4, listener.get());
    ASSERT_TRUE(c.server);
    const std::string yaml = policy(cgroup_->path().string());

    Stats before = dp_->stats();
    int delivered = 0;
    for (int i = 0; i < 50; i++) {
        EXPECT_TRUE(apply(yaml).unchanged);
        std::string request = fmt::format("request {:02}", i);
        std::string reply = fmt::format("reply {:02}", i);
        send_text(c.client.get(), request);
        bool ok = receive_text(c.server.get(), request.size(), 1000ms) == request;
        send_text(c.server.get(), reply);
        ok = receive_text(c.client.get(), reply.size(), 1000ms) == reply && ok;
        if (!ok)
            break;  // the first loss says it all, and the rest would only wait
        delivered++;
    }
    Stats after = dp_->stats();
    EXPECT_EQ(delivered, 50) << "exchanges delivered before the first loss; moved: "
                             << moved(before, after);
    EXPECT_EQ(packets(after, "revoked"), packets(before, "revoked"));
    EXPECT_EQ(packets(after, "deny-default"), packets(before, "deny-default"));
    EXPECT_EQ(packets(after, "malformed"), packets(before, "malformed"));
}

// Fragments at the server's XDP: a 3000-byte UDP datagram and a ping of
// 3000 bytes over a 1500-byte MTU, from the client namespace (outside the
// cgroup: the client is known by its address there).
TEST_F(CgroupIntegration, FragmentedDatagramsPassXdpWhenAllowed)
{
    netlab::UdpReceiver receiver(*server_, kServer4, kAllowedUdp);
    std::string big(3000, 'f');

    Stats before = dp_->stats();
    EXPECT_EQ(netlab::udp_send(*client_, std::nullopt, kServer4, kAllowedUdp, 1, big), 1);
    EXPECT_TRUE(receiver.wait_for(1, 2000ms)) << "a 3000-byte datagram; moved: "
                                              << moved(before, dp_->stats());
    // one socket: the second datagram belongs to a flow tracked by then
    EXPECT_EQ(netlab::udp_send(*client_, std::nullopt, kServer4, kAllowedUdp, 2, big), 2);
    EXPECT_TRUE(receiver.wait_for(3, 2000ms))
        << "two 3000-byte datagrams of one flow; received " << receiver.received() - 1
        << "; moved: " << moved(before, dp_->stats());

    EXPECT_EQ(ping_replies(*client_, kServer4, 1, 3000), 1) << "one large ping";
    EXPECT_EQ(ping_replies(*client_, kServer4, 3, 3000), 3) << "three large pings of one id";
    EXPECT_EQ(ping_replies(*client_, kServer6, 3, 3000), 3) << "three large IPv6 pings";
    Stats after = dp_->stats();
    EXPECT_EQ(packets(after, "malformed"), packets(before, "malformed"));
}

// A large datagram from a process in the cgroup: the egress hook sees it
// before the stack fragments it.
TEST_F(CgroupIntegration, LargeDatagramsFromTheCgroupPass)
{
    netlab::UdpReceiver receiver(*server_, kServer4, kAllowedUdp);
    Stats before = dp_->stats();
    CgroupSocket s = socket_in_cgroup(*cgroup_, *client_,
                                      [&] { return sendto_udp(kServer4, kAllowedUdp, 3000); });
    EXPECT_EQ(s.error, 0) << std::strerror(s.error);
    EXPECT_TRUE(receiver.wait_for(1, 2000ms)) << "moved: " << moved(before, dp_->stats());
}

// G1: 70 attach cycles with alternating policies leave one bulkhead program
// per hook, the last policy in force, and another tool's program untouched.
TEST_F(CgroupIntegration, RepeatedAttachLeavesOneProgramPerHook)
{
    Fd cgroup_fd(::open(cgroup_->path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    ASSERT_TRUE(cgroup_fd);

    // another tool's program: r0 = 1 (pass); exit
    const bpf_insn pass[] = {
        {BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 1},
        {BPF_JMP | BPF_EXIT, 0, 0, 0, 0},
    };
    LIBBPF_OPTS(bpf_prog_load_opts, load_opts, .expected_attach_type = BPF_CGROUP_INET_EGRESS);
    BpfFd other(bpf_prog_load(BPF_PROG_TYPE_CGROUP_SKB, "other_tool", "GPL", pass, 2, &load_opts));
    ASSERT_GE(other.get(), 0) << "load another tool's program: " << std::strerror(errno);
    BpfFd other_link(bpf_link_create(other.get(), cgroup_fd.get(), BPF_CGROUP_INET_EGRESS, nullptr));
    ASSERT_GE(other_link.get(), 0) << "attach another tool's program: " << std::strerror(errno);
    bpf_prog_info other_info{};
    std::uint32_t info_len = sizeof other_info;
    ASSERT_EQ(bpf_obj_get_info_by_fd(other.get(), &other_info, &info_len), 0);

    const std::string allow = policy(cgroup_->path().string(), "allow");
    const std::string deny = policy(cgroup_->path().string(), "deny");
    for (int i = 0; i < 70; i++) {
        apply(i % 2 == 0 ? allow : deny);
        dp_->attach_cgroup(cgroup_->path());
    }

    struct Hook {
        const char* name;
        bpf_attach_type type;
    };
    const std::vector<Hook> hooks = {
        {"ingress", BPF_CGROUP_INET_INGRESS}, {"egress", BPF_CGROUP_INET_EGRESS},
        {"connect4", BPF_CGROUP_INET4_CONNECT}, {"connect6", BPF_CGROUP_INET6_CONNECT},
        {"sendmsg4", BPF_CGROUP_UDP4_SENDMSG}, {"sendmsg6", BPF_CGROUP_UDP6_SENDMSG},
    };
    for (const Hook& hook : hooks) {
        SCOPED_TRACE(hook.name);
        std::uint32_t ids[64] = {};
        std::uint32_t count = 64;
        std::uint32_t flags = 0;
        ASSERT_EQ(bpf_prog_query(cgroup_fd.get(), hook.type, 0, &flags, ids, &count), 0)
            << std::strerror(errno);
        int ours = 0;
        bool other_found = false;
        for (std::uint32_t k = 0; k < count; k++) {
            BpfFd prog(bpf_prog_get_fd_by_id(ids[k]));
            bpf_prog_info info{};
            std::uint32_t len = sizeof info;
            ASSERT_EQ(bpf_obj_get_info_by_fd(prog.get(), &info, &len), 0);
            if (std::string(info.name).rfind("bh_", 0) == 0)
                ours++;
            other_found = other_found || info.id == other_info.id;
        }
        EXPECT_EQ(ours, 1) << "bulkhead programs on the hook";
        if (hook.type == BPF_CGROUP_INET_EGRESS) {
            EXPECT_TRUE(other_found) << "the other tool's program is gone";
            EXPECT_EQ(count, 2u);
        }
    }
    bpf_link_info link_info{};
    std::uint32_t link_len = sizeof link_info;
    ASSERT_EQ(bpf_obj_get_info_by_fd(other_link.get(), &link_info, &link_len), 0);
    EXPECT_EQ(link_info.prog_id, other_info.id) << "the other tool's link holds another program";

    std::size_t attachments = 0;
    for (const Attachment& a : dp_->status().attachments)
        attachments += a.hook == "cgroup" ? 1 : 0;
    EXPECT_EQ(attachments, 1u);

    // the last policy (cycle 69) denies tcp/8080
    CgroupSocket s = socket_in_cgroup(*cgroup_, *client_,
                                      [&] { return connect_tcp(kServer4, kAllowedTcp); });
    EXPECT_EQ(s.error, EPERM) << std::strerror(s.error);
}

// ---------------------------------------------------------------------------
// Path MTU discovery through a router
// ---------------------------------------------------------------------------

// client (203.0.113.1, 2001:db8:1::1) - router - server (198.51.100.2,
// 2001:db8::2); the router's link to the server has an MTU of 1280. XDP on
// both end hosts, default deny: the client's UDP flow is allowed by a rule
// and tracked at the server's ingress; the router's frag-needed or packet
// too big, from an address no rule covers, must reach the client as related
// to that flow, or path MTU discovery breaks.
class PmtuIntegration : public ::testing::Test {
protected:
    void SetUp() override
    {
        if (auto why = bpf_skip_reason())
            GTEST_SKIP() << *why;
        pin_ = std::make_unique<ScopedPinDir>();
        client_ = std::make_unique<netlab::NetNs>("pm-cli");
        router_ = std::make_unique<netlab::NetNs>("pm-rtr");
        server_ = std::make_unique<netlab::NetNs>("pm-srv");
        client_link_ = std::make_unique<netlab::VethPair>(*client_, "veth-c", *router_, "rtr-c");
        server_link_ = std::make_unique<netlab::VethPair>(*router_, "rtr-s", *server_, "veth-s");
        netlab::add_address(*client_, "veth-c", "203.0.113.1/24");
        netlab::add_address(*client_, "veth-c", "2001:db8:1::1/64");
        netlab::add_address(*router_, "rtr-c", "203.0.113.254/24");
        netlab::add_address(*router_, "rtr-c", "2001:db8:1::fe/64");
        netlab::add_address(*router_, "rtr-s", "198.51.100.254/24");
        netlab::add_address(*router_, "rtr-s", "2001:db8::fe/64");
        netlab::add_address(*server_, "veth-s", "198.51.100.2/24");
        netlab::add_address(*server_, "veth-s", "2001:db8::2/64");
        router_->ip({"link", "set", "rtr-s", "mtu", "1280"});
        server_->ip({"link", "set", "veth-s", "mtu", "1280"});
        client_->ip({"route", "add", "default", "via", "203.0.113.254"});
        client_->ip({"-6", "route", "add", "default", "via", "2001:db8:1::fe"});
        server_->ip({"route", "add", "default", "via", "198.51.100.254"});
        server_->ip({"-6", "route", "add", "default", "via", "2001:db8::fe"});
        netlab::run_checked({"sysctl", "-q", "-w", "net.ipv4.ip_forward=1"}, router_.get());
        netlab::run_checked({"sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"},
                            router_.get());

        dp_ = std::make_unique<Dataplane>(Dataplane::open(test_options(pin_->path())));
        dp_->apply(Policy::parse(R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: enforce}
failsafe: {enabled: false}
identities:
  - {name: client, labels: {app: client}, cidrs: [203.0.113.1/32, "2001:db8:1::1/128"]}
  - {name: server, labels: {app: server}, cidrs: [198.51.100.2/32, "2001:db8::2/128"]}
rules:
  - {name: client-udp, from: {app: client}, to: {app: server}, ports: [udp/6000], action: allow}
  - {name: client-ping, from: {app: client}, to: {app: server}, ports: [icmp/8, icmpv6/128],
     action: allow}
)",
                                 "<pmtu>"),
                   "<pmtu>");
        netlab::run_in_netns(*client_, [&] { return dp_->attach_xdp("veth-c", XdpMode::native); });
        netlab::run_in_netns(*server_, [&] { return dp_->attach_xdp("veth-s", XdpMode::native); });
        ASSERT_TRUE(netlab::ping(*client_, "198.51.100.2", 2000ms));
        ASSERT_TRUE(netlab::ping(*client_, "2001:db8::2", 2000ms));
    }

    void TearDown() override
    {
        server_link_.reset();
        client_link_.reset();
        server_.reset();
        router_.reset();
        client_.reset();
        dp_.reset();
        pin_.reset();
    }

    // Sends a small datagram (it opens the flow at the server), then one of
    // 1400 bytes with fragmentation forbidden, which the router cannot
    // forward; returns the path MTU the client's socket learnt.
    int learnt_mtu(const std::string& dst)
    {
        Address to = address(dst, kAllowedUdp);
        bool v6 = to.family() == AF_INET6;
        Fd fd = netlab::run_in_netns(*client_, [&] {
            return Fd(::socket(to.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0));
        });
        int level = v6 ? IPPROTO_IPV6 : IPPROTO_IP;
        int option = v6 ? IPV6_MTU_DISCOVER : IP_MTU_DISCOVER;
        int value = v6 ? IPV6_PMTUDISC_DO : IP_PMTUDISC_DO;
        ::setsockopt(fd.get(), level, option, &value, sizeof value);
        if (::connect(fd.get(), to.get(), to.len) != 0)
            throw_errno("connect the UDP socket to " + dst);
        std::string small(16, 's');
        std::string big(1400, 'b');
        ::send(fd.get(), small.data(), small.size(), 0);
        std::this_thread::sleep_for(200ms);
        ::send(fd.get(), big.data(), big.size(), 0);
        for (int i = 0; i < 20; i++) {
            std::this_thread::sleep_for(100ms);
            int mtu = 0;
            socklen_t len = sizeof mtu;
            ::getsockopt(fd.get(), level, v6 ? IPV6_MTU : IP_MTU, &mtu, &len);
            if (mtu < 1500)
                return mtu;
        }
        return 1500;
    }

    std::unique_ptr<ScopedPinDir> pin_;
    std::unique_ptr<netlab::NetNs> client_;
    std::unique_ptr<netlab::NetNs> router_;
    std::unique_ptr<netlab::NetNs> server_;
    std::unique_ptr<netlab::VethPair> client_link_;
    std::unique_ptr<netlab::VethPair> server_link_;
    std::unique_ptr<Dataplane> dp_;
};

TEST_F(PmtuIntegration, FragNeededAndPacketTooBigReachTheSender)
{
    netlab::UdpReceiver receiver4(*server_, "198.51.100.2", kAllowedUdp);
    netlab::UdpReceiver receiver6(*server_, "2001:db8::2", kAllowedUdp);

    Stats before = dp_->stats();
    EXPECT_EQ(learnt_mtu("198.51.100.2"), 1280) << "moved: " << moved(before, dp_->stats());
    EXPECT_TRUE(receiver4.wait_for(1, 1000ms)) << "the small datagram opens the flow";
    Stats after4 = dp_->stats();
    EXPECT_EQ(learnt_mtu("2001:db8::2"), 1280) << "moved: " << moved(after4, dp_->stats());
    EXPECT_TRUE(receiver6.wait_for(1, 1000ms));
    Stats after = dp_->stats();
    // the small datagrams by their rule, the errors as related to the flows
    EXPECT_GE(packets(after, "tracked") - packets(before, "tracked"), 2u);
}

// ---------------------------------------------------------------------------
// Failsafe: the server's address is identity host
// ---------------------------------------------------------------------------

class FailsafeIntegration : public CgroupIntegration {
protected:
    Options options() override
    {
        Options o = test_options(pin_->path());
        o.host_addresses = std::vector<Prefix>{*Prefix::parse(std::string(kServer4) + "/32"),
                                               *Prefix::parse(std::string(kServer6) + "/128")};
        return o;
    }
};

TEST_F(FailsafeIntegration, SshStaysReachableUnderADenyAllPolicy)
{
    apply(R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: enforce}
failsafe: {ports: [tcp/22], from: [198.51.100.0/24, "2001:db8::/64"]}
rules:
  - {name: deny-all, from: any, to: any, ports: [any], action: deny}
)");
    netlab::TcpServer ssh4(*server_, kServer4, 22);
    netlab::TcpServer ssh6(*server_, kServer6, 22);
    netlab::TcpServer web(*server_, kServer4, kAllowedTcp);

    Stats before = dp_->stats();
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, 22), netlab::ConnectResult::connected);
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer6, 22), netlab::ConnectResult::connected);
    EXPECT_EQ(netlab::tcp_connect(*client_, kServer4, kAllowedTcp, 1000ms),
              netlab::ConnectResult::timeout);
    Stats after = dp_->stats();
    EXPECT_EQ(packets(after, "failsafe") - packets(before, "failsafe"), 2u)
        << "moved: " << moved(before, after);
}

}  // namespace
}  // namespace bulkhead::test
