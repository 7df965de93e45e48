// Forked children for tests of several processes on one pin directory (two
// committers, a committer killed with SIGKILL, a newer process taking over),
// and pipes for what they report back.
//
// A child is a fork of the test process: only the forking thread exists in
// it, so it must not wait for anything another thread of the parent holds.
// Keep a child to library calls and pipe writes, and end it with _exit.
#pragma once

#include "support/bpf_env.hpp"

#include "netlab.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {

// A forked child that runs fn() and _exits with its result, or 255 when it
// throws (the message goes to stderr). Only the forking thread exists in the
// child. It dies with this process (PR_SET_PDEATHSIG), and the destructor
// kills and reaps it if it still runs, so no test leaves a process behind.
class ChildProcess {
public:
    explicit ChildProcess(const std::function<int()>& fn)
    {
        pid_t parent = getpid();
        pid_ = fork();
        if (pid_ < 0)
            throw_errno("fork a child process");
        if (pid_ == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(254);  // the parent is already gone
            int code = 255;
            try {
                code = fn();
            } catch (const std::exception& e) {
                fmt::print(stderr, "child {}: {}\n", getpid(), e.what());
            }
            _exit(code);
        }
        cleanup_ = netlab::add_cleanup([pid = pid_] { ::kill(pid, SIGKILL); });
    }
    ChildProcess(const ChildProcess&) = delete;
    ChildProcess& operator=(const ChildProcess&) = delete;
    ~ChildProcess()
    {
        if (!reaped_)
            kill_and_reap();
        netlab::remove_cleanup(cleanup_);
    }

    pid_t pid() const noexcept { return pid_; }

    // SIGKILL, then the wait status.
    int kill_and_reap()
    {
        ::kill(pid_, SIGKILL);
        return reap(0);
    }

    // Waits at most `timeout` for the child to end: its exit code, or 128 +
    // the signal that killed it. Kills it when the time is up (and returns
    // 128 + SIGKILL).
    int wait(std::chrono::milliseconds timeout)
    {
        auto deadline = std::chrono::steady_clock::now() + timeout;
        while (!reaped_) {
            if (std::chrono::steady_clock::now() > deadline) {
                ADD_FAILURE() << "child " << pid_ << " still runs after " << timeout.count()
                              << " ms; killed";
                return code(kill_and_reap());
            }
            int status = reap(WNOHANG);
            if (reaped_)
                return code(status);
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        return code(status_);
    }

private:
    static int code(int status)
    {
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }

    int reap(int flags)
    {
        int status = 0;
        pid_t r;
        do
            r = waitpid(pid_, &status, flags);
        while (r < 0 && errno == EINTR);
        if (r == pid_) {
            reaped_ = true;
            status_ = status;
        }
        return status;
    }

    pid_t pid_ = -1;
    bool reaped_ = false;
    int status_ = 0;
    std::uint64_t cleanup_ = 0;
};

// A pipe: records from children to the test.
struct Pipe {
    Pipe()
    {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) != 0)
            throw_errno("create a pipe");
        read_end = netlab::Fd(fds[0]);
        write_end = netlab::Fd(fds[1]);
    }

    // Writes all of `size` bytes (a record up to PIPE_BUF is atomic).
    void write(const void* data, std::size_t size) const
    {
        if (::write(write_end.get(), data, size) != static_cast<ssize_t>(size))
            throw_errno("write to a pipe");
    }

    // Reads one record of `size` bytes within `timeout`; false at end of
    // file (every writer gone) or when the time is up.
    bool read(void* data, std::size_t size, std::chrono::milliseconds timeout) const
    {
        auto* out = static_cast<std::uint8_t*>(data);
        std::size_t got = 0;
        while (got < size) {
            pollfd p{read_end.get(), POLLIN, 0};
            int ready = poll(&p, 1, static_cast<int>(timeout.count()));
            if (ready < 0 && errno == EINTR)
                continue;
            if (ready <= 0)
                return false;
            ssize_t n = ::read(read_end.get(), out + got, size - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return false;
            got += static_cast<std::size_t>(n);
        }
        return true;
    }

    netlab::Fd read_end;
    netlab::Fd write_end;
};

}  // namespace bulkhead::test
