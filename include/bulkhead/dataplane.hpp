// The dataplane: BPF programs and maps in the kernel, pinned under a
// directory of the BPF filesystem so that enforcement outlives the process
// that set it up.
#pragma once

#include <bulkhead/policy.hpp>
#include <bulkhead/reference.hpp>
#include <bulkhead/types.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace bulkhead {

inline constexpr const char* kDefaultPinDir = "/sys/fs/bpf/bulkhead";

enum class XdpMode : std::uint8_t {
    automatic,  // native where the driver supports it, else generic
    native,
    generic,
};
std::string_view to_string(XdpMode mode);
// "auto", "native" or "generic"; nullopt otherwise.
std::optional<XdpMode> parse_xdp_mode(std::string_view text);

struct Options {
    std::filesystem::path pin_dir = kDefaultPinDir;
    // Table sizes. Unset: keep what the pinned maps have, or use the default
    // when they are created. Set and different from the pinned size: the
    // next commit builds its generation in tables of the new size.
    std::optional<std::uint32_t> max_ipcache_hosts;     // default 1,048,576
    std::optional<std::uint32_t> max_ipcache_prefixes;  // default 65,536
    std::optional<std::uint32_t> max_policy_entries;    // default 1,048,576
    std::optional<std::uint32_t> max_cgroups;           // default 65,536
    // Sized when the pinned state is first created: rule counters (default
    // 16,384) and the connection tracking table (default 262,144 flows).
    std::optional<std::uint32_t> max_rules;
    std::optional<std::uint32_t> max_connections;
    // The addresses of identity `host`. Unset: the addresses of the
    // interfaces of the caller's network namespace at apply time.
    std::optional<std::vector<Prefix>> host_addresses;
};

struct Counter {
    std::uint64_t packets = 0;
    std::uint64_t bytes = 0;
};

// How full one table is. `entries` counts the generation in force.
struct MapFill {
    std::string name;  // the pinned map's name, e.g. "bh_policy"
    std::uint64_t entries = 0;
    std::uint64_t max_entries = 0;
    std::string option;  // the option that raises max_entries
};

struct RuleCounter {
    std::string name;
    Action action = Action::allow;
    Counter counter;
};

struct Stats {
    // By reason name: "allow-rule", "deny-rule", "audit-rule", "allow-default",
    // "deny-default", "audit-default", "not-ip", "neighbour-discovery",
    // "malformed", "no-policy", "tracked", "failsafe"; and two that count
    // events besides a packet's verdict: "ct-miss" (a mid-flow packet that
    // found no tracking entry) and "revoked" (a tracked flow a new
    // generation no longer allows).
    std::vector<std::pair<std::string, Counter>> reasons;
    std::vector<RuleCounter> rules;  // rules of the policy in force, file order
    std::vector<MapFill> maps;
};

struct Attachment {
    std::string hook;       // "xdp", or "cgroup" for the cgroup hooks of one cgroup
    std::string interface;  // xdp: as named when attached; cgroup: the cgroup's path
    std::string mode;       // xdp: "native" or "generic"; cgroup: the hooks, comma-separated
    std::uint32_t ifindex = 0;
    std::uint32_t prog_id = 0;
    std::uint32_t link_id = 0;
    bool defunct = false;  // the interface is gone; detach to clean up
};

struct Status {
    std::filesystem::path pin_dir;
    std::uint64_t generation = 0;  // 0: no policy committed yet
    std::string policy_source;     // file the policy in force came from
    std::size_t identities = 0;
    std::size_t rules = 0;
    std::vector<Attachment> attachments;
    std::vector<MapFill> maps;
};

// What a commit did.
struct ApplyResult {
    std::uint64_t generation = 0;
    std::size_t ipcache_entries = 0;
    std::size_t policy_entries = 0;
    std::size_t written = 0;  // map entries added or changed in the new generation's tables
    std::size_t deleted = 0;  // map entries removed from them
    bool unchanged = false;   // the policy equals the one in force
};

// explain(): the verdict, plus what the identities are.
struct Explanation {
    Verdict verdict;
    std::string from_name;  // identity name, "world" or "host"
    Labels from_labels;
    std::string to_name;
    Labels to_labels;
};

