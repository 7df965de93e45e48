// Policy files: YAML text in, a validated Policy out. Every problem is
// reported as "SOURCE:LINE:COL: what is wrong; what was expected", because a
// policy that does not validate must change nothing and tell the operator
// exactly where to look.
#include <bulkhead/policy.hpp>

#include "shared/bulkhead_abi.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <array>
#include <memory>
#include <span>
#include <system_error>
#include <utility>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

namespace bulkhead {

std::string_view to_string(Mode mode)
{
    switch (mode) {
    case Mode::allow:
        return "allow";
    case Mode::audit:
        return "audit";
    case Mode::enforce:
        return "enforce";
    }
    return "unknown";
}

std::string_view to_string(Action action)
{
    switch (action) {
    case Action::allow:
        return "allow";
    case Action::deny:
        return "deny";
    }
    return "unknown";
}

std::string format_labels(const Labels& labels)
{
    std::string out;
    for (const auto& [key, value] : labels) {
        if (!out.empty())
            out += ',';
        out += fmt::format("{}={}", key, value);
    }
    return out;
}

namespace {

bool labels_match(const std::map<std::string, std::vector<std::string>>& match,
                  const Labels& labels)
{
    return std::all_of(match.begin(), match.end(), [&](const auto& term) {
        auto found = labels.find(term.first);
        return found != labels.end() && std::find(term.second.begin(), term.second.end(),
                                                  found->second) != term.second.end();
    });
}

}  // namespace

bool term_matches_labels(const SelectorTerm& term, const Subject& subject)
{
    switch (term.kind) {
    case SelectorTerm::Kind::any:
        return true;
    case SelectorTerm::Kind::world:
        return subject.workload_id == BH_ID_WORLD;
    case SelectorTerm::Kind::host:
        return subject.workload_id == BH_ID_HOST;
    case SelectorTerm::Kind::labels:
        return subject.labels != nullptr && labels_match(term.match, *subject.labels);
    case SelectorTerm::Kind::cidr:
        return false;
    }
    return false;
}

// ---- ports ---------------------------------------------------------------

namespace {

using Proto = PortSpec::Proto;

struct ProtoName {
    std::string_view name;
    Proto proto;
};

constexpr ProtoName proto_names[] = {
    {"tcp", Proto::tcp},   {"udp", Proto::udp},       {"sctp", Proto::sctp},
    {"icmp", Proto::icmp}, {"icmpv6", Proto::icmpv6}, {"any", Proto::any},
};

std::optional<Proto> find_proto(std::string_view name)
{
    for (const auto& entry : proto_names) {
        if (entry.name == name)
            return entry.proto;
    }
    return std::nullopt;
}

std::string_view proto_name(Proto proto)
{
    for (const auto& entry : proto_names) {
        if (entry.proto == proto)
            return entry.name;
    }
    return "unknown";
}

std::vector<std::string_view> split(std::string_view text, char sep)
{
    std::vector<std::string_view> parts;
    for (;;) {
        std::size_t at = text.find(sep);
        parts.push_back(text.substr(0, at));
        if (at == std::string_view::npos)
            return parts;
        text.remove_prefix(at + 1);
    }
}

// Digits only, saturating at 10^6 so that a long number is out of range
// rather than wrapped around; messages quote the text, not this value.
std::optional<unsigned> parse_number(std::string_view text)
{
    if (text.empty())
        return std::nullopt;

    unsigned value = 0;
    for (char c : text) {
        if (c < '0' || c > '9')
            return std::nullopt;
        value = std::min(value * 10 + static_cast<unsigned>(c - '0'), 1000000u);
    }
    return value;
}

std::nullopt_t port_fail(std::string* why, std::string reason)
{
    if (why)
        *why = std::move(reason);
    return std::nullopt;
}

// One transport port: 1-65535 (port 0 is not a port a rule can mean).
std::optional<std::uint16_t> parse_port_number(std::string_view text, std::string* why)
{
    std::optional<unsigned> value = parse_number(text);
    if (!value)
        return port_fail(why, fmt::format("port '{}' is not a number; expected 1-65535", text));
    if (*value == 0 || *value > 0xffff)
        return port_fail(why, fmt::format("port {} is out of range; expected 1-65535", text));
    return static_cast<std::uint16_t>(*value);
}

std::optional<PortSpec> parse_transport(Proto proto, const std::vector<std::string_view>& parts,
                                        std::string* why)
{
    std::string_view name = proto_name(proto);
    if (parts.size() == 1)
        return PortSpec{proto, 0, 0xffff};
    std::string expected = fmt::format("expected {0}, {0}/PORT or {0}/LOW-HIGH", name);
    if (parts.size() > 2)
        return port_fail(why, "too many '/'; " + expected);
    if (parts[1].empty())
        return port_fail(why, fmt::format("no port after '{}/'; {}", name, expected));

    std::vector<std::string_view> range = split(parts[1], '-');
    if (range.size() > 2)
        return port_fail(why, "too many '-'; " + expected);
    std::optional<std::uint16_t> lo = parse_port_number(range.front(), why);
    std::optional<std::uint16_t> hi = lo ? parse_port_number(range.back(), why) : std::nullopt;
    if (!lo || !hi)
        return std::nullopt;
    if (*lo > *hi) {
        return port_fail(why, fmt::format("port range {}-{} is reversed; expected LOW-HIGH with "
                                          "LOW <= HIGH",
                                          *lo, *hi));
    }
    return PortSpec{proto, *lo, *hi};
}

std::optional<unsigned> parse_icmp_field(Proto proto, std::string_view field, std::string_view text,
                                         std::string* why)
{
    std::string_view family = proto == Proto::icmp ? "ICMP" : "ICMPv6";
    std::optional<unsigned> value = parse_number(text);
    if (!value) {
        return port_fail(
            why, fmt::format("{} {} '{}' is not a number; expected 0-255", family, field, text));
    }
    if (*value > 0xff) {
        return port_fail(
            why, fmt::format("{} {} {} is out of range; expected 0-255", family, field, text));
    }
    return value;
}

// ICMP "ports" are type << 8 | code, so a type alone is the range of its codes.
std::optional<PortSpec> parse_icmp(Proto proto, const std::vector<std::string_view>& parts,
                                   std::string* why)
{
    std::string_view name = proto_name(proto);
    if (parts.size() == 1)
        return PortSpec{proto, 0, 0xffff};
    if (parts.size() > 3)
        return port_fail(
            why, fmt::format("too many '/'; expected {0}, {0}/TYPE or {0}/TYPE/CODE", name));

    std::optional<unsigned> type = parse_icmp_field(proto, "type", parts[1], why);
    if (!type)
        return std::nullopt;
    if (parts.size() == 2) {
        auto lo = static_cast<std::uint16_t>(*type << 8);
        return PortSpec{proto, lo, static_cast<std::uint16_t>(lo | 0xff)};
    }
    std::optional<unsigned> code = parse_icmp_field(proto, "code", parts[2], why);
    if (!code)
        return std::nullopt;
    auto value = static_cast<std::uint16_t>(*type << 8 | *code);
    return PortSpec{proto, value, value};
}

}  // namespace

std::optional<PortSpec> PortSpec::parse(std::string_view text, std::string* why)
{
    std::vector<std::string_view> parts = split(text, '/');
    std::optional<Proto> proto = find_proto(parts[0]);
    if (!proto && parse_number(parts[0])) {
        return port_fail(why, fmt::format("port '{0}' has no protocol; expected tcp/{0}, udp/{0} "
                                          "or sctp/{0}",
                                          parts[0]));
    }
    if (!proto) {
        return port_fail(why, fmt::format("unknown protocol '{}'; expected one of: tcp, udp, "
                                          "sctp, icmp, icmpv6, any",
                                          parts[0]));
    }

    switch (*proto) {
    case Proto::any:
        if (parts.size() > 1)
            return port_fail(why, "'any' takes no port; expected any alone");
        return PortSpec{};
    case Proto::icmp:
    case Proto::icmpv6:
        return parse_icmp(*proto, parts, why);
    default:
        return parse_transport(*proto, parts, why);
    }
}

std::string PortSpec::str() const
{
    std::string_view name = proto_name(proto);
    if (proto == Proto::any || (lo == 0 && hi == 0xffff))
        return std::string(name);
    bool icmp = proto == Proto::icmp || proto == Proto::icmpv6;
    if (icmp && lo == hi)
        return fmt::format("{}/{}/{}", name, lo >> 8, lo & 0xff);
    if (icmp && (lo & 0xff) == 0 && hi == (lo | 0xff))
        return fmt::format("{}/{}", name, lo >> 8);
    if (lo == hi)
        return fmt::format("{}/{}", name, lo);
    return fmt::format("{}/{}-{}", name, lo, hi);
}

// ---- the YAML parser -----------------------------------------------------

namespace {

constexpr std::size_t max_label_length = 253;  // as DNS names and Kubernetes label values
constexpr std::size_t max_rule_name_length = 128;

constexpr std::array<std::string_view, 5> top_keys = {"apiVersion", "defaults", "identities",
                                                      "rules", "failsafe"};
constexpr std::array<std::string_view, 2> defaults_keys = {"ingress", "egress"};
constexpr std::array<std::string_view, 6> identity_keys = {"name",    "labels",  "cidrs",
                                                           "cgroups", "ingress", "egress"};
constexpr std::array<std::string_view, 5> rule_keys = {"name", "from", "to", "ports", "action"};
constexpr std::array<std::string_view, 3> failsafe_keys = {"ports", "from", "enabled"};
constexpr std::size_t kMaxFailsafeEntries = 4096;  // the datapath's failsafe table holds 16384

const std::string selector_forms =
    "expected any, world, host, a label mapping such as {app: web}, {cidr: PREFIX}, or a list "
    "of these";

// One `key: value` of a mapping. The key is kept because an empty value has
// no position of its own: yaml-cpp marks it at the next token, often the
// next line, so errors about it point at the key instead.
struct Entry {
    YAML::Node key;
    YAML::Node value;
};

struct Fields {
    std::vector<Entry> entries;

