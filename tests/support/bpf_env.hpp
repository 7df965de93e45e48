// What the privileged tests share: the decision to skip, a pin directory per
// test that is removed also on failure, counter deltas from stats(), and raw
// access to the maps of the generation in force.
#pragma once

#include <bulkhead/dataplane.hpp>

#include "netlab.hpp"
#include "shared/bulkhead_abi.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace bulkhead::test {

// Why the privileged tests cannot run here, or nullopt when they can. With
// CI=true they always run: CI is root, and a test that cannot run there must
// fail, not skip.
inline std::optional<std::string> bpf_skip_reason()
{
    const char* ci = std::getenv("CI");
    if (ci != nullptr && std::string_view(ci) == "true")
        return std::nullopt;
    if (geteuid() != 0)
        return "needs root for BPF and network namespaces (set CI=true to fail instead of skip)";
    return std::nullopt;
}

// On SIGINT, SIGTERM or SIGHUP, netlab's cleanup registry removes what the
// tests made (namespaces, pin directories) before the process exits. Set up
// in the main thread before any test starts a thread.
class SignalCleanup : public ::testing::Environment {
public:
    void SetUp() override { netlab::install_signal_cleanup(); }
};
inline ::testing::Environment* const kSignalCleanup =
    ::testing::AddGlobalTestEnvironment(new SignalCleanup);

// A pin directory of its own, /sys/fs/bpf/bulkhead-test-<pid>-<n>, removed
// with Dataplane::destroy when the object goes, whatever the test's outcome,
// and by the signal cleanup if the run is interrupted.
class ScopedPinDir {
public:
    ScopedPinDir()
        : path_(fmt::format("/sys/fs/bpf/bulkhead-test-{}-{}", getpid(), next_number())),
          cleanup_(netlab::add_cleanup([path = path_] { remove(path); }))
    {
    }
    ScopedPinDir(const ScopedPinDir&) = delete;
    ScopedPinDir& operator=(const ScopedPinDir&) = delete;
    ~ScopedPinDir()
    {
        netlab::remove_cleanup(cleanup_);
        remove(path_);
    }

    const std::filesystem::path& path() const noexcept { return path_; }

private:
    static int next_number()
    {
        static std::atomic<int> counter{0};
        return counter++;
    }

    static void remove(const std::filesystem::path& path) noexcept
    {
        try {
            Dataplane::destroy(path);
        } catch (const std::exception& e) {
            fmt::print(stderr, "cannot remove test pin directory {}: {}\n", path.string(),
                       e.what());
        }
    }

    std::filesystem::path path_;
    std::uint64_t cleanup_ = 0;
};

// Options for a test dataplane: its own pin directory, and no host addresses,
// so the machine's own interfaces never become identity `host` in a test.
inline Options test_options(const std::filesystem::path& pin_dir)
{
    Options options;
    options.pin_dir = pin_dir;
    options.host_addresses = std::vector<Prefix>{};
    return options;
}

// What one packet (or a burst) moved in the counters.
struct CounterDelta {
    std::map<std::string, Counter> reasons;  // only those that moved
    std::map<std::string, Counter> rules;
};

inline CounterDelta counter_delta(const Stats& before, const Stats& after)
{
    CounterDelta delta;
    std::map<std::string, Counter> old_reasons(before.reasons.begin(), before.reasons.end());
    for (const auto& [name, counter] : after.reasons) {
        const Counter& was = old_reasons[name];
        if (counter.packets != was.packets || counter.bytes != was.bytes)
            delta.reasons[name] = {counter.packets - was.packets, counter.bytes - was.bytes};
    }
    std::map<std::string, Counter> old_rules;
    for (const RuleCounter& rule : before.rules)
        old_rules[rule.name] = rule.counter;
    for (const RuleCounter& rule : after.rules) {
        const Counter& was = old_rules[rule.name];
        if (rule.counter.packets != was.packets || rule.counter.bytes != was.bytes)
            delta.rules[rule.name] = {rule.counter.packets - was.packets,
                                      rule.counter.bytes - was.bytes};
    }
    return delta;
}

// "name" when exactly one counter moved, by exactly `packets` packets;
// otherwise a description of what did move ("" for nothing), so that a
// failed expectation shows it.
inline std::string moved_one(const std::map<std::string, Counter>& moved, std::uint64_t packets)
{
    if (moved.size() == 1 && moved.begin()->second.packets == packets)
        return moved.begin()->first;

    std::string out;
    for (const auto& [name, counter] : moved)
        out += fmt::format("{}{}+{}", out.empty() ? "" : ",", name, counter.packets);
    return out;
}