// One handle on the pinned state. Not thread-safe: use one handle per
// thread. Several processes may hold handles on the same pin directory;
// commits and attachments are serialized by a lock in that directory.
class Dataplane {
public:
    // Creates or reuses the pinned maps under options.pin_dir, mounting the
    // BPF filesystem at /sys/fs/bpf if it is the pin directory's parent and
    // not mounted. Costs a few dozen bpf() calls; the programs are loaded (the
    // verifier: a few hundred milliseconds) only on the first attach_*() or
    // program_fd(). Throws Error when
    // not privileged (needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN or root),
    // when the kernel lacks a feature (named), or when the pinned maps have a
    // different layout.
    static Dataplane open(const Options& options = {});

    Dataplane(Dataplane&&) noexcept;
    Dataplane& operator=(Dataplane&&) noexcept;
    Dataplane(const Dataplane&) = delete;
    Dataplane& operator=(const Dataplane&) = delete;
    ~Dataplane();

    // Attaches the XDP program to `interface` (in the caller's network
    // namespace) as a pinned BPF link. Attaching again replaces the program
    // in the existing link. Throws Error if the interface does not exist,
    // already has an XDP program of another tool, or refuses the mode.
    Attachment attach_xdp(const std::string& interface, XdpMode mode = XdpMode::automatic);

    // Removes bulkhead's XDP link from `interface`. Throws Error if bulkhead
    // has none there.
    void detach_xdp(const std::string& interface);

    // Attaches the cgroup programs (cgroup_skb ingress and egress, connect4,
    // connect6, sendmsg4, sendmsg6) to the cgroup v2 directory `path` as pinned
    // links; they apply to its descendants too. Attaching again replaces the
    // programs inside the existing links: one bulkhead program per hook per
    // cgroup, and programs of other tools on the cgroup are left alone. Throws
    // Error if the path is not a cgroup v2 directory.
    Attachment attach_cgroup(const std::filesystem::path& path);

    // Removes bulkhead's links from the cgroup. Throws Error if it has none.
    void detach_cgroup(const std::filesystem::path& path);

    // Removes every link bulkhead made under this pin directory; returns how many.
    std::size_t detach_all();

    // Compiles and commits `policy` as one new generation: every packet sees
    // the previous policy or this one, never a mix. Writes only the entries
    // that differ from the tables being reused; waits one kernel grace period
    // before reusing them (milliseconds). If a table would overflow, or any
    // write fails, throws Error naming the map, its size and the option that
    // raises it, and the previous generation stays in force.
    ApplyResult apply(const Policy& policy, const std::string& source = "<api>");

    // The verdict for `flow` at an ingress point, computed from the tables of
    // the generation in force, with the same lookups as the BPF programs.
    Explanation explain(const Flow& flow) const;

    Stats stats() const;
    Status status() const;

    // The policy in force, as it was applied; nullopt before the first commit.
    std::optional<Policy> current_policy() const;

    // Removes the pin directory and everything in it, after detaching every
    // link. Enforcement stops. Does nothing if the directory does not exist.
    static void destroy(const std::filesystem::path& pin_dir);

    // Escape hatches for tests and benchmarks: the program fd of the named
    // program ("bh_xdp", "bh_xdp_pass", "bh_cg_ingress", ...; loads the
    // programs on first use) and the fd of a map by its name.
    int program_fd(const std::string& name) const;
    int map_fd(const std::string& name) const;

private:
    struct Impl;
    explicit Dataplane(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

// The cgroup v2 mount point: /sys/fs/cgroup on unified hosts,
// /sys/fs/cgroup/unified on hybrid ones. Throws Error if there is none.
std::filesystem::path cgroup_v2_root();

// A cgroup path as a policy file or the CLI gives it, made absolute: a path
// under the cgroup v2 mount is kept; /sys/fs/cgroup/X becomes <root>/X on a
// hybrid host; anything else is taken relative to the cgroup v2 root.
std::filesystem::path resolve_cgroup_path(const std::filesystem::path& path);

// Library diagnostics go through spdlog's default logger; libbpf's own output
// is routed there at debug level. Call with true to see it (the CLI's -v).
void set_verbose(bool verbose);

}  // namespace bulkhead
