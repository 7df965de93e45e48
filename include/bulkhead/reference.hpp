// The reference evaluator: DESIGN.md's verdict semantics written straight
// from the text, in plain C++, with no tables. It is the oracle against which
// the compiler and the BPF programs are tested; it is also readable
// documentation of what a policy means.
#pragma once

#include <bulkhead/policy.hpp>
#include <bulkhead/types.hpp>

#include <vector>

namespace bulkhead {

// Which end enforces: at an ingress point (XDP, cgroup ingress) the
// destination's ingress mode applies, at an egress point the source's egress
// mode.
enum class Direction : std::uint8_t { ingress, egress };

// The workload identity an address belongs to: the identity with the longest
// prefix containing it, `host` for `host_addrs` not covered by a longer or
// equal policy prefix, else `world`. Returns the index into
// policy.identities, or -1 for world and -2 for host.
int reference_identity_of(const Policy& policy, const IpAddr& addr,
                          const std::vector<Prefix>& host_addrs = {});

// The verdict for one flow, stateless (no connection tracking):
//   1. a matching deny rule denies (the first in file order is reported);
//   2. else a matching allow rule allows (the first in file order);
//   3. else the enforcing identity's mode decides.
// Audit mode of the enforcing identity turns a deny of either kind into
// VerdictKind::audit. A flow without a port (non-first fragment) matches only
// port specs that cover every port of its protocol. Neighbour discovery
// passes as not_policed unless a deny rule matches it.
// Verdict::src_identity/dst_identity are left 0: the reference evaluator has
// no datapath numbering.
Verdict reference_verdict(const Policy& policy, const Flow& flow,
                          Direction direction = Direction::ingress,
                          const std::vector<Prefix>& host_addrs = {});

}  // namespace bulkhead
