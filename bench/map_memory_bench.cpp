// Map memory and commit-to-visible time at growing policy sizes.
//
//   sudo build/bench/bulkhead_bench_map_memory
//
// BM_MapMemory: after two commits of a policy of scale n (both generation
// slots hold one, as in steady state), the memory of each table as the
// kernel accounts it (the "memlock:" line of /proc/self/fdinfo/<map fd>),
// both slots together, and of the connection tracking table. Table sizes
// are the defaults (Options unset), which the 1M scale fits.
//
// BM_CommitToVisible: a one-rule change to a policy of scale n, timed from
// the apply() call to the moment a thread polling bh_gen_ctl every 20 us
// (as every packet reads it) sees the new generation. The apply() call
// itself returns later (apply_ms).
//
// BM_GracePeriod: one update of an array-of-maps slot, which returns after
// an RCU grace period; each commit waits for one before it writes.
//
// Shape at scale n, as in commit_bench.cpp: n/16 identities with 16 IPv6
// host addresses each (n IP cache entries) in groups of 32; n/1024 rules,
// each from one group to another on its own port (1024 policy entries each).
#include <bulkhead/dataplane.hpp>

#include "shared/bulkhead_abi.h"

#include <bpf/bpf.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

namespace bulkhead {
namespace {

using Clock = std::chrono::steady_clock;

// The policy shape of commit_bench.cpp (copied: each benchmark is one file).
Policy scale_policy(std::size_t n)
{
    Policy p;
    p.default_ingress = Mode::enforce;
    const std::size_t identities = std::max<std::size_t>(n / 16, 64);
    const std::size_t groups = identities / 32;
    auto group = [](std::size_t g) {
        return Selector{
            {SelectorTerm{SelectorTerm::Kind::labels, {{"group", {fmt::format("g{}", g)}}}, {}}}};
    };

    for (std::size_t i = 0; i < identities; ++i) {
        Identity ident;
        ident.name = fmt::format("w{}", i);
        ident.labels = {{"app", fmt::format("a{}", i)}, {"group", fmt::format("g{}", i / 32)}};
        for (std::size_t j = 0; j < 16; ++j)
            ident.cidrs.push_back(*Prefix::parse(
                fmt::format("2001:db8:{:x}:{:x}::{:x}/128", i >> 16, i & 0xffff, j + 1)));
        p.identities.push_back(std::move(ident));
    }
    for (std::size_t k = 0; k < std::max<std::size_t>(n / 1024, 1); ++k) {
        auto port = static_cast<std::uint16_t>(1000 + k % 60000);
        p.rules.push_back(Rule{fmt::format("r{}", k),
                               group(k % groups),
                               group((k * 7 + 1) % groups),
                               {PortSpec{PortSpec::Proto::tcp, port, port}},
                               Action::allow,
                               {}});
    }
    return p;
}

// The same policy with its last rule on another port: a one-rule delta.
Policy one_rule_changed(Policy p)
{
    p.rules.back().ports = {PortSpec{PortSpec::Proto::tcp, 9, 9}};
    return p;
}

Options bench_options(const char* what)
{
    Options o;
    o.pin_dir = fmt::format("/sys/fs/bpf/bulkhead-bench-{}-{}", what, getpid());
    o.host_addresses = std::vector<Prefix>{};
    return o;
}

// Removes the pin directory also when a benchmark throws.
struct PinDirGuard {
    std::filesystem::path path;
    ~PinDirGuard()
    {
        try {
            Dataplane::destroy(path);
        } catch (const std::exception& e) {
            fmt::print(stderr, "cannot remove {}: {}\n", path.string(), e.what());
        }
    }
};

// The kernel's accounting of a map's memory, in bytes.
std::uint64_t memlock_bytes(int fd)
{
    std::ifstream fdinfo(fmt::format("/proc/self/fdinfo/{}", fd));
    std::string line;
    while (std::getline(fdinfo, line)) {
        if (line.rfind("memlock:", 0) == 0)
            return std::stoull(line.substr(8));
    }
    throw std::runtime_error(fmt::format("no memlock line in /proc/self/fdinfo/{}", fd));
}

// The memory of the inner maps of `outer` in every generation slot.
std::uint64_t inner_memlock_bytes(const Dataplane& dp, const std::string& outer)
{
    std::uint64_t total = 0;
    for (std::uint32_t slot = 0; slot < BH_GENERATION_SLOTS; ++slot) {
        std::uint32_t id = 0;
        if (bpf_map_lookup_elem(dp.map_fd(outer), &slot, &id) != 0)
            throw std::runtime_error(fmt::format("read slot {} of {}", slot, outer));
        int fd = bpf_map_get_fd_by_id(id);
        if (fd < 0)
            throw std::runtime_error(fmt::format("open inner map {} of {}", id, outer));
        total += memlock_bytes(fd);
        close(fd);
    }
    return total;
}

benchmark::Counter bytes(std::uint64_t n)
{
    return benchmark::Counter(static_cast<double>(n), benchmark::Counter::kDefaults,
                              benchmark::Counter::OneK::kIs1024);
}

void BM_MapMemory(benchmark::State& state)
{
    const Options o = bench_options("memory");
    PinDirGuard guard{o.pin_dir};
    const Policy p = scale_policy(static_cast<std::size_t>(state.range(0)));
    const Policy q = one_rule_changed(p);
    Dataplane dp = Dataplane::open(o);

    for (auto _ : state) {
        dp.apply(p);
        dp.apply(q);
    }

    std::uint64_t total = 0;
    for (const char* outer :
         {"bh_ipc_host", "bh_ipc_lpm", "bh_policy", "bh_cgroups", "bh_failsafe"}) {
        std::uint64_t b = inner_memlock_bytes(dp, outer);
        state.counters[outer] = bytes(b);
        total += b;
    }
    for (const char* map : {"bh_ct", "bh_frag", "bh_rule_cnt", "bh_meta"}) {
        std::uint64_t b = memlock_bytes(dp.map_fd(map));
        state.counters[map] = bytes(b);
        total += b;
    }
    state.counters["total"] = bytes(total);
}

std::uint64_t read_generation(int gen_ctl_fd)
{
    std::uint32_t zero = 0;
    bh_gen_ctl ctl{};
    if (bpf_map_lookup_elem(gen_ctl_fd, &zero, &ctl) != 0)
        throw std::runtime_error("read bh_gen_ctl");
    return ctl.generation;
}

void BM_CommitToVisible(benchmark::State& state)
{
    const Options o = bench_options("visible");
    PinDirGuard guard{o.pin_dir};
    const Policy p = scale_policy(static_cast<std::size_t>(state.range(0)));
    const Policy q = one_rule_changed(p);
    Dataplane dp = Dataplane::open(o);
    const int gen_ctl = dp.map_fd("bh_gen_ctl");
    dp.apply(p);
    dp.apply(q);  // both slots hold a large generation
    bool flip = false;
    double apply_seconds = 0;

    for (auto _ : state) {
        const std::uint64_t want = read_generation(gen_ctl) + 1;
        std::atomic<bool> polling{false};
        std::atomic<bool> give_up{false};
        Clock::time_point seen{};
        std::thread poller([&] {
            polling = true;
            // a short sleep between reads leaves the CPU to the commit (two
            // cores here) at a resolution well under a commit's milliseconds
            while (read_generation(gen_ctl) < want && !give_up.load(std::memory_order_relaxed))
                std::this_thread::sleep_for(std::chrono::microseconds(20));
            seen = Clock::now();
        });
        while (!polling.load()) {
        }

        const Clock::time_point start = Clock::now();
        ApplyResult r = dp.apply(flip ? q : p);
        const Clock::time_point returned = Clock::now();
        give_up = r.generation != want;
        poller.join();
        if (r.generation != want) {
            state.SkipWithError("a commit did not make a new generation");
            break;
        }
        // seen after apply() returned: the poller woke late, and the flip
        // happened before the return
        state.SetIterationTime(
            std::chrono::duration<double>(std::min(seen, returned) - start).count());
        apply_seconds += std::chrono::duration<double>(returned - start).count();
        flip = !flip;
    }
    state.counters["apply_ms"] =
        benchmark::Counter(apply_seconds * 1e3, benchmark::Counter::kAvgIterations);
}

void BM_GracePeriod(benchmark::State& state)
{
    int inner = bpf_map_create(BPF_MAP_TYPE_HASH, "bh_bench_in", 4, 4, 16, nullptr);
    LIBBPF_OPTS(bpf_map_create_opts, opts, .inner_map_fd = static_cast<__u32>(inner));
    int outer = bpf_map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, "bh_bench_out", 4, 4, 2, &opts);
    if (inner < 0 || outer < 0) {
        state.SkipWithError("cannot create an array of maps (run as root)");
        return;
    }
    std::uint32_t slot = 0;
    for (auto _ : state) {
        if (bpf_map_update_elem(outer, &slot, &inner, BPF_ANY) != 0) {
            state.SkipWithError("cannot update the array of maps");
            break;
        }
    }
    close(outer);
    close(inner);
}

BENCHMARK(BM_MapMemory)
    ->Arg(1000)
    ->Arg(100000)
    ->Arg(1000000)
    ->Unit(benchmark::kMillisecond)
    ->Iterations(1);
BENCHMARK(BM_CommitToVisible)
    ->Arg(1000)
    ->Arg(100000)
    ->Arg(1000000)
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime()
    ->Iterations(10);
BENCHMARK(BM_GracePeriod)->Unit(benchmark::kMillisecond)->Iterations(50);

}  // namespace
}  // namespace bulkhead

BENCHMARK_MAIN();
