// netlab: a small network lab for the demo and the integration tests.
//
// It builds network namespaces joined by veth pairs (directly, or through a
// bridge in a "switch" namespace), runs sockets, pings and whole processes
// inside them, and creates child cgroups under a bulkhead-owned cgroup. Every
// object is RAII: it removes what it made when it goes out of scope, and it is
// also listed in a process-wide cleanup registry so that a SIGINT or SIGTERM
// handler can remove it (see install_signal_cleanup()).
//
// Safety: nothing here touches the root network namespace's interfaces or
// routes, or the root cgroup. Commands that configure a namespace run as
// `ip -n NAME ...`; code that must run inside a namespace switches only the
// calling thread's network namespace with setns(CLONE_NEWNET), never the mount
// namespace, so pins under /sys/fs/bpf stay visible (`ip netns exec` would
// remount /sys and hide them).
//
// Everything needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN). Failures throw
// bulkhead::Error whose message names the action, the object and the cause.
#pragma once

#include <bulkhead/types.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace bulkhead::netlab {

using namespace std::chrono_literals;

// Owns one file descriptor; closes it on destruction. Move-only.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& other) noexcept : fd_(other.release()) {}
    Fd& operator=(Fd&& other) noexcept;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    int release() noexcept;
    void reset(int fd = -1) noexcept;

private:
    int fd_ = -1;
};

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

class NetNs;

struct CommandResult {
    int exit_code = 0;  // the exit status, or 128 + signal number if killed
    std::string out;    // captured stdout
    std::string err;    // captured stderr
};

// Runs argv (argv[0] is looked up in PATH) with fork and exec, no shell, and
// waits for it. With `ns`, the child enters that network namespace (and only
// that) before exec. Throws only when the command cannot be started (not
// found, fork failed); a non-zero exit is reported in the result.
CommandResult run_command(const std::vector<std::string>& argv, const NetNs* ns = nullptr);

// As run_command(), but throws Error naming the command line, its exit status
// and its stderr when it exits non-zero. Returns its stdout.
std::string run_checked(const std::vector<std::string>& argv, const NetNs* ns = nullptr);

// ---------------------------------------------------------------------------
// Namespaces and links
// ---------------------------------------------------------------------------

// A named network namespace, "bh-<pid>-<tag>" (with "-2", "-3"... when the
// same tag is used again by this process), created with `ip netns add` and
// deleted with `ip netns del` on destruction (which also deletes the veth ends
// inside it). Its loopback is brought up. A stale namespace of the same name
// (left by a dead process that had our pid) is removed first.
class NetNs {
public:
    explicit NetNs(std::string_view tag);
    NetNs(NetNs&&) noexcept;
    NetNs& operator=(NetNs&&) = delete;
    NetNs(const NetNs&) = delete;
    NetNs& operator=(const NetNs&) = delete;
    ~NetNs();

    const std::string& name() const noexcept { return name_; }
    // "/run/netns/NAME": usable with nsenter --net=PATH.
    std::filesystem::path path() const;
    // An open fd on the namespace, for setns().
    int fd() const noexcept { return fd_.get(); }

    // Runs `ip -n NAME ARGS...` and throws on failure; returns its stdout.
    std::string ip(const std::vector<std::string>& args) const;

private:
    std::string name_;
    Fd fd_;
    std::uint64_t cleanup_token_ = 0;
};

// Adds an address in CIDR notation ("198.51.100.10/24", "2001:db8::10/64") to
// `ifname` inside `ns`. IPv6 addresses are added with `nodad`, so they are
// usable at once.
void add_address(const NetNs& ns, const std::string& ifname, const std::string& cidr);

// Adds an on-link route for `prefix` through `ifname` inside `ns`, such as a
// route to 203.0.113.0/24 on a LAN whose hosts use different subnets.
void add_route(const NetNs& ns, const std::string& prefix, const std::string& ifname);

// A veth pair: `a_if` inside `a`, `b_if` inside `b`, both up. The pair is
// created inside `a` and its peer moved straight into `b`, so it never exists
// in the root namespace. Deleted on destruction (if the namespaces still
// exist; deleting a namespace deletes its ends anyway). Interface names must be
// at most 15 characters; they only need to be unique inside their namespace.
class VethPair {
public:
    VethPair(const NetNs& a, std::string a_if, const NetNs& b, std::string b_if);
    VethPair(VethPair&&) noexcept;
    VethPair& operator=(VethPair&&) = delete;
    VethPair(const VethPair&) = delete;
    VethPair& operator=(const VethPair&) = delete;
    ~VethPair();

    const std::string& a_if() const noexcept { return a_if_; }
    const std::string& b_if() const noexcept { return b_if_; }

private:
    std::string a_ns_;  // namespace names, not references: a pair may outlive a NetNs
    std::string a_if_;
    std::string b_if_;
    bool owned_ = true;
};

