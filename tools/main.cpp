// bulkhead: the command-line front end of libbulkhead.
//
// Every command is declared once below with CLI11, so `--help` is generated
// from the same declarations that parse the command line. Results go to
// stdout (one JSON document with --json), diagnostics to stderr. Exit status:
// 0 success, 1 error, 2 bad usage.
#include "cli.hpp"

#include <bulkhead/dataplane.hpp>
#include <bulkhead/policy.hpp>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <net/if.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#ifndef BULKHEAD_VERSION
#define BULKHEAD_VERSION "unknown"
#endif

namespace bulkhead::cli {

using json = nlohmann::json;

// ---------------------------------------------------------------------------
// Shared helpers (declared in cli.hpp)
// ---------------------------------------------------------------------------

namespace {

// The effective capability set, from /proc/self/status ("CapEff: 000001ff...").
std::uint64_t effective_capabilities() {
    std::ifstream in("/proc/self/status");
    for (std::string line; std::getline(in, line);) {
        if (line.rfind("CapEff:", 0) != 0) continue;
        std::string hex = line.substr(line.find_first_not_of(" \t", 7));
        std::uint64_t caps = 0;
        std::from_chars(hex.data(), hex.data() + hex.size(), caps, 16);
        return caps;
    }
    return 0;
}

constexpr int kCapNetAdmin = 12;
constexpr int kCapSysAdmin = 21;
constexpr int kCapBpf = 39;

}  // namespace

void require_privileges(std::string_view command) {
    if (::geteuid() == 0) return;

    std::uint64_t caps = effective_capabilities();
    auto has = [caps](int cap) { return (caps >> cap) & 1; };
    if ((has(kCapBpf) || has(kCapSysAdmin)) && has(kCapNetAdmin)) return;

    throw Error(fmt::format("{} needs root (CAP_BPF, CAP_NET_ADMIN); run it with sudo", command));
}

std::string_view verdict_word(VerdictKind kind) {
    switch (kind) {
    case VerdictKind::allow: return "allow";
    case VerdictKind::deny: return "deny";
    case VerdictKind::audit: return "audit";
    }
    return "?";
}

std::string_view reason_word(Reason reason) {
    switch (reason) {
    case Reason::rule: return "rule";
    case Reason::default_mode: return "default";
    case Reason::tracked: return "tracked";
    case Reason::failsafe: return "failsafe";
    case Reason::not_policed: return "not-policed";
    }
    return "?";
}

namespace {

// "raise with --max-rules", or what the library says instead: "(fixed size)".
std::string raise_text(const std::string& option) {
    if (option.rfind("--", 0) == 0) return "raise with " + option;
    return option.empty() ? "(fixed size)" : option;
}

}  // namespace

void print_stats(std::FILE* out, const Stats& stats, bool skip_zero) {
    std::size_t width = 20;
    for (const auto& rule : stats.rules) width = std::max(width, rule.name.size() + 8);

    fmt::print(out, "reason counters:\n");
    bool any = false;
    for (const auto& [reason, counter] : stats.reasons) {
        if (skip_zero && counter.packets == 0) continue;
        fmt::print(out, "  {:<{}} {:>10} packets {:>12} bytes\n", reason, width, counter.packets,
                   counter.bytes);
        any = true;
    }
    if (!any) fmt::print(out, "  (no packets counted)\n");

    fmt::print(out, "rule counters:\n");
    for (const auto& rule : stats.rules) {
        std::string label = fmt::format("{} ({})", rule.name, to_string(rule.action));
        fmt::print(out, "  {:<{}} {:>10} packets {:>12} bytes\n", label, width,
                   rule.counter.packets, rule.counter.bytes);
    }
    if (stats.rules.empty()) fmt::print(out, "  (no policy in force)\n");

    fmt::print(out, "map fill:\n");
    for (const auto& map : stats.maps) {
        fmt::print(out, "  {:<{}} {:>10} of {:<10} {}\n", map.name, width, map.entries,
                   map.max_entries, raise_text(map.option));
    }
}

namespace {

// ---------------------------------------------------------------------------
// Output helpers
// ---------------------------------------------------------------------------

void print_json(const json& doc) {
    std::cout << doc.dump(2) << '\n';
}

json labels_json(const Labels& labels) {
    json out = json::object();
    for (const auto& [key, value] : labels) out[key] = value;
    return out;
}

json maps_json(const std::vector<MapFill>& maps) {
    json out = json::array();
    for (const auto& map : maps) {
        out.push_back({{"name", map.name},
                       {"entries", map.entries},
                       {"max_entries", map.max_entries},
                       {"option", map.option}});
    }
    return out;
}

// The cgroup hooks in the order the datapath documents them; the library
// lists a cgroup's hooks in the order it finds their pins.
std::string canonical_hooks(const std::string& hooks) {
    static const std::vector<std::string> order = {"ingress",  "egress",   "connect4",
                                                   "connect6", "sendmsg4", "sendmsg6"};
    std::vector<std::string> given;
    for (std::size_t start = 0; start <= hooks.size();) {
        std::size_t comma = std::min(hooks.find(',', start), hooks.size());
        if (comma > start) given.push_back(hooks.substr(start, comma - start));
        start = comma + 1;
    }
    std::vector<std::string> sorted;
    for (const auto& hook : order) {
        if (std::find(given.begin(), given.end(), hook) != given.end()) sorted.push_back(hook);
    }
    for (const auto& hook : given) {
        if (std::find(order.begin(), order.end(), hook) == order.end()) sorted.push_back(hook);
    }
    return fmt::format("{}", fmt::join(sorted, ","));
}

Attachment canonical(Attachment a) {
    if (a.hook == "cgroup") a.mode = canonical_hooks(a.mode);
    return a;
}

json attachment_json(const Attachment& a) {
    return {{"hook", a.hook},         {"interface", a.interface}, {"mode", a.mode},
            {"ifindex", a.ifindex},   {"prog_id", a.prog_id},     {"link_id", a.link_id},
            {"defunct", a.defunct}};
}

std::string describe(const Selector& selector) {
    std::vector<std::string> terms;
    for (const auto& term : selector.terms) {
        switch (term.kind) {
        case SelectorTerm::Kind::any: terms.emplace_back("any"); break;
        case SelectorTerm::Kind::world: terms.emplace_back("world"); break;
        case SelectorTerm::Kind::host: terms.emplace_back("host"); break;
        case SelectorTerm::Kind::cidr: terms.push_back("cidr " + term.cidr.str()); break;
        case SelectorTerm::Kind::labels: {
            std::vector<std::string> parts;
            for (const auto& [key, values] : term.match) {
                parts.push_back(fmt::format("{}={}", key, fmt::join(values, "|")));
            }
            terms.push_back(fmt::format("{{{}}}", fmt::join(parts, ",")));
            break;
        }
        }
    }
    return fmt::format("{}", fmt::join(terms, " or "));
}

template <typename T, typename Fn>
std::string join_map(const std::vector<T>& items, Fn&& fn) {
    std::vector<std::string> parts;
    for (const auto& item : items) parts.push_back(fn(item));
    return fmt::format("[{}]", fmt::join(parts, ", "));
}

std::string ports_text(const std::vector<PortSpec>& ports) {
    return join_map(ports, [](const PortSpec& p) { return p.str(); });
}

std::string prefixes_text(const std::vector<Prefix>& prefixes) {
    return join_map(prefixes, [](const Prefix& p) { return p.str(); });
}

std::string strings_text(const std::vector<std::string>& items) {
    return join_map(items, [](const std::string& s) { return s; });
}

void print_warnings(const Policy& policy) {
    for (const auto& warning : policy.warnings) std::cerr << warning << '\n';
}

bool is_valid_iface_name(const std::string& name) {
    return !name.empty() && name.size() < IF_NAMESIZE;
}

// Dataplane::open() with the pin directory of the command line; checks
// privileges first so a non-root user gets one clear line.
Dataplane open_dataplane(std::string_view command, const Options& options) {
    require_privileges(command);
    return Dataplane::open(options);
}

// As open_dataplane(), for commands that only read or remove state: they
// must not create it as a side effect where nothing was ever set up.
Dataplane open_existing(std::string_view command, const Options& options) {
    require_privileges(command);
    if (!std::filesystem::exists(options.pin_dir)) {
        throw Error(fmt::format("{}: no bulkhead state under {}: nothing was applied or attached "
                                "there; run `bulkhead policy apply FILE` first, or pass the "
                                "--pin-dir that was used", command, options.pin_dir.string()));
    }
    return Dataplane::open(options);
}

// ---------------------------------------------------------------------------
// policy validate | apply | diff
// ---------------------------------------------------------------------------

int cmd_validate(const std::string& file, bool as_json) {
    Policy policy;
    try {
        policy = Policy::load(file);
    } catch (const Error& e) {
        if (as_json) print_json({{"file", file}, {"valid", false}, {"error", e.what()}});
        throw;
    }

    print_warnings(policy);
    if (as_json) {
        print_json({{"file", file},
                    {"valid", true},
                    {"identities", policy.identities.size()},
                    {"rules", policy.rules.size()},
                    {"warnings", policy.warnings}});
    } else {
        fmt::print("{}: valid ({} identities, {} rules)\n", file, policy.identities.size(),
                   policy.rules.size());
    }
    return 0;
}

// --max-rules and --max-connections size tables that are made once, with the
// pinned state; say so when an existing table has another size.
void warn_fixed_sizes(const Dataplane& dp, const Options& options) {
    const std::pair<const char*, std::optional<std::uint32_t>> asked[] = {
        {"bh_rule_cnt", options.max_rules}, {"bh_ct", options.max_connections}};
    for (const auto& map : dp.status().maps) {
        for (const auto& [name, size] : asked) {
            if (map.name != name || !size || *size == map.max_entries) continue;
            fmt::print(stderr, "bulkhead: warning: {} {} ignored: {} was created with {} entries "
                               "and keeps that size; to resize it, `bulkhead detach all` and "
                               "remove {}, then apply again\n",
                       map.option, *size, map.name, map.max_entries,
                       options.pin_dir.string());
        }
    }
}

int cmd_apply(const std::string& file, const Options& options, bool as_json) {
    Policy policy = Policy::load(file);
    print_warnings(policy);

    Dataplane dp = open_dataplane("policy apply", options);
    ApplyResult r = dp.apply(policy, file);
    warn_fixed_sizes(dp, options);

    if (as_json) {
        print_json({{"file", file},
                    {"generation", r.generation},
                    {"unchanged", r.unchanged},
                    {"ipcache_entries", r.ipcache_entries},
                    {"policy_entries", r.policy_entries},
                    {"written", r.written},
                    {"deleted", r.deleted},
                    {"warnings", policy.warnings}});
    } else if (r.unchanged) {
        fmt::print("{}: unchanged, generation {} stays in force\n", file, r.generation);
    } else {
        fmt::print("{}: applied as generation {} ({} identities, {} rules; {} IP cache entries, "
                   "{} policy entries; {} written, {} deleted)\n",
                   file, r.generation, policy.identities.size(), policy.rules.size(),
                   r.ipcache_entries, r.policy_entries, r.written, r.deleted);
    }
    return 0;
}

// One section of a diff: names added, removed, and changed with what changed.
struct DiffSection {
    std::vector<std::string> added;
    std::vector<std::string> removed;
    std::vector<std::pair<std::string, std::vector<std::string>>> changed;

