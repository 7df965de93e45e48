// netlab: namespaces, veth pairs, sockets and cgroups for the demo and tests.
#include "netlab.hpp"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

namespace bulkhead::netlab {

namespace {

[[noreturn]] void fail_errno(const std::string& action, int err, std::string_view hint = {}) {
    std::string msg = fmt::format("{}: {} (errno {})", action, std::strerror(err), err);
    if (!hint.empty()) msg += fmt::format("; {}", hint);
    throw Error(msg, err);
}

std::string join(const std::vector<std::string>& argv) {
    std::string out;
    for (const auto& arg : argv) {
        if (!out.empty()) out += ' ';
        out += arg;
    }
    return out;
}

std::string trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
    return s;
}

// Looks argv[0] up in PATH in the parent, so the child only has to execv().
std::string resolve_program(const std::string& name) {
    if (name.find('/') != std::string::npos) return name;

    const char* env = std::getenv("PATH");
    std::string path = env ? env : "";
    // Root's usual directories, also when PATH lacks them (sudo, cron).
    path += ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    std::stringstream dirs(path);
    for (std::string dir; std::getline(dirs, dir, ':');) {
        if (dir.empty()) continue;
        std::string candidate = dir + "/" + name;
        if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    throw Error(fmt::format("cannot run '{}': not found in PATH; install it (scripts/deps.sh "
                            "installs every tool bulkhead uses)", name));
}

// Restores the default signal mask in a forked child: install_signal_cleanup()
// blocks SIGINT and SIGTERM in the parent, and exec keeps the mask.
void unblock_signals_in_child() {
    sigset_t all;
    sigemptyset(&all);
    pthread_sigmask(SIG_SETMASK, &all, nullptr);
}

// Writes a message and exits; async-signal-safe, for forked children.
[[noreturn]] void child_fail(int fd, const char* what) {
    int err = errno;
    ssize_t ignored = ::write(fd, what, std::strlen(what));
    const char* why = std::strerror(err);  // glibc's table; no allocation for known errnos
    ignored = ::write(fd, ": ", 2);
    ignored = ::write(fd, why, std::strlen(why));
    (void)ignored;
    ::_exit(127);
}

std::string read_all(int fd) {
    std::string out;
    char buf[4096];
    for (;;) {
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n > 0) {
            out.append(buf, static_cast<std::size_t>(n));
        } else if (n == 0 || errno != EINTR) {
            return out;
        }
    }
}

int wait_exit_code(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) fail_errno(fmt::format("cannot wait for child {}", pid), errno);
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}

// ---- the cleanup registry ----

std::mutex& registry_mutex() {
    static std::mutex m;
    return m;
}

std::map<std::uint64_t, std::function<void()>>& registry() {
    static std::map<std::uint64_t, std::function<void()>> r;
    return r;
}

// "bh-<pid>-<tag>", then "bh-<pid>-<tag>-2", ... for the same tag.
std::string unique_name(std::string_view tag) {
    static std::mutex m;
    static std::map<std::string, int> uses;
    std::lock_guard lock(m);

    int n = ++uses[std::string(tag)];
    std::string name = fmt::format("bh-{}-{}", ::getpid(), tag);
    if (n > 1) name += fmt::format("-{}", n);
    return name;
}

// ---- socket addresses ----

struct SockAddr {
    sockaddr_storage storage{};
    socklen_t len = 0;

    int family() const { return storage.ss_family; }
    const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

SockAddr make_sockaddr(const std::string& text, std::uint16_t port) {
    SockAddr sa;
    auto* v4 = reinterpret_cast<sockaddr_in*>(&sa.storage);
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&sa.storage);

