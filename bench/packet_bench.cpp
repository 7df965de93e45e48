// Per-packet cost of the XDP verdict under BPF_PROG_TEST_RUN, next to an
// empty XDP program measured in the same run. Each benchmark cycles through
// 4096 distinct flows so the map lookups do not always hit the same cache
// lines. The kernel reports the mean time per run; that is what is recorded.
//
//   sudo build/bench/bulkhead_bench_packet
//
// ns_per_packet is the figure to read; Time is per batch of kRepeat packets.
#include "support/packet.hpp"

#include <bulkhead/dataplane.hpp>

#include <benchmark/benchmark.h>
#include <bpf/bpf.h>
#include <fmt/format.h>
#include <unistd.h>

#include <memory>

namespace bulkhead {
namespace {

constexpr int kFlows = 4096;
constexpr int kRepeat = 1000;

// One dataplane for the whole run, with a policy of `identities` workloads.
struct Fixture {
    std::string pin_dir = fmt::format("/sys/fs/bpf/bulkhead-bench-{}", getpid());
    std::optional<Dataplane> dp;

    Fixture()
    {
        Options o;
        o.pin_dir = pin_dir;
        o.host_addresses = std::vector<Prefix>{};
        dp = Dataplane::open(o);
        std::string yaml = R"(apiVersion: bulkhead/v1
defaults: {ingress: enforce, egress: allow}
identities:
  - {name: client, labels: {app: client}, cidrs: [203.0.113.0/24, "2001:db8:1::/64"]}
  - {name: server, labels: {app: server}, cidrs: [198.51.100.0/24, "2001:db8:2::/64"]}
rules:
  - {name: web, from: {app: client}, to: {app: server}, ports: [tcp/443], action: allow}
  - {name: no-telnet, from: any, to: any, ports: [tcp/23], action: deny}
)";
        dp->apply(Policy::parse(yaml), "bench");
    }
    ~Fixture() { Dataplane::destroy(pin_dir); }
};

Fixture& fixture()
{
    static Fixture f;
    return f;
}

enum class Family { v4, v6, v4_vlan };

std::vector<test::Bytes> flows(Family family, std::uint16_t dport)
{
    std::vector<test::Bytes> out;
    for (int i = 0; i < kFlows; ++i) {
        test::Packet p;
        if (family == Family::v4_vlan)
            p.vlan(10);
        if (family == Family::v6)
            p.ipv6({.src = fmt::format("2001:db8:1::{:x}", i + 1),
                    .dst = fmt::format("2001:db8:2::{:x}", (i % 200) + 1)});
        else
            p.ipv4({.src = fmt::format("203.0.113.{}", i % 250 + 1),
                    .dst = fmt::format("198.51.100.{}", (i / 250) % 250 + 1)});
        p.tcp({.sport = static_cast<std::uint16_t>(10000 + i), .dport = dport});
        out.push_back(p.bytes());
    }
    return out;
}

void run(benchmark::State& state, const char* program, Family family, std::uint16_t dport)
{
    int fd = fixture().dp->program_fd(program);
    auto packets = flows(family, dport);
    std::size_t next = 0;
    for (auto _ : state) {
        test::Bytes& pkt = packets[next++ % packets.size()];
        LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = pkt.data(),
                    .data_size_in = static_cast<__u32>(pkt.size()), .repeat = kRepeat);
        if (bpf_prog_test_run_opts(fd, &opts) != 0) {
            state.SkipWithError("BPF_PROG_TEST_RUN failed");
            return;
        }
        // opts.duration is the kernel's mean per run, so an iteration is
        // kRepeat packets of that cost, without the syscall around them
        state.SetIterationTime(opts.duration * 1e-9 * kRepeat);
    }
    state.SetItemsProcessed(state.iterations() * kRepeat);
    state.counters["ns_per_packet"] = benchmark::Counter(
        static_cast<double>(state.iterations() * kRepeat),
        benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void BM_EmptyXdp(benchmark::State& s) { run(s, "bh_xdp_pass", Family::v4, 443); }
void BM_AllowRuleV4(benchmark::State& s) { run(s, "bh_xdp", Family::v4, 443); }
void BM_DenyRuleV4(benchmark::State& s) { run(s, "bh_xdp", Family::v4, 23); }
void BM_DenyDefaultV4(benchmark::State& s) { run(s, "bh_xdp", Family::v4, 8080); }
void BM_AllowRuleV6(benchmark::State& s) { run(s, "bh_xdp", Family::v6, 443); }
void BM_AllowRuleVlan(benchmark::State& s) { run(s, "bh_xdp", Family::v4_vlan, 443); }

BENCHMARK(BM_EmptyXdp)->UseManualTime();
BENCHMARK(BM_AllowRuleV4)->UseManualTime();
BENCHMARK(BM_DenyRuleV4)->UseManualTime();
BENCHMARK(BM_DenyDefaultV4)->UseManualTime();
BENCHMARK(BM_AllowRuleV6)->UseManualTime();
BENCHMARK(BM_AllowRuleVlan)->UseManualTime();

}  // namespace
}  // namespace bulkhead

BENCHMARK_MAIN();