    const Entry* find(std::string_view key) const
    {
        for (const auto& entry : entries) {
            if (entry.key.IsScalar() && entry.key.Scalar() == key)
                return &entry;
        }
        return nullptr;
    }
};

// Text as a message can show it: control and non-ASCII bytes as \xNN.
std::string printable(std::string_view text)
{
    std::string out;
    for (unsigned char c : text) {
        if (c < 0x20 || c >= 0x7f)
            out += fmt::format("\\x{:02x}", c);
        else
            out += static_cast<char>(c);
    }
    return out;
}

std::string describe(const YAML::Node& node)
{
    switch (node.Type()) {
    case YAML::NodeType::Scalar:
        return fmt::format("the string '{}'", printable(node.Scalar()));
    case YAML::NodeType::Sequence:
        return node.size() == 0 ? "an empty list" : "a list";
    case YAML::NodeType::Map:
        return node.size() == 0 ? "an empty mapping" : "a mapping";
    default:
        return "empty";
    }
}

std::vector<YAML::Node> elements(const YAML::Node& sequence)
{
    std::vector<YAML::Node> out;
    for (const auto& item : sequence)
        out.push_back(item);
    return out;
}

std::string join(std::span<const std::string_view> words)
{
    std::string out;
    for (std::string_view word : words)
        out += out.empty() ? std::string(word) : fmt::format(", {}", word);
    return out;
}

bool has_unprintable(std::string_view text)
{
    return std::any_of(text.begin(), text.end(),
                       [](unsigned char c) { return c < 0x20 || c >= 0x7f; });
}

// Why a label key, label value or identity name is unusable, or nullopt.
// ',' and '=' are kept out of keys and ',' out of values so that the
// canonical text of a label set (format_labels) reads back unambiguously.
std::optional<std::string> label_text_problem(std::string_view text, bool is_key)
{
    if (text.empty())
        return "is empty; expected at least one character";
    if (text.size() > max_label_length) {
        return fmt::format("is {} characters long; expected at most {}", text.size(),
                           max_label_length);
    }
    if (has_unprintable(text))
        return "has a control or non-ASCII character; expected printable ASCII";
    for (char c : text) {
        if (c == ',' || (is_key && c == '='))
            return fmt::format("contains '{}'; expected no ',' in labels and no '=' in keys", c);
    }
    return std::nullopt;
}

std::optional<std::string> rule_name_problem(std::string_view name)
{
    if (name.empty())
        return "is empty; expected a stable name such as web-to-db";
    if (name.size() > max_rule_name_length) {
        return fmt::format("is {} characters long; expected at most {}", name.size(),
                           max_rule_name_length);
    }
    auto allowed = [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               c == '.' || c == '_' || c == '-';
    };
    if (!std::all_of(name.begin(), name.end(), allowed))
        return "has characters other than letters, digits, '.', '_' and '-'; expected a name "
               "such as web-to-db";
    return std::nullopt;
}

// A label set as a flow mapping, the way a selector for it is written.
std::string yaml_labels(const Labels& labels)
{
    std::string out;
    for (const auto& [key, value] : labels)
        out += fmt::format("{}{}: {}", out.empty() ? "{" : ", ", key, value);
    return out + "}";
}

// Paths are compared in normal form so /a/b/ and /a//b are one cgroup.
std::string normal_path(std::string_view path)
{
    std::string out = std::filesystem::path(path).lexically_normal().string();
    while (out.size() > 1 && out.back() == '/')
        out.pop_back();
    return out;
}

class Parser {
public:
    explicit Parser(std::string_view source) : source_(source) {}