    if (::inet_pton(AF_INET, text.c_str(), &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        sa.len = sizeof(sockaddr_in);
    } else if (::inet_pton(AF_INET6, text.c_str(), &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        sa.len = sizeof(sockaddr_in6);
    } else {
        throw Error(fmt::format("cannot use address '{}': not an IPv4 or IPv6 address; write it "
                                "as 198.51.100.10 or 2001:db8::10", text));
    }
    return sa;
}

// The address of `sa` as inet_ntop writes it: one canonical text per address.
std::string address_text(const SockAddr& sa) {
    char text[INET6_ADDRSTRLEN] = {};
    if (sa.family() == AF_INET) {
        ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&sa.storage)->sin_addr, text,
                    sizeof text);
    } else {
        ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&sa.storage)->sin6_addr,
                    text, sizeof text);
    }
    return text;
}

std::uint16_t bound_port(int fd) {
    SockAddr sa;
    sa.len = sizeof sa.storage;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&sa.storage), &sa.len) < 0) {
        fail_errno("cannot read the bound address of a socket", errno);
    }
    if (sa.family() == AF_INET) {
        return ntohs(reinterpret_cast<const sockaddr_in*>(&sa.storage)->sin_port);
    }
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&sa.storage)->sin6_port);
}

Fd open_socket(int family, int type) {
    Fd fd(::socket(family, type | SOCK_CLOEXEC, 0));
    if (!fd) fail_errno("cannot create a socket", errno);
    return fd;
}

void bind_to(const Fd& fd, const SockAddr& sa, const std::string& what) {
    if (sa.family() == AF_INET6) {
        int one = 1;
        ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    }
    if (::bind(fd.get(), sa.get(), sa.len) < 0) {
        fail_errno(fmt::format("cannot bind a socket to {}", what), errno,
                   "check that the address is configured in this namespace");
    }
}

Fd make_eventfd() {
    Fd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!fd) fail_errno("cannot create an eventfd", errno);
    return fd;
}

void signal_stop(const Fd& stop) {
    std::uint64_t one = 1;
    ssize_t n = ::write(stop.get(), &one, sizeof one);
    (void)n;  // an eventfd write of 1 cannot fail short of overflow
}

// Waits until `fd` is readable or `stop` is signalled; false on stop.
// Sends back the first bytes that arrive on `conn` within 500 ms.
void echo_once(const Fd& conn) {
    pollfd p = {conn.get(), POLLIN, 0};
    if (::poll(&p, 1, 500) != 1) return;
    char buf[512];
    ssize_t n = ::recv(conn.get(), buf, sizeof buf, 0);
    if (n > 0) (void)::send(conn.get(), buf, static_cast<std::size_t>(n), MSG_NOSIGNAL);
}

bool wait_readable(const Fd& fd, const Fd& stop) {
    pollfd fds[2] = {{fd.get(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
    for (;;) {
        int n = ::poll(fds, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return false;
        if (fds[1].revents != 0) return false;
        return true;
    }
}

}  // namespace

// ---------------------------------------------------------------------------
// Fd
// ---------------------------------------------------------------------------

Fd& Fd::operator=(Fd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
}

int Fd::release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
}

void Fd::reset(int fd) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

CommandResult run_command(const std::vector<std::string>& argv, const NetNs* ns) {
    if (argv.empty()) throw Error("cannot run an empty command line");

    // Everything the child needs is prepared before fork(): after it, only
    // async-signal-safe calls are allowed in a multi-threaded process.
    std::string program = resolve_program(argv[0]);
    std::vector<char*> args;
    for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);

    int out[2];
    int err[2];
    if (::pipe2(out, O_CLOEXEC) < 0) fail_errno("cannot create a pipe", errno);
    Fd out_r(out[0]), out_w(out[1]);
    if (::pipe2(err, O_CLOEXEC) < 0) fail_errno("cannot create a pipe", errno);
    Fd err_r(err[0]), err_w(err[1]);
    int ns_fd = ns ? ns->fd() : -1;

    pid_t pid = ::fork();
    if (pid < 0) fail_errno(fmt::format("cannot fork to run `{}`", join(argv)), errno);
    if (pid == 0) {
        unblock_signals_in_child();
        int devnull = ::open("/dev/null", O_RDONLY);
        if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
        ::dup2(out_w.get(), STDOUT_FILENO);
        ::dup2(err_w.get(), STDERR_FILENO);
        if (ns_fd >= 0 && ::setns(ns_fd, CLONE_NEWNET) < 0) {
            child_fail(STDERR_FILENO, "cannot enter the network namespace");
        }
        ::execv(program.c_str(), args.data());
        child_fail(STDERR_FILENO, "cannot execute the program");
    }

    out_w.reset();
    err_w.reset();

    // Drain both pipes together so neither can fill up and block the child.
    CommandResult result;
    pollfd fds[2] = {{out_r.get(), POLLIN, 0}, {err_r.get(), POLLIN, 0}};
    std::string* sinks[2] = {&result.out, &result.err};
    int open_pipes = 2;
    while (open_pipes > 0) {
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || fds[i].revents == 0) continue;
            char buf[4096];
            ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
            if (n > 0) {
                sinks[i]->append(buf, static_cast<std::size_t>(n));
            } else if (n == 0 || errno != EINTR) {
                fds[i].fd = -1;
                --open_pipes;
            }
        }
    }

    result.exit_code = wait_exit_code(pid);
    return result;
}