    bool empty() const { return added.empty() && removed.empty() && changed.empty(); }

    json to_json() const {
        json changes = json::array();
        for (const auto& [name, what] : changed) {
            changes.push_back({{"name", name}, {"changes", what}});
        }
        return {{"added", added}, {"removed", removed}, {"changed", changes}};
    }
};

template <typename T>
void note(std::vector<std::string>& changes, std::string_view field, const T& before,
          const T& after) {
    if (before != after) changes.push_back(fmt::format("{}: {} -> {}", field, before, after));
}

std::vector<std::string> identity_changes(const Identity& a, const Identity& b) {
    std::vector<std::string> c;
    note(c, "labels", format_labels(a.labels), format_labels(b.labels));
    note(c, "cidrs", prefixes_text(a.cidrs), prefixes_text(b.cidrs));
    note(c, "cgroups", strings_text(a.cgroups), strings_text(b.cgroups));
    note(c, "ingress", to_string(a.ingress), to_string(b.ingress));
    note(c, "egress", to_string(a.egress), to_string(b.egress));
    return c;
}

std::vector<std::string> rule_changes(const Rule& a, const Rule& b) {
    std::vector<std::string> c;
    note(c, "from", describe(a.from), describe(b.from));
    note(c, "to", describe(a.to), describe(b.to));
    note(c, "ports", ports_text(a.ports), ports_text(b.ports));
    note(c, "action", to_string(a.action), to_string(b.action));
    return c;
}

// Matches items of two lists by name; `changes` describes a changed pair.
template <typename T, typename Fn>
DiffSection diff_by_name(const std::vector<T>& before, const std::vector<T>& after, Fn changes) {
    DiffSection d;
    for (const auto& b : after) {
        auto it = std::find_if(before.begin(), before.end(),
                               [&](const T& a) { return a.name == b.name; });
        if (it == before.end()) {
            d.added.push_back(b.name);
        } else if (auto what = changes(*it, b); !what.empty()) {
            d.changed.emplace_back(b.name, std::move(what));
        }
    }
    for (const auto& a : before) {
        bool kept = std::any_of(after.begin(), after.end(),
                                [&](const T& b) { return a.name == b.name; });
        if (!kept) d.removed.push_back(a.name);
    }
    return d;
}

std::vector<std::string> settings_changes(const Policy& a, const Policy& b) {
    std::vector<std::string> c;
    note(c, "defaults.ingress", to_string(a.default_ingress), to_string(b.default_ingress));
    note(c, "defaults.egress", to_string(a.default_egress), to_string(b.default_egress));
    note(c, "failsafe", std::string(a.failsafe.enabled ? "on" : "off"),
         std::string(b.failsafe.enabled ? "on" : "off"));
    note(c, "failsafe.ports", ports_text(a.failsafe.ports), ports_text(b.failsafe.ports));
    note(c, "failsafe.from", prefixes_text(a.failsafe.from), prefixes_text(b.failsafe.from));
    return c;
}

void print_section(std::string_view title, const DiffSection& d) {
    fmt::print("{}: {} added, {} removed, {} changed\n", title, d.added.size(), d.removed.size(),
               d.changed.size());
    for (const auto& name : d.added) fmt::print("  + {}\n", name);
    for (const auto& name : d.removed) fmt::print("  - {}\n", name);
    for (const auto& [name, what] : d.changed) {
        fmt::print("  ~ {}\n", name);
        for (const auto& line : what) fmt::print("      {}\n", line);
    }
}

int cmd_diff(const std::string& file, const Options& options, bool as_json) {
    Policy next = Policy::load(file);
    print_warnings(next);

    // Nothing set up yet: compare with no policy, and create nothing.
    require_privileges("policy diff");
    std::optional<Policy> current;
    if (std::filesystem::exists(options.pin_dir)) {
        current = Dataplane::open(options).current_policy();
    }
    Policy empty;
    empty.failsafe = next.failsafe;  // before any commit, compare rules and identities only
    const Policy& before = current ? *current : empty;

    DiffSection identities = diff_by_name(before.identities, next.identities, identity_changes);
    DiffSection rules = diff_by_name(before.rules, next.rules, rule_changes);
    std::vector<std::string> settings = current ? settings_changes(before, next)
                                                : std::vector<std::string>{};
    bool same = identities.empty() && rules.empty() && settings.empty();

    if (as_json) {
        print_json({{"file", file},
                    {"policy_in_force", current.has_value()},
                    {"identical", same},
                    {"identities", identities.to_json()},
                    {"rules", rules.to_json()},
                    {"settings", settings}});
        return 0;
    }

    if (!current) {
        fmt::print("no policy in force under {}; everything is new\n", options.pin_dir.string());
    }
    if (same) {
        fmt::print("{}: identical to the policy in force\n", file);
        return 0;
    }
    print_section("identities", identities);
    print_section("rules", rules);
    if (!settings.empty()) {
        fmt::print("settings:\n");
        for (const auto& line : settings) fmt::print("  ~ {}\n", line);
    }
    return 0;
}

// ---------------------------------------------------------------------------
// attach | detach
// ---------------------------------------------------------------------------

void require_interface(const std::string& iface) {
    if (is_valid_iface_name(iface) && ::if_nametoindex(iface.c_str()) != 0) return;
    throw Error(fmt::format("cannot attach XDP to '{}': no such interface in this network "
                            "namespace; check `ip link`", iface));
}

int cmd_attach_xdp(const std::string& iface, const std::string& mode_text,
                   const Options& options, bool as_json) {
    require_privileges("attach xdp");
    require_interface(iface);
    std::optional<XdpMode> mode = parse_xdp_mode(mode_text);
    if (!mode) {
        throw UsageError(fmt::format("--mode {}: expected auto, native or generic", mode_text));
    }

    Dataplane dp = Dataplane::open(options);
    Attachment a = dp.attach_xdp(iface, *mode);

    if (as_json) {
        print_json(attachment_json(a));
    } else {
        fmt::print("attached XDP to {} ({} mode, ifindex {}, program {}, link {})\n", a.interface,
                   a.mode, a.ifindex, a.prog_id, a.link_id);
    }
    return 0;
}

int cmd_detach_xdp(const std::string& iface, const Options& options) {
    Dataplane dp = open_existing("detach xdp", options);
    dp.detach_xdp(iface);
    fmt::print("detached XDP from {}\n", iface);
    return 0;
}

// Whether `dir` is `base` or lies under it (both absolute and normal).
bool is_within(const std::filesystem::path& dir, const std::filesystem::path& base) {
    auto rel = dir.lexically_relative(base);
    return !rel.empty() && *rel.begin() != "..";
}

// The identity of the policy in force that processes in cgroup `resolved`
// get: the one listing the nearest ancestor (or the cgroup itself); nullopt
// when none does.
std::optional<std::string> cgroup_identity(const Dataplane& dp,
                                           const std::filesystem::path& resolved) {
    std::optional<Policy> policy = dp.current_policy();
    if (!policy) return std::nullopt;

    std::optional<std::string> best;
    std::size_t best_depth = 0;
    for (const auto& identity : policy->identities) {
        for (const auto& path : identity.cgroups) {
            std::filesystem::path listed = resolve_cgroup_path(path);
            std::size_t depth = static_cast<std::size_t>(std::distance(listed.begin(),
                                                                       listed.end()));
            bool registered = std::filesystem::is_directory(listed);  // ids taken at apply
            if (registered && is_within(resolved, listed) && (!best || depth > best_depth)) {
                best = identity.name;
                best_depth = depth;
            }
        }
    }
    return best;
}

int cmd_attach_cgroup(const std::string& path, const Options& options, bool as_json) {
    require_privileges("attach cgroup");
    Dataplane dp = Dataplane::open(options);
    Attachment a = canonical(dp.attach_cgroup(path));

    // attach_cgroup() does not report link and program ids; status does.
    for (const auto& listed : dp.status().attachments) {
        if (listed.hook == "cgroup" && listed.interface == a.interface) a = canonical(listed);
    }

    std::optional<std::string> identity = cgroup_identity(dp, a.interface);
    if (!identity) {
        fmt::print(stderr, "bulkhead: note: no identity of the policy in force lists {} or a "
                           "parent cgroup of it: its processes are judged as `host` at connect "
                           "and send, and by their address per packet\n", a.interface);
    }
    if (as_json) {
        print_json(attachment_json(a));
    } else {
        fmt::print("attached to cgroup {} ({}; identity {})\n", a.interface, a.mode,
                   identity ? *identity : "none in the policy in force");
    }
    return 0;
}

int cmd_detach_cgroup(const std::string& path, const Options& options) {
    Dataplane dp = open_existing("detach cgroup", options);
    dp.detach_cgroup(path);
    fmt::print("detached from cgroup {}\n", resolve_cgroup_path(path).string());
    return 0;
}

int cmd_detach_all(const Options& options) {
    require_privileges("detach all");
    if (!std::filesystem::exists(options.pin_dir)) {
        fmt::print("nothing attached: {} does not exist\n", options.pin_dir.string());
        return 0;
    }
    Dataplane dp = Dataplane::open(options);
    std::size_t n = dp.detach_all();
    fmt::print("detached {} link{}\n", n, n == 1 ? "" : "s");
    return 0;
}

// ---------------------------------------------------------------------------
// status | stats
// ---------------------------------------------------------------------------

int cmd_status(const Options& options, bool as_json) {
    Dataplane dp = open_existing("status", options);
    Status s = dp.status();

    if (as_json) {
        json attachments = json::array();
        for (const auto& a : s.attachments) attachments.push_back(attachment_json(canonical(a)));
        print_json({{"pin_dir", s.pin_dir.string()},
                    {"generation", s.generation},
                    {"policy_source", s.policy_source},
                    {"identities", s.identities},
                    {"rules", s.rules},
                    {"attachments", attachments},
                    {"maps", maps_json(s.maps)}});
        return 0;
    }

    fmt::print("pin dir:     {}\n", s.pin_dir.string());
    if (s.generation == 0) {
        fmt::print("policy:      none committed (packets pass, counted as no-policy)\n");
    } else {
        fmt::print("policy:      generation {} from {} ({} identities, {} rules)\n", s.generation,
                   s.policy_source, s.identities, s.rules);
    }
    fmt::print("attachments:{}\n", s.attachments.empty() ? " none" : "");
    for (const auto& listed : s.attachments) {
        Attachment a = canonical(listed);
        if (a.hook == "cgroup") {
            fmt::print("  cgroup {} ({}){}\n", a.interface, a.mode,
                       a.defunct ? fmt::format(" DEFUNCT: the cgroup is gone; run `bulkhead "
                                               "detach cgroup {}`", a.interface)
                                 : "");
            continue;
        }
        fmt::print("  {} on {} (ifindex {}, {} mode, program {}, link {}){}\n", a.hook,
                   a.interface, a.ifindex, a.mode, a.prog_id, a.link_id,
                   a.defunct ? " DEFUNCT: the interface is gone; run `bulkhead detach xdp`" : "");
    }
    fmt::print("maps:\n");
    for (const auto& m : s.maps) {
        fmt::print("  {:<24} {:>10} of {:<10} {}\n", m.name, m.entries, m.max_entries,
                   raise_text(m.option));
    }
    return 0;
}

int cmd_stats(const Options& options, bool as_json) {
    Dataplane dp = open_existing("stats", options);
    Stats stats = dp.stats();

    if (!as_json) {
        print_stats(stdout, stats, false);
        return 0;
    }

    json reasons = json::object();
    for (const auto& [name, c] : stats.reasons) {
        reasons[name] = {{"packets", c.packets}, {"bytes", c.bytes}};
    }
    json rules = json::array();
    for (const auto& r : stats.rules) {
        rules.push_back({{"name", r.name},
                         {"action", std::string(to_string(r.action))},
                         {"packets", r.counter.packets},
                         {"bytes", r.counter.bytes}});
    }
    print_json({{"reasons", reasons}, {"rules", rules}, {"maps", maps_json(stats.maps)}});
    return 0;
}

// ---------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------

struct ExplainArgs {
    std::string from;
    std::string to;
    std::string proto;
    std::optional<int> port;
    std::optional<int> icmp_type;
    std::optional<int> icmp_code;
    bool fragment = false;
};

IpAddr parse_addr(const std::string& text, std::string_view option) {
    if (auto addr = IpAddr::parse(text)) return *addr;
    throw UsageError(fmt::format("{} {}: not an IPv4 or IPv6 address", option, text));
}

// "tcp", "udp", "sctp", "icmp", "icmpv6", or an IP protocol number.
std::uint8_t parse_proto(const std::string& text) {
    if (text == "tcp") return 6;
    if (text == "udp") return 17;
    if (text == "sctp") return 132;
    if (text == "icmp") return 1;
    if (text == "icmpv6") return 58;

    int number = -1;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), number);
    if (ec != std::errc() || end != text.data() + text.size() || number < 0 || number > 255) {
        throw UsageError(fmt::format("--proto {}: expected tcp, udp, sctp, icmp, icmpv6 or a "
                                     "protocol number 0-255", text));
    }
    return static_cast<std::uint8_t>(number);
}