    Policy run(std::string_view text);

private:
    // locations and messages
    Location locate(const YAML::Node& node) const;
    Location locate(const Entry& entry) const;
    [[noreturn]] void fail(Location at, std::string_view message) const;
    [[noreturn]] void fail(Location at, std::string_view what, std::string_view expected) const;
    void warn(Location at, std::string_view what);

    // generic shapes
    YAML::Node load(std::string_view text) const;
    Fields collect(const YAML::Node& map, std::string_view context) const;
    void check_keys(const Fields& fields, std::string_view context,
                    std::span<const std::string_view> allowed) const;
    std::string scalar(const Entry& entry, std::string_view context,
                       std::string_view expected) const;
    std::vector<YAML::Node> list(const Entry& entry, std::string_view context,
                                 std::string_view expected) const;
    Mode mode(const Entry& entry, std::string_view context) const;
    Prefix prefix(const YAML::Node& node, std::string_view context) const;
    std::vector<PortSpec> ports(const Entry& entry, std::string_view context) const;

    // the sections of a policy
    void parse_defaults(const Fields& top);
    void parse_identities(const Fields& top);
    Identity parse_identity(const YAML::Node& node, std::size_t index);
    std::string parse_identity_name(const Fields& fields, Location where,
                                    const std::string& anonymous) const;
    Labels parse_labels(const Entry& entry, std::string_view context) const;
    void check_unique_labels(const Identity& identity, const Entry& entry) const;
    void parse_cidrs(Identity& identity, const Entry& entry);
    void parse_cgroups(Identity& identity, const Entry& entry);
    void parse_rules(const Fields& top);
    Rule parse_rule(const YAML::Node& node, std::size_t index);
    std::string parse_rule_name(const Fields& fields, const YAML::Node& node,
                                std::size_t index) const;
    Selector parse_selector(const Entry& entry, const std::string& context);
    SelectorTerm parse_term(const YAML::Node& node, const std::string& context);
    SelectorTerm parse_keyword(const YAML::Node& node, const std::string& context) const;
    SelectorTerm parse_mapping_term(const YAML::Node& node, const std::string& context) const;
    std::vector<std::string> parse_label_values(const Entry& entry,
                                                const std::string& context) const;
    void parse_failsafe(const Fields& top);