// Owns an fd from the bpf() syscall.
class BpfFd {
public:
    explicit BpfFd(int fd = -1) noexcept : fd_(fd) {}
    BpfFd(BpfFd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
    BpfFd& operator=(BpfFd&& other) noexcept
    {
        std::swap(fd_, other.fd_);
        return *this;
    }
    BpfFd(const BpfFd&) = delete;
    BpfFd& operator=(const BpfFd&) = delete;
    ~BpfFd()
    {
        if (fd_ >= 0)
            close(fd_);
    }

    int get() const noexcept { return fd_; }

private:
    int fd_;
};

[[noreturn]] inline void throw_errno(const std::string& what)
{
    throw std::system_error(errno, std::generic_category(), what);
}

// The generation in force, read from bh_gen_ctl as the BPF programs read it.
inline std::uint64_t current_generation(const Dataplane& dp)
{
    std::uint32_t zero = 0;
    bh_gen_ctl ctl{};
    if (bpf_map_lookup_elem(dp.map_fd("bh_gen_ctl"), &zero, &ctl) != 0)
        throw_errno("read bh_gen_ctl");
    return ctl.generation;
}

// The inner map of `outer` ("bh_policy", "bh_ipc_host", "bh_ipc_lpm") that
// the generation in force uses: outer map slot -> inner map id -> fd.
inline BpfFd active_inner_map(const Dataplane& dp, const std::string& outer)
{
    std::uint32_t slot = static_cast<std::uint32_t>(current_generation(dp) & 1);
    std::uint32_t inner_id = 0;
    if (bpf_map_lookup_elem(dp.map_fd(outer), &slot, &inner_id) != 0)
        throw_errno(fmt::format("read slot {} of {}", slot, outer));
    int fd = bpf_map_get_fd_by_id(inner_id);
    if (fd < 0)
        throw_errno(fmt::format("open inner map id {} of {}", inner_id, outer));
    return BpfFd(fd);
}

// Every key and value of a map (hash or LPM trie), by iteration.
template <typename Key, typename Value>
std::vector<std::pair<Key, Value>> dump_map(int fd)
{
    std::vector<std::pair<Key, Value>> out;
    Key key{};
    Key next{};
    const void* prev = nullptr;
    while (bpf_map_get_next_key(fd, prev, &next) == 0) {
        Value value{};
        if (bpf_map_lookup_elem(fd, &next, &value) == 0)
            out.emplace_back(next, value);
        key = next;
        prev = &key;
    }
    return out;
}

// One per-CPU counter slot, one value per *possible* CPU, each value rounded
// up to 8 bytes as the kernel lays them out.
class PerCpuCounters {
public:
    explicit PerCpuCounters(int map_fd) : fd_(map_fd)
    {
        int cpus = libbpf_num_possible_cpus();
        if (cpus <= 0)
            throw std::system_error(-cpus, std::generic_category(), "count possible CPUs");
        cpus_ = static_cast<std::size_t>(cpus);
    }

    std::size_t cpus() const noexcept { return cpus_; }
    static constexpr std::size_t stride() { return (sizeof(bh_counter) + 7) / 8 * 8; }

    std::vector<bh_counter> read(std::uint32_t index) const
    {
        std::vector<std::uint8_t> raw(cpus_ * stride());
        if (bpf_map_lookup_elem(fd_, &index, raw.data()) != 0)
            throw_errno(fmt::format("read per-CPU counter {}", index));
        std::vector<bh_counter> out(cpus_);
        for (std::size_t cpu = 0; cpu < cpus_; cpu++)
            std::memcpy(&out[cpu], raw.data() + cpu * stride(), sizeof(bh_counter));
        return out;
    }

    void write(std::uint32_t index, const std::vector<bh_counter>& values) const
    {
        std::vector<std::uint8_t> raw(cpus_ * stride(), 0);
        for (std::size_t cpu = 0; cpu < cpus_ && cpu < values.size(); cpu++)
            std::memcpy(raw.data() + cpu * stride(), &values[cpu], sizeof(bh_counter));
        if (bpf_map_update_elem(fd_, &index, raw.data(), BPF_ANY) != 0)
            throw_errno(fmt::format("write per-CPU counter {}", index));
    }

    bh_counter sum(std::uint32_t index) const
    {
        bh_counter total{};
        for (const bh_counter& c : read(index)) {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        return total;
    }

private:
    int fd_;
    std::size_t cpus_ = 0;
};

// A number from the environment (test scaling knobs), or `fallback`.
inline std::uint64_t env_number(const char* name, std::uint64_t fallback)
{
    const char* text = std::getenv(name);
    return text != nullptr && *text != '\0' ? std::strtoull(text, nullptr, 0) : fallback;
}

// The reason counter a verdict moves ("allow-rule", "deny-default", ...).
inline std::string reason_counter(const Verdict& v)
{
    switch (v.reason) {
    case Reason::rule:
        return v.kind == VerdictKind::allow  ? "allow-rule"
               : v.kind == VerdictKind::deny ? "deny-rule"
                                             : "audit-rule";
    case Reason::default_mode:
        return v.kind == VerdictKind::allow  ? "allow-default"
               : v.kind == VerdictKind::deny ? "deny-default"
                                             : "audit-default";
    case Reason::not_policed:
        return "neighbour-discovery";
    case Reason::tracked:
        return "tracked";
    case Reason::failsafe:
        return "failsafe";
    }
    return "?";
}

// The fixture of tests on a dataplane of their own: skips as
// bpf_skip_reason() says, gives each test a pin directory that is removed
// afterwards, and opens the dataplane on first use with options_ as the test
// left them.
class DataplaneTest : public ::testing::Test {
protected:
    void SetUp() override
    {
        if (auto why = bpf_skip_reason())
            GTEST_SKIP() << *why;
        pin_ = std::make_unique<ScopedPinDir>();
        options_ = test_options(pin_->path());
    }

    void TearDown() override
    {
        dp_.reset();  // close every fd before the pin directory goes
        pin_.reset();
    }

    Dataplane& dp()
    {
        if (!dp_)
            dp_ = std::make_unique<Dataplane>(Dataplane::open(options_));
        return *dp_;
    }

    Options options_;
    std::unique_ptr<ScopedPinDir> pin_;
    std::unique_ptr<Dataplane> dp_;
};

}  // namespace bulkhead::test
