// The policy compiler: a validated Policy in, the contents of one generation's
// maps out. Pure computation, no kernel access, so it is unit-tested against
// the reference evaluator.
#pragma once

#include <bulkhead/policy.hpp>

#include "shared/bulkhead_abi.h"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace bulkhead::detail {

// Bumped whenever the same policy would compile to different entries; a
// generation written by another compiler version is rewritten in full.
inline constexpr int kCompilerVersion = 2;

// A map key as its raw bytes, so entries can be diffed and hashed whatever
// their struct.
template <std::size_t N>
using KeyBytes = std::array<std::uint8_t, N>;

template <typename T>
KeyBytes<sizeof(T)> key_bytes(const T& key)
{
    KeyBytes<sizeof(T)> out;
    std::memcpy(out.data(), &key, sizeof(T));
    return out;
}

struct KeyHash {
    template <std::size_t N>
    std::size_t operator()(const KeyBytes<N>& key) const noexcept
    {
        std::uint64_t h = 1469598103934665603ull;  // FNV-1a
        for (std::uint8_t b : key)
            h = (h ^ b) * 1099511628211ull;
        return static_cast<std::size_t>(h);
    }
};

template <typename Key, typename Value>
using Table = std::unordered_map<KeyBytes<sizeof(Key)>, Value, KeyHash>;

// Numbers given out by the compiler, kept across commits and restarts so the
// same label set keeps its identity and the same rule keeps its counters.
struct Allocations {
    std::map<std::string, std::uint32_t> workloads;  // canonical labels -> id
    std::map<std::string, std::uint32_t> classes;    // "wid|cidr,cidr" -> id
    std::map<std::string, std::uint32_t> rules;      // rule name -> counter index

    nlohmann::json to_json() const;
    static Allocations from_json(const nlohmann::json& j);
};

// An identity as the datapath knows it: a workload identity (or world, or
// host), narrowed by the set of selector CIDRs that contain its addresses.
struct DatapathIdentity {
    std::uint32_t id = 0;
    std::uint32_t workload_id = 0;  // BH_ID_WORLD, BH_ID_HOST or a workload id
    int workload = -1;              // index into Policy::identities, -1 if reserved
    std::vector<Prefix> cidrs;      // selector CIDRs containing it, sorted
    Mode ingress = Mode::allow;
    Mode egress = Mode::allow;
};

struct Compiled {
    Table<bh_cgroup_key, bh_identity_info> cgroups;
    Table<bh_failsafe_key, std::uint32_t> failsafe;
    Table<bh_ipcache_host_key, bh_identity_info> hosts;
    Table<bh_ipcache_lpm_key, bh_identity_info> prefixes;
    Table<bh_policy_key, bh_policy_value> policy;
    bh_gen_config config{};
    std::map<std::uint32_t, DatapathIdentity> identities;  // by datapath id
    std::vector<std::uint32_t> rule_ids;                   // by rule index
};

struct CompileLimits {
    std::uint32_t max_rules = 16384;
};

// What the compiler needs to know about the machine.
struct HostFacts {
    std::vector<Prefix> addresses;                    // identity `host`
    std::map<std::string, std::uint64_t> cgroup_ids;  // policy cgroup path -> id
};

// Compiles `policy`. `alloc` is updated in place: new label sets, classes and
// rules get numbers, rules no longer present release theirs. A cgroup path
// missing from host.cgroup_ids is left out. Throws Error when the policy has
// more rules than the rule counters hold.
Compiled compile(const Policy& policy, Allocations& alloc, const HostFacts& host,
                 const CompileLimits& limits);

// The workload identity an Allocations::classes key narrows.
std::uint32_t class_workload(const std::string& class_key);

// The datapath identity of an address in `compiled`, with the same longest-
// prefix logic as the BPF lookup (for explain and tests).
std::uint32_t compiled_identity_of(const Compiled& compiled, const IpAddr& addr);

}  // namespace bulkhead::detail