    std::string source_;
    Policy policy_;
    // where each prefix and cgroup was listed, to reject one listed twice
    std::map<Prefix, std::pair<std::string, Location>> prefix_owner_;
    std::map<std::string, std::pair<std::string, Location>> cgroup_owner_;
    std::map<std::string, Location> rule_names_;
};

Location Parser::locate(const YAML::Node& node) const
{
    YAML::Mark mark = node.Mark();
    return {std::max(mark.line, 0) + 1, std::max(mark.column, 0) + 1};
}

Location Parser::locate(const Entry& entry) const
{
    return locate(entry.value.IsNull() ? entry.key : entry.value);
}

void Parser::fail(Location at, std::string_view message) const
{
    throw Error(fmt::format("{}:{}:{}: {}", source_, at.line, at.column, message));
}

void Parser::fail(Location at, std::string_view what, std::string_view expected) const
{
    fail(at, fmt::format("{}; {}", what, expected));
}

void Parser::warn(Location at, std::string_view what)
{
    policy_.warnings.push_back(
        fmt::format("{}:{}:{}: warning: {}", source_, at.line, at.column, what));
}

YAML::Node Parser::load(std::string_view text) const
{
    std::vector<YAML::Node> documents;
    try {
        documents = YAML::LoadAll(std::string(text));
    } catch (const YAML::Exception& e) {
        Location at{std::max(e.mark.line, 0) + 1, std::max(e.mark.column, 0) + 1};
        fail(at, fmt::format("invalid YAML: {}", e.msg),
             "expected well-formed YAML; check indentation, quotes and brackets here");
    }

    if (documents.empty() || documents.front().IsNull()) {
        fail({1, 1}, "the policy is empty",
             "expected a mapping with apiVersion: bulkhead/v1, identities and rules");
    }
    if (documents.size() > 1)
        fail(locate(documents[1]), "a second YAML document starts here", "expected one policy");
    return documents.front();
}

Fields Parser::collect(const YAML::Node& map, std::string_view context) const
{
    Fields fields;
    for (const auto& pair : map) {
        if (!pair.first.IsScalar()) {
            fail(locate(pair.first), fmt::format("a key {} is {}", context, describe(pair.first)),
                 "expected a plain name");
        }
        if (fields.find(pair.first.Scalar())) {
            fail(locate(pair.first),
                 fmt::format("duplicate key '{}' {}", printable(pair.first.Scalar()), context),
                 "expected each key once");
        }
        fields.entries.push_back({pair.first, pair.second});
    }
    return fields;
}

void Parser::check_keys(const Fields& fields, std::string_view context,
                        std::span<const std::string_view> allowed) const
{
    for (const auto& entry : fields.entries) {
        const std::string& key = entry.key.Scalar();
        if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
            fail(locate(entry.key), fmt::format("unknown key '{}' {}", printable(key), context),
                 fmt::format("expected one of: {}", join(allowed)));
        }
    }
}

std::string Parser::scalar(const Entry& entry, std::string_view context,
                           std::string_view expected) const
{
    if (!entry.value.IsScalar()) {
        fail(locate(entry),
             fmt::format("'{}' {} is {}", entry.key.Scalar(), context, describe(entry.value)),
             expected);
    }
    return entry.value.Scalar();
}

// A list value; an empty value reads as an empty list.
std::vector<YAML::Node> Parser::list(const Entry& entry, std::string_view context,
                                     std::string_view expected) const
{
    if (entry.value.IsNull())
        return {};
    if (!entry.value.IsSequence()) {
        fail(locate(entry),
             fmt::format("'{}' {} is {}", entry.key.Scalar(), context, describe(entry.value)),
             expected);
    }
    return elements(entry.value);
}

Mode Parser::mode(const Entry& entry, std::string_view context) const
{
    constexpr std::string_view expected = "expected one of: enforce, audit, allow";
    std::string text = scalar(entry, context, expected);
    for (Mode m : {Mode::enforce, Mode::audit, Mode::allow}) {
        if (text == to_string(m))
            return m;
    }
    fail(locate(entry),
         fmt::format("unknown mode '{}' for '{}' {}", printable(text), entry.key.Scalar(), context),
         expected);
}

Prefix Parser::prefix(const YAML::Node& node, std::string_view context) const
{
    if (!node.IsScalar()) {
        fail(locate(node), fmt::format("a CIDR {} is {}", context, describe(node)),
             "expected a prefix such as 198.51.100.0/24");
    }
    std::string why;
    std::optional<Prefix> parsed = Prefix::parse(node.Scalar(), &why);
    if (!parsed)
        fail(locate(node),
             fmt::format("bad CIDR '{}' {}: {}", printable(node.Scalar()), context, why));
    return *parsed;
}

std::vector<PortSpec> Parser::ports(const Entry& entry, std::string_view context) const
{
    std::vector<YAML::Node> items = list(entry, context, "expected a list such as [tcp/443]");
    if (items.empty()) {
        fail(locate(entry), fmt::format("'{}' {} is empty", entry.key.Scalar(), context),
             "expected at least one port such as tcp/443");
    }

    std::vector<PortSpec> specs;
    for (const auto& item : items) {
        if (!item.IsScalar()) {
            fail(locate(item), fmt::format("a port {} is {}", context, describe(item)),
                 "expected text such as tcp/443");
        }
        std::string why;
        std::optional<PortSpec> spec = PortSpec::parse(item.Scalar(), &why);
        if (!spec)
            fail(locate(item),
                 fmt::format("bad port '{}' {}: {}", printable(item.Scalar()), context, why));
        specs.push_back(*spec);
    }
    return specs;
}

Policy Parser::run(std::string_view text)
{
    YAML::Node root = load(text);
    if (!root.IsMap()) {
        fail(locate(root), fmt::format("the policy is {}", describe(root)),
             "expected a mapping with apiVersion: bulkhead/v1, identities and rules");
    }

    Fields top = collect(root, "at top level");
    check_keys(top, "at top level", top_keys);
    const Entry* version = top.find("apiVersion");
    if (!version)
        fail(locate(root), "missing 'apiVersion'", "expected apiVersion: bulkhead/v1");
    std::string version_text = scalar(*version, "at top level", "expected bulkhead/v1");
    if (version_text != "bulkhead/v1") {
        fail(locate(*version), fmt::format("unsupported apiVersion '{}'", printable(version_text)),
             "expected bulkhead/v1");
    }
    policy_.api_version = version_text;

    // defaults first: identities that say nothing take their modes from it
    parse_defaults(top);
    // identities before rules: selector warnings need the identities
    parse_identities(top);
    parse_rules(top);
    parse_failsafe(top);
    return std::move(policy_);
}

void Parser::parse_defaults(const Fields& top)
{
    const Entry* entry = top.find("defaults");
    if (!entry || entry->value.IsNull())
        return;
    if (!entry->value.IsMap()) {
        fail(locate(*entry), fmt::format("'defaults' is {}", describe(entry->value)),
             "expected a mapping such as {ingress: allow, egress: allow}");
    }

    Fields fields = collect(entry->value, "in defaults");
    check_keys(fields, "in defaults", defaults_keys);
    if (const Entry* ingress = fields.find("ingress"))
        policy_.default_ingress = mode(*ingress, "in defaults");
    if (const Entry* egress = fields.find("egress"))
        policy_.default_egress = mode(*egress, "in defaults");
}

void Parser::parse_identities(const Fields& top)
{
    const Entry* entry = top.find("identities");
    if (!entry)
        return;

    std::vector<YAML::Node> items =
        list(*entry, "at top level", "expected a list of identities, each with name and labels");
    for (std::size_t i = 0; i < items.size(); i++)
        policy_.identities.push_back(parse_identity(items[i], i));
}

Identity Parser::parse_identity(const YAML::Node& node, std::size_t index)
{
    std::string anonymous = fmt::format("identity #{}", index + 1);
    if (!node.IsMap()) {
        fail(locate(node), fmt::format("{} is {}", anonymous, describe(node)),
             "expected a mapping with name and labels");
    }

    Identity identity;
    identity.where = locate(node);
    identity.ingress = policy_.default_ingress;
    identity.egress = policy_.default_egress;

    Fields fields = collect(node, "in " + anonymous);
    identity.name = parse_identity_name(fields, identity.where, anonymous);

    std::string context = fmt::format("in identity '{}'", identity.name);
    check_keys(fields, context, identity_keys);

    const Entry* labels = fields.find("labels");
    if (!labels) {
        fail(identity.where, fmt::format("identity '{}' has no 'labels'", identity.name),
             "expected a label mapping such as {app: db}");
    }
    identity.labels = parse_labels(*labels, context);
    check_unique_labels(identity, *labels);

    if (const Entry* cidrs = fields.find("cidrs"))
        parse_cidrs(identity, *cidrs);
    if (const Entry* cgroups = fields.find("cgroups"))
        parse_cgroups(identity, *cgroups);
    if (const Entry* ingress = fields.find("ingress"))
        identity.ingress = mode(*ingress, context);
    if (const Entry* egress = fields.find("egress"))
        identity.egress = mode(*egress, context);
    return identity;
}

std::string Parser::parse_identity_name(const Fields& fields, Location where,
                                        const std::string& anonymous) const
{
    constexpr std::string_view expected = "expected a name such as db";
    const Entry* entry = fields.find("name");
    if (!entry) {
        // a misspelt key is the likelier mistake, and the better message
        check_keys(fields, "in " + anonymous, identity_keys);
        fail(where, fmt::format("{} has no 'name'", anonymous), expected);
    }

    std::string name = scalar(*entry, "in " + anonymous, expected);
    if (auto problem = label_text_problem(name, false))
        fail(locate(*entry), fmt::format("identity name '{}' {}", printable(name), *problem));
    for (const auto& other : policy_.identities) {
        if (other.name == name) {
            fail(locate(*entry),
                 fmt::format("identity name '{}' is already used on line {}", name,
                             other.where.line),
                 "expected a unique name");
        }
    }
    return name;
}

Labels Parser::parse_labels(const Entry& entry, std::string_view context) const
{
    constexpr std::string_view expected = "expected a label mapping such as {app: db}";
    if (!entry.value.IsMap() || entry.value.size() == 0) {
        fail(locate(entry), fmt::format("'labels' {} is {}", context, describe(entry.value)),
             expected);
    }

    Labels labels;
    for (const auto& label : collect(entry.value, context).entries) {
        const std::string& key = label.key.Scalar();
        if (auto problem = label_text_problem(key, true))
            fail(locate(label.key),
                 fmt::format("label key '{}' {} {}", printable(key), context, *problem));
        if (key == "cidr") {
            fail(locate(label.key), fmt::format("label key 'cidr' {} is reserved", context),
                 "expected another key: {cidr: PREFIX} in a selector means an address prefix");
        }
        std::string value = scalar(label, context, "expected one value such as db");
        if (auto problem = label_text_problem(value, false))
            fail(locate(label),
                 fmt::format("label value '{}' {} {}", printable(value), context, *problem));
        labels[key] = value;
    }
    return labels;
}

void Parser::check_unique_labels(const Identity& identity, const Entry& entry) const
{
    for (const auto& other : policy_.identities) {
        if (other.labels == identity.labels) {
            fail(locate(entry),
                 fmt::format("identity '{}' has the same labels as identity '{}' "
                             "on line {}",
                             identity.name, other.name, other.where.line),
                 "expected a label set of its own: policy matches labels, not names");
        }
    }
}

void Parser::parse_cidrs(Identity& identity, const Entry& entry)
{
    std::string context = fmt::format("in identity '{}'", identity.name);
    for (const auto& item : list(entry, context, "expected a list such as [198.51.100.0/24]")) {
        Prefix parsed = prefix(item, context);
        // the longest prefix decides an address's identity, so one prefix
        // in two places would leave that decision to chance
        auto [owner, fresh] = prefix_owner_.try_emplace(parsed, identity.name, locate(item));
        if (!fresh) {
            fail(
                locate(item),
                fmt::format("CIDR '{}' {} is already listed by identity '{}' on "
                            "line {}",
                            item.Scalar(), context, owner->second.first, owner->second.second.line),
                "expected each prefix in one identity only");
        }
        identity.cidrs.push_back(parsed);
    }
}

void Parser::parse_cgroups(Identity& identity, const Entry& entry)
{
    std::string context = fmt::format("in identity '{}'", identity.name);
    constexpr std::string_view expected =
        "expected an absolute path such as /sys/fs/cgroup/db.slice";
    for (const auto& item : list(entry, context, "expected a list of cgroup paths")) {
        if (!item.IsScalar())
            fail(locate(item), fmt::format("a cgroup {} is {}", context, describe(item)), expected);
        if (item.Scalar().empty() || item.Scalar().front() != '/') {
            fail(locate(item),
                 fmt::format("cgroup '{}' {} is not an absolute path", printable(item.Scalar()),
                             context),
                 expected);
        }
        if (has_unprintable(item.Scalar())) {
            fail(locate(item),
                 fmt::format("cgroup '{}' {} has a control or non-ASCII character",
                             printable(item.Scalar()), context),
                 expected);
        }
        auto [owner, fresh] =
            cgroup_owner_.try_emplace(normal_path(item.Scalar()), identity.name, locate(item));
        if (!fresh) {
            fail(
                locate(item),
                fmt::format("cgroup '{}' {} is already listed by identity '{}' on "
                            "line {}",
                            item.Scalar(), context, owner->second.first, owner->second.second.line),
                "expected each cgroup in one identity only");
        }
        identity.cgroups.push_back(item.Scalar());
    }
}

void Parser::parse_rules(const Fields& top)
{
    const Entry* entry = top.find("rules");
    if (!entry)
        return;

    std::vector<YAML::Node> items = list(
        *entry, "at top level", "expected a list of rules, each with name, from, to and action");
    for (std::size_t i = 0; i < items.size(); i++)
        policy_.rules.push_back(parse_rule(items[i], i));
}

Rule Parser::parse_rule(const YAML::Node& node, std::size_t index)
{
    if (!node.IsMap()) {
        fail(locate(node), fmt::format("rule #{} is {}", index + 1, describe(node)),
             "expected a mapping with name, from, to, ports and action");
    }

    Rule rule;
    rule.where = locate(node);
    Fields fields = collect(node, fmt::format("in rule #{}", index + 1));
    rule.name = parse_rule_name(fields, node, index);
    rule_names_.emplace(rule.name, rule.where);

    std::string context = fmt::format("in rule '{}'", rule.name);
    check_keys(fields, context, rule_keys);
    for (std::string_view side : {"from", "to"}) {
        if (!fields.find(side)) {
            fail(rule.where, fmt::format("rule '{}' has no '{}'", rule.name, side), selector_forms);
        }
    }
    rule.from = parse_selector(*fields.find("from"), fmt::format("rule '{}' (from)", rule.name));
    rule.to = parse_selector(*fields.find("to"), fmt::format("rule '{}' (to)", rule.name));

    const Entry* ports = fields.find("ports");
    rule.ports = ports ? this->ports(*ports, context) : std::vector<PortSpec>{PortSpec{}};

    const Entry* action = fields.find("action");
    constexpr std::string_view expected = "expected allow or deny";
    if (!action)
        fail(rule.where, fmt::format("rule '{}' has no 'action'", rule.name), expected);
    std::string action_text = scalar(*action, context, expected);
    if (action_text != "allow" && action_text != "deny") {
        fail(locate(*action),
             fmt::format("unknown action '{}' {}", printable(action_text), context), expected);
    }
    rule.action = action_text == "allow" ? Action::allow : Action::deny;
    return rule;
}

std::string Parser::parse_rule_name(const Fields& fields, const YAML::Node& node,
                                    std::size_t index) const
{
    std::string anonymous = fmt::format("rule #{}", index + 1);
    constexpr std::string_view expected = "expected a stable name such as web-to-db";
    const Entry* entry = fields.find("name");
    if (!entry) {
        // a misspelt key is the likelier mistake, and the better message
        check_keys(fields, "in " + anonymous, rule_keys);
        fail(locate(node), fmt::format("{} has no 'name'", anonymous), expected);
    }

    std::string name = scalar(*entry, "in " + anonymous, expected);
    if (auto problem = rule_name_problem(name))
        fail(locate(*entry), fmt::format("rule name '{}' {}", printable(name), *problem));
    if (auto other = rule_names_.find(name); other != rule_names_.end()) {
        fail(locate(*entry),
             fmt::format("rule name '{}' is already used on line {}", name, other->second.line),
             "expected a unique name: counters and events report rules by name");
    }
    return name;
}

Selector Parser::parse_selector(const Entry& entry, const std::string& context)
{
    const YAML::Node& value = entry.value;
    if (value.IsNull() || (value.IsSequence() && value.size() == 0))
        fail(locate(entry), fmt::format("selector in {} is {}", context, describe(value)),
             selector_forms);

    Selector selector;
    if (!value.IsSequence()) {
        selector.terms.push_back(parse_term(value, context));
        return selector;
    }
    for (const auto& item : value) {
        if (item.IsSequence() || item.IsNull()) {
            fail(locate(item), fmt::format("a selector in {} is {}", context, describe(item)),
                 "expected any, world, host, a label mapping or {cidr: PREFIX}");
        }
        selector.terms.push_back(parse_term(item, context));
    }
    return selector;
}

SelectorTerm Parser::parse_term(const YAML::Node& node, const std::string& context)
{
    if (node.IsScalar())
        return parse_keyword(node, context);

    SelectorTerm term = parse_mapping_term(node, context);
    if (term.kind != SelectorTerm::Kind::labels)
        return term;

    // a label selector that matches nothing is most often a typo in a label
    bool matches = std::any_of(
        policy_.identities.begin(), policy_.identities.end(), [&](const Identity& identity) {
            return term_matches_labels(term, Subject{BH_ID_FIRST_WORKLOAD, &identity.labels});
        });
    if (!matches)
        warn(locate(node), fmt::format("selector in {} matches no identity", context));
    return term;
}

SelectorTerm Parser::parse_keyword(const YAML::Node& node, const std::string& context) const
{
    const std::string& text = node.Scalar();
    if (text == "any")
        return SelectorTerm{SelectorTerm::Kind::any, {}, {}};
    if (text == "world")
        return SelectorTerm{SelectorTerm::Kind::world, {}, {}};
    if (text == "host")
        return SelectorTerm{SelectorTerm::Kind::host, {}, {}};

    // naming an identity is the likely intent; say that selectors use labels
    for (const auto& identity : policy_.identities) {
        if (identity.name == text) {
            fail(locate(node), fmt::format("unknown selector '{}' in {}", printable(text), context),
                 fmt::format("expected labels, such as {} for identity '{}': selectors match "
                             "labels, not names",
                             yaml_labels(identity.labels), identity.name));
        }
    }
    fail(locate(node), fmt::format("unknown selector '{}' in {}", printable(text), context),
         selector_forms);
}

SelectorTerm Parser::parse_mapping_term(const YAML::Node& node, const std::string& context) const
{
    std::string in = "in " + context;
    Fields fields = collect(node, in);
    if (fields.entries.empty())
        fail(locate(node), fmt::format("selector {} is an empty mapping", in), selector_forms);

    if (const Entry* cidr = fields.find("cidr")) {
        for (const auto& entry : fields.entries) {
            if (&entry != cidr) {
                fail(locate(entry.key),
                     fmt::format("key '{}' next to 'cidr' {}", printable(entry.key.Scalar()), in),
                     "expected {cidr: PREFIX} alone; use a list of selectors for either one");
            }
        }
        return SelectorTerm{SelectorTerm::Kind::cidr, {}, prefix(cidr->value, in)};
    }

    SelectorTerm term{SelectorTerm::Kind::labels, {}, {}};
    for (const auto& entry : fields.entries) {
        const std::string& key = entry.key.Scalar();
        if (auto problem = label_text_problem(key, true))
            fail(locate(entry.key),
                 fmt::format("label key '{}' {} {}", printable(key), in, *problem));
        term.match[key] = parse_label_values(entry, context);
    }
    return term;
}

std::vector<std::string> Parser::parse_label_values(const Entry& entry,
                                                    const std::string& context) const
{
    std::string what = fmt::format("label '{}' in {}", entry.key.Scalar(), context);
    constexpr std::string_view expected = "expected a value or a list of values such as [a, b]";
    std::vector<YAML::Node> items;
    if (entry.value.IsScalar())
        items.push_back(entry.value);
    else if (entry.value.IsSequence())
        items = elements(entry.value);
    if (items.empty())
        fail(locate(entry), fmt::format("{} is {}", what, describe(entry.value)), expected);

    std::vector<std::string> values;
    for (const auto& item : items) {
        if (!item.IsScalar())
            fail(locate(item), fmt::format("a value of {} is {}", what, describe(item)), expected);
        if (auto problem = label_text_problem(item.Scalar(), false))
            fail(locate(item),
                 fmt::format("value '{}' of {} {}", printable(item.Scalar()), what, *problem));
        values.push_back(item.Scalar());
    }
    return values;
}

void Parser::parse_failsafe(const Fields& top)
{
    Failsafe& failsafe = policy_.failsafe;
    failsafe.ports = {PortSpec{PortSpec::Proto::tcp, 22, 22}};
    failsafe.from = {*Prefix::parse("0.0.0.0/0"), *Prefix::parse("::/0")};

    const Entry* entry = top.find("failsafe");
    if (!entry || entry->value.IsNull())
        return;
    if (!entry->value.IsMap()) {
        fail(locate(*entry), fmt::format("'failsafe' is {}", describe(entry->value)),
             "expected a mapping such as {ports: [tcp/22], from: [203.0.113.0/24]}");
    }

    Fields fields = collect(entry->value, "in failsafe");
    check_keys(fields, "in failsafe", failsafe_keys);
    if (const Entry* enabled = fields.find("enabled")) {
        constexpr std::string_view expected = "expected true or false";
        std::string text = scalar(*enabled, "in failsafe", expected);
        if (!YAML::convert<bool>::decode(enabled->value, failsafe.enabled)) {
            fail(locate(*enabled), fmt::format("'enabled' in failsafe is '{}'", printable(text)),
                 expected);
        }
    }
    if (const Entry* ports = fields.find("ports"))
        failsafe.ports = this->ports(*ports, "in failsafe");
    if (const Entry* from = fields.find("from")) {
        std::vector<YAML::Node> items =
            list(*from, "in failsafe", "expected a list such as [203.0.113.0/24]");
        if (items.empty()) {
            fail(locate(*from), "'from' in failsafe is empty",
                 "expected at least one management prefix, or enabled: false");
        }
        failsafe.from.clear();
        for (const auto& item : items)
            failsafe.from.push_back(prefix(item, "in failsafe"));
    }

    // the datapath spells failsafe ports out one by one, so keep them few
    std::size_t ports = 0;
    for (const PortSpec& spec : failsafe.ports)
        ports += std::size_t{spec.hi - spec.lo + 1u} * (spec.proto == PortSpec::Proto::any ? 3 : 1);
    if (ports * failsafe.from.size() > kMaxFailsafeEntries) {
        fail(locate(*entry),
             fmt::format("failsafe opens {} ports to {} prefixes, more than the {} entries "
                         "it may use",
                         ports, failsafe.from.size(), kMaxFailsafeEntries),
             "expected a few management ports, such as [tcp/22]");
    }
}

std::string errno_hint(int error)
{
    switch (error) {
    case EACCES:
    case EPERM:
        return "check the file's permissions";
    case EISDIR:
        return "expected a file, not a directory";
    default:
        return "check the path";
    }
}

[[noreturn]] void throw_read_error(const std::filesystem::path& path, int error)
{
    throw Error(fmt::format("cannot read policy file '{}': {} (errno {}); {}", path.string(),
                            std::generic_category().message(error), error, errno_hint(error)),
                error);
}

std::string read_file(const std::filesystem::path& path)
{
    struct Closer {
        void operator()(std::FILE* file) const { std::fclose(file); }
    };

    errno = 0;
    std::unique_ptr<std::FILE, Closer> file(std::fopen(path.c_str(), "rb"));
    if (!file)
        throw_read_error(path, errno);

    std::string text;
    char buffer[4096];
    std::size_t got = 0;
    while ((got = std::fread(buffer, 1, sizeof(buffer), file.get())) > 0)
        text.append(buffer, got);
    if (std::ferror(file.get()))
        throw_read_error(path, errno != 0 ? errno : EIO);
    return text;
}

}  // namespace

Policy Policy::parse(std::string_view text, std::string_view source)
{
    return Parser(source).run(text);
}

Policy Policy::load(const std::filesystem::path& path)
{
    return parse(read_file(path), path.string());
}

}  // namespace bulkhead