std::string run_checked(const std::vector<std::string>& argv, const NetNs* ns) {
    CommandResult r = run_command(argv, ns);
    if (r.exit_code != 0) {
        std::string where = ns ? fmt::format(" in network namespace {}", ns->name()) : "";
        throw Error(fmt::format("command `{}`{} failed with exit status {}: {}", join(argv),
                                where, r.exit_code, trim(r.err.empty() ? r.out : r.err)));
    }
    return r.out;
}

// ---------------------------------------------------------------------------
// Namespaces and links
// ---------------------------------------------------------------------------

NetNs::NetNs(std::string_view tag) : name_(unique_name(tag)) {
    // Our pid is in the name, so an existing namespace of that name was left
    // by a dead process that had the same pid: remove it.
    if (std::filesystem::exists(path())) run_command({"ip", "netns", "del", name_});

    run_checked({"ip", "netns", "add", name_});
    cleanup_token_ = add_cleanup([name = name_] { run_command({"ip", "netns", "del", name}); });

    try {
        fd_.reset(::open(path().c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd_) {
            fail_errno(fmt::format("cannot open network namespace {}", path().string()), errno);
        }
        ip({"link", "set", "lo", "up"});
    } catch (...) {
        remove_cleanup(cleanup_token_);
        run_command({"ip", "netns", "del", name_});
        throw;
    }
}

NetNs::NetNs(NetNs&& other) noexcept
    : name_(std::move(other.name_)), fd_(std::move(other.fd_)),
      cleanup_token_(other.cleanup_token_) {
    other.name_.clear();
    other.cleanup_token_ = 0;
}

NetNs::~NetNs() {
    if (name_.empty()) return;
    remove_cleanup(cleanup_token_);
    fd_.reset();
    if (!std::filesystem::exists(path())) return;  // removed already (cleanup_all on a signal)
    try {
        CommandResult r = run_command({"ip", "netns", "del", name_});
        if (r.exit_code != 0) {
            std::fprintf(stderr, "netlab: cannot delete network namespace %s: %s\n",
                         name_.c_str(), trim(r.err).c_str());
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "netlab: cannot delete network namespace %s: %s\n", name_.c_str(),
                     e.what());
    }
}

std::filesystem::path NetNs::path() const {
    return std::filesystem::path("/run/netns") / name_;
}

std::string NetNs::ip(const std::vector<std::string>& args) const {
    std::vector<std::string> argv = {"ip", "-n", name_};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_checked(argv);
}

void add_address(const NetNs& ns, const std::string& ifname, const std::string& cidr) {
    bool v6 = cidr.find(':') != std::string::npos;
    std::vector<std::string> args = {"addr", "add", cidr, "dev", ifname};
    if (v6) args.push_back("nodad");  // no duplicate address detection delay
    ns.ip(args);
}

void add_route(const NetNs& ns, const std::string& prefix, const std::string& ifname) {
    ns.ip({"route", "add", prefix, "dev", ifname});
}

VethPair::VethPair(const NetNs& a, std::string a_if, const NetNs& b, std::string b_if)
    : a_ns_(a.name()), a_if_(std::move(a_if)), b_if_(std::move(b_if)) {
    a.ip({"link", "add", a_if_, "type", "veth", "peer", "name", b_if_, "netns", b.name()});
    try {
        a.ip({"link", "set", a_if_, "up"});
        b.ip({"link", "set", b_if_, "up"});
    } catch (...) {
        run_command({"ip", "-n", a_ns_, "link", "del", a_if_});
        throw;
    }
}

VethPair::VethPair(VethPair&& other) noexcept
    : a_ns_(std::move(other.a_ns_)), a_if_(std::move(other.a_if_)),
      b_if_(std::move(other.b_if_)), owned_(other.owned_) {
    other.owned_ = false;
}

VethPair::~VethPair() {
    if (!owned_) return;
    // Fails harmlessly when the namespace, and with it the pair, is gone.
    if (std::filesystem::exists(std::filesystem::path("/run/netns") / a_ns_)) {
        try {
            run_command({"ip", "-n", a_ns_, "link", "del", a_if_});
        } catch (const std::exception&) {
            // nothing more to do: the namespace's deletion removes the pair
        }
    }
}

Lan::Lan(std::string_view tag) : switch_(tag) {
    switch_.ip({"link", "add", "br0", "type", "bridge", "mcast_snooping", "0"});
    switch_.ip({"link", "set", "br0", "up"});
}

void Lan::join(const NetNs& ns, const std::string& ifname,
               const std::vector<std::string>& addresses) {
    std::string port = fmt::format("p{}", ports_.size());
    ports_.emplace_back(ns, ifname, switch_, port);
    switch_.ip({"link", "set", port, "master", "br0"});
    for (const auto& cidr : addresses) add_address(ns, ifname, cidr);
}

NetNsScope::NetNsScope(const NetNs& ns) {
    previous_.reset(::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
    if (!previous_) fail_errno("cannot open this thread's network namespace", errno);
    if (::setns(ns.fd(), CLONE_NEWNET) < 0) {
        fail_errno(fmt::format("cannot enter network namespace {}", ns.name()), errno,
                   "it needs CAP_SYS_ADMIN; run as root");
    }
}

NetNsScope::~NetNsScope() {
    if (::setns(previous_.get(), CLONE_NEWNET) < 0) {
        // A thread left in a lab namespace would act there from now on.
        std::fprintf(stderr, "netlab: cannot return to the previous network namespace: %s\n",
                     std::strerror(errno));
        std::abort();
    }
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

TcpServer::TcpServer(const NetNs& ns, const std::string& addr, std::uint16_t port, bool echo)
    : echo_(echo) {
    SockAddr sa = make_sockaddr(addr, port);
    {
        NetNsScope scope(ns);
        listener_ = open_socket(sa.family(), SOCK_STREAM | SOCK_NONBLOCK);
    }
    int one = 1;
    ::setsockopt(listener_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);

    std::string what = fmt::format("TCP {} port {} in {}", addr, port, ns.name());
    bind_to(listener_, sa, what);
    if (::listen(listener_.get(), 128) < 0) {
        fail_errno(fmt::format("cannot listen on {}", what), errno);
    }
    port_ = bound_port(listener_.get());

    stop_ = make_eventfd();
    thread_ = std::thread([this] { accept_loop(); });
}

TcpServer::~TcpServer() {
    signal_stop(stop_);
    if (thread_.joinable()) thread_.join();
}

void TcpServer::accept_loop() {
    while (wait_readable(listener_, stop_)) {
        for (;;) {
            Fd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
            if (!conn) break;  // EAGAIN: drained; anything else: try again on the next wakeup
            accepted_.fetch_add(1);
            if (echo_) echo_once(conn);
        }
    }
}

std::string_view to_string(ConnectResult result) {
    switch (result) {
    case ConnectResult::connected: return "connected";
    case ConnectResult::refused: return "refused";
    case ConnectResult::timeout: return "timeout";
    case ConnectResult::eperm: return "EPERM";
    case ConnectResult::unreachable: return "unreachable";
    }
    return "?";
}

namespace {

std::optional<ConnectResult> classify_connect_error(int err) {
    switch (err) {
    case 0: return ConnectResult::connected;
    case ECONNREFUSED: return ConnectResult::refused;
    case ETIMEDOUT: return ConnectResult::timeout;
    case EPERM:
    case EACCES: return ConnectResult::eperm;
    case EHOSTUNREACH:
    case ENETUNREACH: return ConnectResult::unreachable;
    default: return std::nullopt;
    }
}

}  // namespace

namespace {

// Connects `fd` (non-blocking) to `to`, waiting at most `timeout`.
ConnectResult connect_within(const Fd& fd, const SockAddr& to, const std::string& what,
                             std::chrono::milliseconds timeout) {
    int err = 0;
    if (::connect(fd.get(), to.get(), to.len) < 0) err = errno;
    if (err == EINPROGRESS) {
        pollfd p = {fd.get(), POLLOUT, 0};
        int n;
        do {
            n = ::poll(&p, 1, static_cast<int>(timeout.count()));
        } while (n < 0 && errno == EINTR);
        if (n < 0) fail_errno(fmt::format("cannot wait for connect to {}", what), errno);
        if (n == 0) return ConnectResult::timeout;

        socklen_t len = sizeof err;
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    }

    if (auto result = classify_connect_error(err)) return *result;
    fail_errno(fmt::format("cannot connect to {}", what), err);
}

}  // namespace

ConnectResult tcp_connect(const NetNs& ns, const std::optional<std::string>& src,
                          const std::string& dst, std::uint16_t port,
                          std::chrono::milliseconds timeout) {
    SockAddr to = make_sockaddr(dst, port);
    std::string what = fmt::format("TCP {} port {} from {}", dst, port, ns.name());

    Fd fd;
    {
        NetNsScope scope(ns);
        fd = open_socket(to.family(), SOCK_STREAM | SOCK_NONBLOCK);
    }
    if (src) bind_to(fd, make_sockaddr(*src, 0), *src);
    return connect_within(fd, to, what, timeout);
}

RequestResult tcp_request(const NetNs& ns, const std::string& dst, std::uint16_t port,
                          std::string_view request, std::chrono::milliseconds timeout) {
    SockAddr to = make_sockaddr(dst, port);
    std::string what = fmt::format("TCP {} port {} from {}", dst, port, ns.name());

    Fd fd;
    {
        NetNsScope scope(ns);
        fd = open_socket(to.family(), SOCK_STREAM | SOCK_NONBLOCK);
    }
    RequestResult result;
    result.connect = connect_within(fd, to, what, timeout);
    if (result.connect != ConnectResult::connected) return result;

    if (::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL) < 0) {
        fail_errno(fmt::format("cannot send a request over {}", what), errno);
    }
    pollfd p = {fd.get(), POLLIN, 0};
    int n;
    do {
        n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    } while (n < 0 && errno == EINTR);
    char buf[512];
    ssize_t got = n == 1 ? ::recv(fd.get(), buf, sizeof buf, 0) : 0;
    if (got > 0) result.reply.assign(buf, static_cast<std::size_t>(got));
    return result;
}

UdpReceiver::UdpReceiver(const NetNs& ns, const std::string& addr, std::uint16_t port) {
    SockAddr sa = make_sockaddr(addr, port);
    {
        NetNsScope scope(ns);
        socket_ = open_socket(sa.family(), SOCK_DGRAM | SOCK_NONBLOCK);
    }
    bind_to(socket_, sa, fmt::format("UDP {} port {} in {}", addr, port, ns.name()));
    port_ = bound_port(socket_.get());

    stop_ = make_eventfd();
    thread_ = std::thread([this] { receive_loop(); });
}

UdpReceiver::~UdpReceiver() {
    signal_stop(stop_);
    if (thread_.joinable()) thread_.join();
}

void UdpReceiver::receive_loop() {
    char buf[2048];
    while (wait_readable(socket_, stop_)) {
        for (;;) {
            SockAddr from;
            from.len = sizeof from.storage;
            auto* sa = reinterpret_cast<sockaddr*>(&from.storage);
            if (::recvfrom(socket_.get(), buf, sizeof buf, 0, sa, &from.len) < 0) break;

            std::lock_guard lock(mutex_);
            ++by_source_[address_text(from)];
            received_.fetch_add(1);
        }
    }
}

std::uint64_t UdpReceiver::received_from(const std::string& addr) const {
    std::string key = address_text(make_sockaddr(addr, 0));  // canonical form
    std::lock_guard lock(mutex_);
    auto it = by_source_.find(key);
    return it == by_source_.end() ? 0 : it->second;
}

bool UdpReceiver::wait_for(std::uint64_t count, std::chrono::milliseconds timeout,
                           const std::optional<std::string>& from) const {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while ((from ? received_from(*from) : received()) < count) {
        if (std::chrono::steady_clock::now() >= deadline) return false;
        std::this_thread::sleep_for(5ms);
    }
    return true;
}

int udp_send(const NetNs& ns, const std::optional<std::string>& src, const std::string& dst,
             std::uint16_t port, int count, std::string_view payload) {
    SockAddr to = make_sockaddr(dst, port);

    Fd fd;
    {
        NetNsScope scope(ns);
        fd = open_socket(to.family(), SOCK_DGRAM);
    }
    if (src) bind_to(fd, make_sockaddr(*src, 0), *src);

    int sent = 0;
    for (int i = 0; i < count; ++i) {
        ssize_t n = ::sendto(fd.get(), payload.data(), payload.size(), 0, to.get(), to.len);
        if (n >= 0) {
            ++sent;
        } else if (errno != EPERM) {
            fail_errno(fmt::format("cannot send UDP to {} port {} from {}", dst, port, ns.name()),
                       errno);
        }
    }
    return sent;
}

bool tcp_accept_once(const std::string& addr, std::uint16_t port, int ready_fd,
                     std::chrono::milliseconds timeout) {
    SockAddr sa = make_sockaddr(addr, port);
    Fd listener = open_socket(sa.family(), SOCK_STREAM);
    int one = 1;
    ::setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);

    std::string what = fmt::format("TCP {} port {}", addr, port);
    bind_to(listener, sa, what);
    if (::listen(listener.get(), 8) < 0) {
        fail_errno(fmt::format("cannot listen on {}", what), errno);
    }
    if (::write(ready_fd, "r", 1) != 1) {
        fail_errno("cannot report that the listener is ready", errno);
    }

    pollfd p = {listener.get(), POLLIN, 0};
    int n;
    do {
        n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return false;
    Fd accepted(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    return static_cast<bool>(accepted);
}

bool ping(const NetNs& ns, const std::string& dst, std::chrono::milliseconds timeout) {
    auto seconds = std::max<long long>(1, (timeout.count() + 999) / 1000);
    CommandResult r = run_command(
        {"ping", "-n", "-q", "-c", "1", "-W", std::to_string(seconds), dst}, &ns);
    return r.exit_code == 0;
}

// ---------------------------------------------------------------------------
// cgroup v2
// ---------------------------------------------------------------------------

namespace {

// mountinfo escapes blanks in paths as \040 (octal).
std::string unescape_mount_path(const std::string& s) {
    std::string out;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\\' && i + 3 < s.size()) {
            int value = 0;
            auto [end, ec] = std::from_chars(s.data() + i + 1, s.data() + i + 4, value, 8);
            if (ec == std::errc() && end == s.data() + i + 4) {
                out += static_cast<char>(value);
                i += 3;
                continue;
            }
        }
        out += s[i];
    }
    return out;
}

// Kills what is still in a cgroup. Only this process puts processes there
// (run_in_cgroup's children), so every pid listed is one of ours.
void kill_members(const std::filesystem::path& cgroup) noexcept {
    std::ifstream procs(cgroup / "cgroup.procs");
    for (pid_t pid = 0; procs >> pid;) {
        if (pid > 0) ::kill(pid, SIGKILL);
    }
}

// Removes the cgroup, waiting while processes just killed keep it busy,
// then each of its `levels` parents that is empty (another user of a shared
// parent keeps it busy; that is fine).
void remove_cgroup(const std::filesystem::path& path, int levels) noexcept {
    kill_members(path);
    for (int attempt = 0; attempt < 100; ++attempt) {
        if (::rmdir(path.c_str()) == 0 || errno == ENOENT) break;
        if (errno != EBUSY) {
            std::fprintf(stderr, "netlab: cannot remove cgroup %s: %s\n", path.c_str(),
                         std::strerror(errno));
            return;
        }
        std::this_thread::sleep_for(10ms);
    }
    std::filesystem::path parent = path.parent_path();
    for (int level = 0; level < levels && ::rmdir(parent.c_str()) == 0; ++level) {
        parent = parent.parent_path();
    }
}

// Checks `parent` as Cgroup takes it: relative and normal, every level a
// plain name, the first one bulkhead's.
void check_cgroup_parent(const std::filesystem::path& parent) {
    bool plain = !parent.empty() && parent.is_relative() && parent.lexically_normal() == parent;
    for (const auto& part : parent) plain = plain && part != ".." && part != ".";
    if (!plain || parent.begin()->string().rfind("bulkhead", 0) != 0) {
        throw Error(fmt::format("cannot create a cgroup under '{}': expected a path relative to "
                                "the cgroup v2 mount whose first level is bulkhead's, such as "
                                "bulkhead-netlab or bulkhead-demo/agent", parent.string()));
    }
}

}  // namespace

std::filesystem::path cgroup2_mount() {
    std::ifstream in("/proc/self/mountinfo");
    for (std::string line; std::getline(in, line);) {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        auto dash = line.find(" - ");
        if (dash == std::string::npos) continue;
        std::istringstream after(line.substr(dash + 3));
        std::string fstype;
        after >> fstype;
        if (fstype != "cgroup2") continue;

        std::istringstream fields(line.substr(0, dash));
        std::string id, parent, dev, root, mount_point;
        fields >> id >> parent >> dev >> root >> mount_point;
        return unescape_mount_path(mount_point);
    }
    throw Error("cannot find a cgroup v2 mount in /proc/self/mountinfo; mount one with "
                "`mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with the unified "
                "hierarchy");
}

Cgroup::Cgroup(std::string_view tag, const std::filesystem::path& parent) {
    check_cgroup_parent(parent);
    const std::filesystem::path mount = cgroup2_mount();
    path_ = mount / parent / unique_name(tag);
    levels_ = static_cast<int>(std::distance(parent.begin(), parent.end()));

    // Another process may remove a shared parent between our mkdirs (it
    // removes it when it looks empty), so retry a few times.
    for (int attempt = 0;; ++attempt) {
        std::filesystem::path level = mount;
        for (const auto& part : parent) {
            level /= part;
            if (::mkdir(level.c_str(), 0755) < 0 && errno != EEXIST) {
                fail_errno(fmt::format("cannot create cgroup {}", level.string()), errno);
            }
        }
        if (::mkdir(path_.c_str(), 0755) == 0) break;
        int err = errno;
        if (err == EEXIST && attempt < 3) {
            remove_cgroup(path_, 0);  // left by a dead process that had our pid
            continue;
        }
        if (err == ENOENT && attempt < 5) continue;
        fail_errno(fmt::format("cannot create cgroup {}", path_.string()), err);
    }

    cleanup_token_ = add_cleanup([path = path_, levels = levels_] { remove_cgroup(path, levels); });
}

Cgroup::~Cgroup() {
    remove_cleanup(cleanup_token_);
    remove_cgroup(path_, levels_);
}

std::uint64_t Cgroup::id() const {
    struct stat st {};
    if (::stat(path_.c_str(), &st) < 0) {
        fail_errno(fmt::format("cannot stat cgroup {}", path_.string()), errno);
    }
    return st.st_ino;
}

int run_in_cgroup(const Cgroup& cgroup, const std::function<int()>& fn, const NetNs* ns,
                  std::chrono::milliseconds timeout) {
    std::string procs = (cgroup.path() / "cgroup.procs").string();
    int ns_fd = ns ? ns->fd() : -1;

    // The child reports a setup failure through this pipe; it stays empty
    // when fn ran.
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) < 0) fail_errno("cannot create a pipe", errno);
    Fd report_r(fds[0]), report_w(fds[1]);

    std::fflush(nullptr);  // or the child would write the parent's buffered output again
    pid_t pid = ::fork();
    if (pid < 0) fail_errno("cannot fork a child for the cgroup", errno);
    if (pid == 0) {
        unblock_signals_in_child();
        int procs_fd = ::open(procs.c_str(), O_WRONLY | O_CLOEXEC);
        if (procs_fd < 0) child_fail(report_w.get(), "cannot open cgroup.procs");
        char pid_text[16];
        auto [end, ec] = std::to_chars(pid_text, pid_text + sizeof pid_text, ::getpid());
        (void)ec;
        if (::write(procs_fd, pid_text, static_cast<std::size_t>(end - pid_text)) < 0) {
            child_fail(report_w.get(), "cannot move the child into the cgroup");
        }
        ::close(procs_fd);
        if (ns_fd >= 0 && ::setns(ns_fd, CLONE_NEWNET) < 0) {
            child_fail(report_w.get(), "cannot enter the network namespace");
        }
        int rc = 255;
        try {
            rc = fn();
        } catch (...) {
            rc = 255;
        }
        ::_exit(rc & 0xff);
    }
    report_w.reset();

    Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (pidfd) {
        pollfd p = {pidfd.get(), POLLIN, 0};
        int n;
        do {
            n = ::poll(&p, 1, static_cast<int>(timeout.count()));
        } while (n < 0 && errno == EINTR);
        if (n == 0) {
            ::kill(pid, SIGKILL);
            wait_exit_code(pid);
            throw Error(fmt::format("child in cgroup {} ran longer than {} ms; killed it",
                                    cgroup.path().string(), timeout.count()));
        }
    }

    int rc = wait_exit_code(pid);
    std::string report = read_all(report_r.get());
    if (!report.empty()) {
        throw Error(fmt::format("cannot run a child in cgroup {}: {}", cgroup.path().string(),
                                report));
    }
    if (rc > 255) {
        throw Error(fmt::format("child in cgroup {} died of signal {}", cgroup.path().string(),
                                rc - 128));
    }
    return rc;
}