// One layer-2 segment: a bridge "br0" in its own "switch" namespace. Each
// join() plugs a namespace into it with a veth pair, so any number of hosts
// share one segment, and each host has one interface (where XDP attaches).
// Multicast snooping is off, so IPv6 neighbour discovery is always flooded.
class Lan {
public:
    explicit Lan(std::string_view tag = "lan");

    // Plugs `ns` into the segment through a veth named `ifname` inside `ns`,
    // adds `addresses` (CIDR notation, IPv4 or IPv6) to it and brings it up.
    void join(const NetNs& ns, const std::string& ifname,
              const std::vector<std::string>& addresses);

    const NetNs& switch_ns() const noexcept { return switch_; }

private:
    NetNs switch_;
    std::vector<VethPair> ports_;
};

// Switches the calling thread (only) into `ns` for the lifetime of the
// object and switches it back on destruction. Sockets created meanwhile stay
// in `ns` for their whole life, whichever thread uses them later.
class NetNsScope {
public:
    explicit NetNsScope(const NetNs& ns);
    NetNsScope(const NetNsScope&) = delete;
    NetNsScope& operator=(const NetNsScope&) = delete;
    ~NetNsScope();

private:
    Fd previous_;
};

// Runs fn() with the calling thread inside `ns`; returns what fn returns.
// The thread's namespace is restored also when fn throws.
template <typename Fn>
auto run_in_netns(const NetNs& ns, Fn&& fn) -> decltype(fn()) {
    NetNsScope scope(ns);
    return fn();
}

// ---------------------------------------------------------------------------
// Sockets inside namespaces. Addresses are text: "198.51.100.10",
// "2001:db8::10". Only EPERM (a cgroup hook refused the call) and the results
// listed are outcomes; any other failure throws.
// ---------------------------------------------------------------------------

// A TCP listener bound to addr:port inside `ns`. A background thread accepts
// connections, counts them and closes them at once; with `echo`, it first
// sends back the first bytes that arrive (within 500 ms): a request and its
// reply. Port 0 picks a free port.
class TcpServer {
public:
    TcpServer(const NetNs& ns, const std::string& addr, std::uint16_t port, bool echo = false);
    TcpServer(const TcpServer&) = delete;
    TcpServer& operator=(const TcpServer&) = delete;
    ~TcpServer();  // stops the thread and closes the socket

    std::uint16_t port() const noexcept { return port_; }
    std::uint64_t accepted() const noexcept { return accepted_.load(); }

private:
    void accept_loop();

    Fd listener_;
    Fd stop_;  // an eventfd; written to stop the thread
    std::uint16_t port_ = 0;
    bool echo_ = false;
    std::atomic<std::uint64_t> accepted_{0};
    std::thread thread_;
};

// Starts a TcpServer (the brief's name for it).
inline std::unique_ptr<TcpServer> tcp_listen(const NetNs& ns, const std::string& addr,
                                             std::uint16_t port, bool echo = false) {
    return std::make_unique<TcpServer>(ns, addr, port, echo);
}

enum class ConnectResult {
    connected,    // the handshake completed
    refused,      // RST: nothing listens there (ECONNREFUSED)
    timeout,      // no answer within the timeout: dropped on the way
    eperm,        // connect() failed with EPERM: a cgroup connect hook refused it
    unreachable,  // EHOSTUNREACH or ENETUNREACH: no route, or ICMP unreachable
};
std::string_view to_string(ConnectResult result);

// Connects from inside `ns` to dst:port, optionally binding to `src` first,
// and closes the connection. Waits at most `timeout` for the handshake.
ConnectResult tcp_connect(const NetNs& ns, const std::optional<std::string>& src,
                          const std::string& dst, std::uint16_t port,
                          std::chrono::milliseconds timeout = 1000ms);
inline ConnectResult tcp_connect(const NetNs& ns, const std::string& dst, std::uint16_t port,
                                 std::chrono::milliseconds timeout = 1000ms) {
    return tcp_connect(ns, std::nullopt, dst, port, timeout);
}

struct RequestResult {
    ConnectResult connect = ConnectResult::timeout;
    std::string reply;  // the first bytes that came back; empty if none did in time
};

// Connects as tcp_connect() does, sends `request`, waits at most `timeout`
// for the first bytes of a reply, and closes the connection.
RequestResult tcp_request(const NetNs& ns, const std::string& dst, std::uint16_t port,
                          std::string_view request, std::chrono::milliseconds timeout = 1000ms);

// A UDP socket bound to addr:port inside `ns`; a background thread counts the
// datagrams that arrive. Port 0 picks a free port.
class UdpReceiver {
public:
    UdpReceiver(const NetNs& ns, const std::string& addr, std::uint16_t port);
    UdpReceiver(const UdpReceiver&) = delete;
    UdpReceiver& operator=(const UdpReceiver&) = delete;
    ~UdpReceiver();

