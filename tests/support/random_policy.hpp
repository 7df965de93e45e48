// Random policies and flows for differential tests: small address pools and
// port sets, so that prefixes nest, rules overlap and ranges meet at edges.
#pragma once

#include <bulkhead/policy.hpp>
#include <bulkhead/types.hpp>

#include <cstdint>
#include <random>

namespace bulkhead::testing {

// The seed of a differential run: $BULKHEAD_SEED if set, else kCiSeed when
// CI=true, else the clock.
inline constexpr std::uint64_t kCiSeed = 20261203;
std::uint64_t test_seed();

Policy random_policy(std::mt19937_64& rng);

// A flow whose addresses fall mostly inside the policy's prefixes.
Flow random_flow(std::mt19937_64& rng, const Policy& policy);

}  // namespace bulkhead::testing