// ---------------------------------------------------------------------------
// Cleanup on signals
// ---------------------------------------------------------------------------

std::uint64_t add_cleanup(std::function<void()> fn) {
    static std::uint64_t next = 0;
    std::lock_guard lock(registry_mutex());
    std::uint64_t token = ++next;
    registry().emplace(token, std::move(fn));
    return token;
}

void remove_cleanup(std::uint64_t token) noexcept {
    std::lock_guard lock(registry_mutex());
    registry().erase(token);
}

void cleanup_all() noexcept {
    std::map<std::uint64_t, std::function<void()>> pending;
    {
        std::lock_guard lock(registry_mutex());
        pending.swap(registry());
    }
    for (auto it = pending.rbegin(); it != pending.rend(); ++it) {
        try {
            it->second();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "netlab: cleanup failed: %s\n", e.what());
        } catch (...) {
            std::fprintf(stderr, "netlab: cleanup failed\n");
        }
    }
}

void install_signal_cleanup() {
    static std::once_flag once;
    std::call_once(once, [] {
        static sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGHUP);
        pthread_sigmask(SIG_BLOCK, &set, nullptr);

        std::thread([] {
            int sig = 0;
            while (sigwait(&set, &sig) != 0) {
            }
            std::fprintf(stderr, "\ninterrupted by %s; removing what was set up\n",
                         strsignal(sig));
            cleanup_all();
            ::_exit(128 + sig);
        }).detach();
    });
}

}  // namespace bulkhead::netlab
