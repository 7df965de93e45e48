// What the CLI's translation units share: privilege checks, the words the CLI
// prints for verdicts and reasons, the counters table, and the demo.
#pragma once

#include <bulkhead/dataplane.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>

namespace bulkhead::cli {

// A command line that parses but makes no sense (explain --proto tcp without
// --port). Reported like a CLI11 parse error: exit status 2.
class UsageError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Throws Error "COMMAND needs root (CAP_BPF, CAP_NET_ADMIN); run it with
// sudo" unless the process is root or has those capabilities (CAP_SYS_ADMIN
// stands in for CAP_BPF on older kernels).
void require_privileges(std::string_view command);

// "allow", "deny", "audit"; and "rule", "default", "tracked", "failsafe",
// "not-policed": the words of `explain` and its JSON.
std::string_view verdict_word(VerdictKind kind);
std::string_view reason_word(Reason reason);

// Prints reason counters, rule counters and map fill as aligned text. With
// `skip_zero`, reasons that never counted a packet are left out.
void print_stats(std::FILE* out, const Stats& stats, bool skip_zero);

struct DemoOptions {
    // Run every phase even after one showed an unexpected outcome.
    bool keep_going = false;
};

// `bulkhead demo`: see DESIGN.md "The demo". Returns the exit status: 0 when
// every observed outcome matched, 1 otherwise. Throws Error when it cannot
// set up; everything it made is removed in either case.
int run_demo(const DemoOptions& options);

}  // namespace bulkhead::cli
