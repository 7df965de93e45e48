// The policy model: what a policy file says, validated, independent of BPF.
#pragma once

#include <bulkhead/types.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace bulkhead {

// Default behaviour where no rule decides (DESIGN.md "Verdict of a packet").
enum class Mode : std::uint8_t { allow = 0, audit = 1, enforce = 2 };

enum class Action : std::uint8_t { allow = 1, deny = 2 };

std::string_view to_string(Mode mode);
std::string_view to_string(Action action);

// A label set, such as {app: web, env: prod}. Ordered, so it prints and
// compares canonically.
using Labels = std::map<std::string, std::string>;

// "app=web,env=prod": the canonical text of a label set.
std::string format_labels(const Labels& labels);

// One term of a selector. A selector is a list of terms; it matches when any
// term matches (a single mapping in the file is a list of one term).
struct SelectorTerm {
    enum class Kind : std::uint8_t { any, world, host, labels, cidr };
    Kind kind = Kind::any;
    // kind == labels: every key must be present with one of the listed values.
    std::map<std::string, std::vector<std::string>> match;
    // kind == cidr
    Prefix cidr;

    bool operator==(const SelectorTerm&) const = default;
};

struct Selector {
    std::vector<SelectorTerm> terms;
    bool operator==(const Selector&) const = default;
};

// One entry of a rule's `ports` list.
//   tcp/443 -> {tcp, 443, 443}      udp/5000-5100 -> {udp, 5000, 5100}
//   tcp     -> {tcp, 0, 65535}      any           -> {any, 0, 65535}
//   icmp/8  -> {icmp, 0x0800, 0x08ff}  icmpv6/128/0 -> {icmpv6, 0x8000, 0x8000}
// For ICMP and ICMPv6, a "port" is type << 8 | code.
struct PortSpec {
    enum class Proto : std::uint8_t {
        any = 0,
        icmp = 1,
        tcp = 6,
        udp = 17,
        icmpv6 = 58,
        sctp = 132,
    };
    Proto proto = Proto::any;
    std::uint16_t lo = 0;
    std::uint16_t hi = 0xffff;

    // Parses one `ports` entry as written in a policy file ("tcp/443",
    // "icmp/8/0", "any"); nullopt otherwise, with "what is wrong; what was
    // expected" in *why when given.
    static std::optional<PortSpec> parse(std::string_view text, std::string* why = nullptr);
    // The text parse() accepts for this spec: "tcp/443", "udp/5000-5100", "icmp/8".
    std::string str() const;

    bool operator==(const PortSpec&) const = default;
};

// Where in a file a construct was written (1-based), for error messages.
struct Location {
    int line = 0;
    int column = 0;
};

struct Rule {
    std::string name;
    Selector from;
    Selector to;
    std::vector<PortSpec> ports;  // never empty after parsing
    Action action = Action::allow;
    Location where;
};

struct Identity {
    std::string name;  // for display
    Labels labels;     // what policy matches on; unique per identity
    std::vector<Prefix> cidrs;
    std::vector<std::string> cgroups;
    Mode ingress = Mode::allow;
    Mode egress = Mode::allow;
    Location where;
};

struct Failsafe {
    bool enabled = true;
    std::vector<PortSpec> ports;  // default: tcp/22
    std::vector<Prefix> from;     // management prefixes; default: any address
};

// A validated policy. Construct with Policy::parse or Policy::load.
struct Policy {
    std::string api_version = "bulkhead/v1";
    Mode default_ingress = Mode::allow;
    Mode default_egress = Mode::allow;
    std::vector<Identity> identities;
    std::vector<Rule> rules;
    Failsafe failsafe;
    // Non-fatal findings, such as a selector that matches no identity,
    // formatted "FILE:LINE:COL: warning: ...".
    std::vector<std::string> warnings;

    // Parses and validates YAML text. `source` names the text in messages
    // (a file path, or "<input>"). Throws bulkhead::Error whose message is
    // "SOURCE:LINE:COL: what is wrong; what was expected" on any problem.
    static Policy parse(std::string_view text, std::string_view source = "<input>");

    // Reads and parses a file. Throws bulkhead::Error naming the file when it
    // cannot be read, and as parse() when it does not validate.
    static Policy load(const std::filesystem::path& path);
};

// Selector matching, shared by the compiler and the reference evaluator.
// `labels` are the labels of the address's workload identity (longest
// prefix); reserved identities have no labels and are matched by kind.
struct Subject {
    std::uint32_t workload_id = 0;   // BH_ID_WORLD, BH_ID_HOST or a workload id
    const Labels* labels = nullptr;  // null for world and host
};
// A cidr term matches by address, not by identity, so it never matches here:
// test it with Prefix::contains on the flow's address.
bool term_matches_labels(const SelectorTerm& term, const Subject& subject);

}  // namespace bulkhead