Flow make_flow(const ExplainArgs& args) {
    Flow flow;
    flow.src = parse_addr(args.from, "--from");
    flow.dst = parse_addr(args.to, "--to");
    if (flow.src.is_v4() != flow.dst.is_v4()) {
        throw UsageError("--from and --to must both be IPv4 or both IPv6");
    }
    flow.proto = parse_proto(args.proto);
    flow.has_port = !args.fragment;

    bool ported = flow.proto == 6 || flow.proto == 17 || flow.proto == 132;
    bool icmp = flow.proto == 1 || flow.proto == 58;
    if (flow.proto == 1 && !flow.src.is_v4()) throw UsageError("--proto icmp is IPv4; use icmpv6");
    if (flow.proto == 58 && flow.src.is_v4()) throw UsageError("--proto icmpv6 is IPv6; use icmp");
    if (!icmp && (args.icmp_type || args.icmp_code)) {
        throw UsageError("--icmp-type and --icmp-code go with --proto icmp or icmpv6");
    }
    if (!ported && args.port) throw UsageError("--port goes with --proto tcp, udp or sctp");

    if (ported && !args.fragment) {
        if (!args.port) {
            throw UsageError(fmt::format("--proto {} needs --port N (or --fragment for a "
                                         "non-first fragment)", args.proto));
        }
        flow.port = static_cast<std::uint16_t>(*args.port);
    }
    if (icmp) {
        // Echo request unless told otherwise: what `ping` sends.
        int type = args.icmp_type.value_or(flow.proto == 1 ? 8 : 128);
        int code = args.icmp_code.value_or(0);
        flow.port = static_cast<std::uint16_t>(type << 8 | code);
    }
    return flow;
}

