// Commit cost: compile and apply a policy of growing size, and a one-rule
// change to it (which writes only the difference). Policies are built in
// code, not YAML, so the figures are the library's, not the parser's.
//
//   sudo build/bench/bulkhead_bench_commit
//
// Shape at scale n: n/16 identities with 16 IPv6 host addresses each (n IP
// cache entries) in groups of 32; n/1024 rules, each from one group to
// another on its own port (1024 policy entries each, so n entries in all).
#include <bulkhead/dataplane.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <unistd.h>

namespace bulkhead {
namespace {

Policy scale_policy(std::size_t n)
{
    Policy p;
    p.default_ingress = Mode::enforce;
    const std::size_t identities = std::max<std::size_t>(n / 16, 64);
    const std::size_t groups = identities / 32;
    for (std::size_t i = 0; i < identities; ++i) {
        Identity ident;
        ident.name = fmt::format("w{}", i);
        ident.labels = {{"app", fmt::format("a{}", i)}, {"group", fmt::format("g{}", i / 32)}};
        for (std::size_t j = 0; j < 16; ++j)
            ident.cidrs.push_back(*Prefix::parse(fmt::format("2001:db8:{:x}:{:x}::{:x}/128",
                                                             i >> 16, i & 0xffff, j + 1)));
        p.identities.push_back(std::move(ident));
    }
    for (std::size_t k = 0; k < std::max<std::size_t>(n / 1024, 1); ++k)
        p.rules.push_back(Rule{fmt::format("r{}", k),
                               Selector{{SelectorTerm{SelectorTerm::Kind::labels,
                                                      {{"group", {fmt::format("g{}", k % groups)}}},
                                                      {}}}},
                               Selector{{SelectorTerm{SelectorTerm::Kind::labels,
                                                      {{"group", {fmt::format("g{}", (k * 7 + 1) % groups)}}},
                                                      {}}}},
                               {PortSpec{PortSpec::Proto::tcp, static_cast<std::uint16_t>(1000 + k % 60000),
                                         static_cast<std::uint16_t>(1000 + k % 60000)}},
                               Action::allow,
                               {}});
    return p;
}

Options bench_options()
{
    Options o;
    o.pin_dir = fmt::format("/sys/fs/bpf/bulkhead-bench-commit-{}", getpid());
    o.host_addresses = std::vector<Prefix>{};
    o.max_ipcache_hosts = 1u << 21;
    o.max_policy_entries = 1u << 21;
    o.max_rules = 1u << 14;
    return o;
}

void BM_FullApply(benchmark::State& state)
{
    Options o = bench_options();
    Policy p = scale_policy(static_cast<std::size_t>(state.range(0)));
    Policy empty;
    for (auto _ : state) {
        Dataplane dp = Dataplane::open(o);
        state.PauseTiming();
        dp.apply(empty);  // both slots hold an empty generation: a full write follows
        dp.apply(empty);
        state.ResumeTiming();
        dp.apply(p);
    }
    Dataplane::destroy(o.pin_dir);
}

void BM_OneRuleDelta(benchmark::State& state)
{
    Options o = bench_options();
    Policy p = scale_policy(static_cast<std::size_t>(state.range(0)));
    Dataplane dp = Dataplane::open(o);
    dp.apply(p);
    Policy q = p;
    q.rules.back().ports = {PortSpec{PortSpec::Proto::tcp, 9, 9}};
    dp.apply(q);  // both slots now hold a large generation
    bool flip = false;
    for (auto _ : state) {
        dp.apply(flip ? q : p);
        flip = !flip;
    }
    Dataplane::destroy(o.pin_dir);
}

BENCHMARK(BM_FullApply)->Arg(1000)->Arg(100000)->Arg(1000000)->Unit(benchmark::kMillisecond)
    ->Iterations(1);
BENCHMARK(BM_OneRuleDelta)->Arg(1000)->Arg(100000)->Arg(1000000)->Unit(benchmark::kMillisecond)
    ->Iterations(3);

}  // namespace
}  // namespace bulkhead

BENCHMARK_MAIN();