    std::uint16_t port() const noexcept { return port_; }
    std::uint64_t received() const noexcept { return received_.load(); }
    // Datagrams that came from source address `addr` (text, as given to
    // udp_send's src or configured on the sender), so flows from different
    // senders to one receiver can be told apart.
    std::uint64_t received_from(const std::string& addr) const;
    // Waits until at least `count` datagrams arrived in total (or, with
    // `from`, from that source address), or `timeout` passed; true if they
    // arrived.
    bool wait_for(std::uint64_t count, std::chrono::milliseconds timeout,
                  const std::optional<std::string>& from = std::nullopt) const;

private:
    void receive_loop();

    Fd socket_;
    Fd stop_;
    std::uint16_t port_ = 0;
    std::atomic<std::uint64_t> received_{0};
    mutable std::mutex mutex_;
    std::map<std::string, std::uint64_t> by_source_;  // canonical address text -> datagrams
    std::thread thread_;
};

// Sends `count` datagrams of `payload` from inside `ns` to dst:port with an
// unconnected socket (sendto), optionally bound to `src`. Returns how many
// the kernel accepted; a send refused with EPERM (a cgroup sendmsg hook) is
// not counted. Other errors throw.
int udp_send(const NetNs& ns, const std::optional<std::string>& src, const std::string& dst,
             std::uint16_t port, int count = 1, std::string_view payload = "bulkhead");

// For a child of run_in_cgroup(), whose socket must be made inside the
// cgroup: listens on addr:port in the calling thread's network namespace,
// writes one byte to `ready_fd` once it listens, and waits at most `timeout`
// for a connection. True if one was accepted.
bool tcp_accept_once(const std::string& addr, std::uint16_t port, int ready_fd,
                     std::chrono::milliseconds timeout);

// One ICMP or ICMPv6 echo from inside `ns` to `dst` with `ping -n -q -c1`
// (fork, setns, exec): true if the reply arrived within `timeout` (rounded
// up to whole seconds, at least one).
bool ping(const NetNs& ns, const std::string& dst, std::chrono::milliseconds timeout = 1000ms);

// ---------------------------------------------------------------------------
// cgroup v2
// ---------------------------------------------------------------------------

// The cgroup v2 mount point, from /proc/self/mountinfo (on a hybrid host,
// e.g. /sys/fs/cgroup/unified). Throws if there is none.
std::filesystem::path cgroup2_mount();

// A child cgroup "<mount>/<parent>/bh-<pid>-<tag>[-N]", created on
// construction together with any missing level of `parent`: a path relative
// to the cgroup v2 mount whose first level is bulkhead's ("bulkhead-netlab",
// "bulkhead-demo/agent"), so the root cgroup itself is never touched.
// Removed on destruction, and by cleanup_all(): processes still in it (only
// run_in_cgroup puts any there) are killed first; then every level of
// `parent` that is empty is removed too.
class Cgroup {
public:
    explicit Cgroup(std::string_view tag,
                    const std::filesystem::path& parent = "bulkhead-netlab");
    Cgroup(const Cgroup&) = delete;
    Cgroup& operator=(const Cgroup&) = delete;
    ~Cgroup();

    const std::filesystem::path& path() const noexcept { return path_; }
    // The cgroup id (the directory's inode number), as BPF sees it.
    std::uint64_t id() const;

private:
    std::filesystem::path path_;
    int levels_ = 0;  // levels of `parent`
    std::uint64_t cleanup_token_ = 0;
};

// Forks a child, moves it into `cgroup` (and, with `ns`, into that network
// namespace), runs fn() there and exits with its return value (0-255).
// Returns that exit code; kills the child and throws if it runs longer than
// `timeout`, or if it died of a signal or threw (reported as exit 255).
// fn runs in a forked copy of a possibly multi-threaded process: keep it to
// socket calls and the helpers above.
int run_in_cgroup(const Cgroup& cgroup, const std::function<int()>& fn,
                  const NetNs* ns = nullptr, std::chrono::milliseconds timeout = 10000ms);

// ---------------------------------------------------------------------------
// Cleanup on signals
// ---------------------------------------------------------------------------

// Registers fn to run at cleanup_all(); returns a token for
// remove_cleanup(). NetNs and Cgroup register themselves.
std::uint64_t add_cleanup(std::function<void()> fn);
void remove_cleanup(std::uint64_t token) noexcept;

// Runs every registered cleanup, newest first, once; errors are printed to
// stderr and do not stop the others.
void cleanup_all() noexcept;

// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and starts a thread
// that waits for them; on one it runs cleanup_all() and exits the process
// with status 128 + signal. Call it from main() before any other thread
// starts, so every thread inherits the mask. Children started by the helpers
// above get the default mask back.
void install_signal_cleanup();

}  // namespace bulkhead::netlab