std::string flow_text(const ExplainArgs& args, const Flow& flow) {
    std::string what = args.proto;
    if (flow.proto == 6 || flow.proto == 17 || flow.proto == 132) {
        what += args.fragment ? " (non-first fragment)" : fmt::format(" port {}", flow.port);
    } else if (flow.proto == 1 || flow.proto == 58) {
        what += fmt::format(" type {} code {}", flow.port >> 8, flow.port & 0xff);
    }
    return fmt::format("{} -> {} {}", flow.src.str(), flow.dst.str(), what);
}

int cmd_explain(const ExplainArgs& args, const Options& options, bool as_json) {
    Flow flow = make_flow(args);
    Dataplane dp = open_existing("explain", options);
    Explanation e = dp.explain(flow);
    const Verdict& v = e.verdict;

    if (as_json) {
        print_json({{"verdict", verdict_word(v.kind)},
                    {"rule", v.rule ? json(*v.rule) : json(nullptr)},
                    {"reason", reason_word(v.reason)},
                    {"from_identity", labels_json(e.from_labels)},
                    {"to_identity", labels_json(e.to_labels)},
                    {"from_name", e.from_name},
                    {"to_name", e.to_name},
                    {"from_id", v.src_identity},
                    {"to_id", v.dst_identity},
                    {"flow",
                     {{"from", flow.src.str()},
                      {"to", flow.dst.str()},
                      {"proto", flow.proto},
                      {"port", flow.port},
                      {"fragment", args.fragment}}}});
        return 0;
    }

    auto who = [](const std::string& name, const Labels& labels, std::uint32_t id) {
        std::string text =
            labels.empty() ? name : fmt::format("{} ({})", name, format_labels(labels));
        return fmt::format("{}, identity {}", text, id);
    };
    fmt::print("{}: {}\n", flow_text(args, flow), verdict_word(v.kind));
    fmt::print("  rule:    {}\n", v.rule ? *v.rule : "-");
    fmt::print("  reason:  {}{}\n", reason_word(v.reason),
               v.kind == VerdictKind::audit ? " (would deny; passes in audit mode)" : "");
    fmt::print("  from:    {}\n", who(e.from_name, e.from_labels, v.src_identity));
    fmt::print("  to:      {}\n", who(e.to_name, e.to_labels, v.dst_identity));
    return 0;
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

int run(int argc, char** argv) {
    CLI::App app{"bulkhead: eBPF microsegmentation dataplane.\n"
                 "Policy by workload identity, enforced at XDP; state pinned under a BPF "
                 "filesystem directory.",
                 "bulkhead"};
    app.fallthrough();  // global options also after the subcommand
    app.failure_message([](const CLI::App*, const CLI::Error& e) {
        return fmt::format("bulkhead: {}\nRun with --help for more information.\n", e.what());
    });
    app.require_subcommand(1);
    app.set_version_flag("--version", std::string("bulkhead ") + BULKHEAD_VERSION);

    Options options;
    std::string pin_dir = kDefaultPinDir;
    bool verbose = false;
    app.add_option("--pin-dir", pin_dir, "BPF filesystem directory of the pinned state")
        ->capture_default_str();
    app.add_flag("-v,--verbose", verbose, "Show library and libbpf diagnostics on stderr");

    // policy
    auto* policy = app.add_subcommand("policy", "Validate, apply or compare a policy file");
    policy->require_subcommand(1);

    std::string file;
    bool as_json = false;
    auto* validate = policy->add_subcommand("validate", "Check a policy file; needs no root");
    validate->add_option("FILE", file, "Policy file (YAML)")->required();
    validate->add_flag("--json", as_json, "Print one JSON object");

    auto* apply = policy->add_subcommand("apply", "Compile and commit a policy atomically");
    apply->add_option("FILE", file, "Policy file (YAML)")->required();
    apply->add_flag("--json", as_json, "Print one JSON object");
    apply->add_option("--max-policy-entries", options.max_policy_entries,
                      "Size of the policy table (default 1048576)");
    apply->add_option("--max-ipcache-hosts", options.max_ipcache_hosts,
                      "Size of the host address table (default 1048576)");
    apply->add_option("--max-ipcache-prefixes", options.max_ipcache_prefixes,
                      "Size of the prefix tables (default 65536)");
    apply->add_option("--max-cgroups", options.max_cgroups,
                      "Size of the cgroup identity table (default 65536)");
    apply->add_option("--max-rules", options.max_rules,
                      "Rule counter slots; takes effect only when the state is first created "
                      "(default 16384)");
    apply->add_option("--max-connections", options.max_connections,
                      "Size of the connection tracking table (LRU); takes effect only when the "
                      "state is first created (default 262144)");

    auto* diff = policy->add_subcommand("diff", "Compare a policy file with the policy in force");
    diff->add_option("FILE", file, "Policy file (YAML)")->required();
    diff->add_flag("--json", as_json, "Print one JSON object");

    // attach, detach
    std::string iface;
    std::string mode = "auto";
    std::string cgroup;
    auto* attach =
        app.add_subcommand("attach", "Attach bulkhead's programs to an interface or a cgroup");
    attach->require_subcommand(1);
    auto* attach_xdp =
        attach->add_subcommand("xdp", "Attach XDP to IFACE in this network namespace");
    attach_xdp->add_option("IFACE", iface, "Interface name")->required();
    attach_xdp->add_option("--mode", mode, "auto (native, else generic), native or generic")
        ->check(CLI::IsMember({"auto", "native", "generic"}))
        ->capture_default_str();
    attach_xdp->add_flag("--json", as_json, "Print one JSON object");
    auto* attach_cgroup = attach->add_subcommand(
        "cgroup", "Attach the cgroup programs (cgroup_skb ingress and egress, connect4, connect6, "
                  "sendmsg4, sendmsg6) to PATH; they apply to its descendants too");
    attach_cgroup
        ->add_option("PATH", cgroup,
                     "cgroup v2 directory: a path under the cgroup v2 mount, or one relative to "
                     "it (/system.slice/db.service)")
        ->required();
    attach_cgroup->add_flag("--json", as_json, "Print one JSON object");

    auto* detach = app.add_subcommand("detach", "Remove bulkhead's attachments");
    detach->require_subcommand(1);
    auto* detach_xdp = detach->add_subcommand("xdp", "Detach XDP from IFACE");
    detach_xdp->add_option("IFACE", iface, "Interface name")->required();
    auto* detach_cgroup = detach->add_subcommand("cgroup", "Detach the cgroup programs from PATH");
    detach_cgroup->add_option("PATH", cgroup, "cgroup v2 directory, as given to attach")
        ->required();
    auto* detach_all = detach->add_subcommand("all", "Detach every link under the pin directory");

    // status, stats
    auto* status = app.add_subcommand("status", "Show the policy in force, attachments, map fill");
    status->add_flag("--json", as_json, "Print one JSON object");
    auto* stats = app.add_subcommand("stats", "Show reason and per-rule counters, map fill");
    stats->add_flag("--json", as_json, "Print one JSON object");

    // explain
    ExplainArgs ex;
    auto* explain = app.add_subcommand(
        "explain", "Show the verdict for one flow, from the tables in force");
    explain->add_option("--from", ex.from, "Source address")->required();
    explain->add_option("--to", ex.to, "Destination address")->required();
    explain->add_option("--proto", ex.proto, "tcp, udp, sctp, icmp, icmpv6 or a number")
        ->required();
    explain->add_option("--port", ex.port, "Destination port (tcp, udp, sctp)")
        ->check(CLI::Range(0, 65535));
    explain->add_option("--icmp-type", ex.icmp_type, "ICMP type (default: echo request)")
        ->check(CLI::Range(0, 255));
    explain->add_option("--icmp-code", ex.icmp_code, "ICMP code (default 0)")
        ->check(CLI::Range(0, 255));
    explain->add_flag("--fragment", ex.fragment, "A non-first fragment: no port is known");
    explain->add_flag("--json", as_json, "Print one JSON object");

    // demo, version
    DemoOptions demo_options;
    auto* demo = app.add_subcommand(
        "demo", "Build namespaces, attach, apply examples/demo-policy.yaml, drive real traffic, "
                "check the outcomes, remove everything (own pin directory; needs root)");
    demo->add_flag("--keep-going", demo_options.keep_going,
                   "Run every phase even after an unexpected outcome");
    auto* version = app.add_subcommand("version", "Print the version");

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        int code = app.exit(e);  // prints help, or the error to stderr
        return code == 0 ? 0 : 2;
    }

    set_verbose(verbose);
    options.pin_dir = pin_dir;

    if (validate->parsed()) return cmd_validate(file, as_json);
    if (apply->parsed()) return cmd_apply(file, options, as_json);
    if (diff->parsed()) return cmd_diff(file, options, as_json);
    if (attach_xdp->parsed()) return cmd_attach_xdp(iface, mode, options, as_json);
    if (attach_cgroup->parsed()) return cmd_attach_cgroup(cgroup, options, as_json);
    if (detach_xdp->parsed()) return cmd_detach_xdp(iface, options);
    if (detach_cgroup->parsed()) return cmd_detach_cgroup(cgroup, options);
    if (detach_all->parsed()) return cmd_detach_all(options);
    if (status->parsed()) return cmd_status(options, as_json);
    if (stats->parsed()) return cmd_stats(options, as_json);
    if (explain->parsed()) return cmd_explain(ex, options, as_json);
    if (demo->parsed()) {
        require_privileges("demo");
        return run_demo(demo_options);
    }
    if (version->parsed()) {
        fmt::print("bulkhead {}\n", BULKHEAD_VERSION);
        return 0;
    }
    return 2;  // unreachable: CLI11 requires one subcommand
}

}  // namespace
}  // namespace bulkhead::cli

int main(int argc, char** argv) {
    try {
        return bulkhead::cli::run(argc, argv);
    } catch (const bulkhead::cli::UsageError& e) {
        std::cerr << "bulkhead: " << e.what() << "\nRun with --help for more information.\n";
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "bulkhead: " << e.what() << '\n';
        return 1;
    }
}
