#include "policy_json.hpp"

#include <bulkhead/types.hpp>

namespace bulkhead::detail {
namespace {

using nlohmann::json;

Prefix prefix_from(const json& j)
{
    auto p = Prefix::parse(j.get<std::string>());
    if (!p)
        throw Error("stored policy holds a bad prefix '" + j.get<std::string>() + "'");
    return *p;
}

json prefixes_to(const std::vector<Prefix>& prefixes)
{
    json out = json::array();
    for (const Prefix& p : prefixes)
        out.push_back(p.str());
    return out;
}

std::vector<Prefix> prefixes_from(const json& j)
{
    std::vector<Prefix> out;
    for (const json& p : j)
        out.push_back(prefix_from(p));
    return out;
}

json ports_to(const std::vector<PortSpec>& ports)
{
    json out = json::array();
    for (const PortSpec& p : ports)
        out.push_back({static_cast<int>(p.proto), p.lo, p.hi});
    return out;
}

std::vector<PortSpec> ports_from(const json& j)
{
    std::vector<PortSpec> out;
    for (const json& p : j)
        out.push_back(PortSpec{static_cast<PortSpec::Proto>(p.at(0).get<int>()),
                               p.at(1).get<std::uint16_t>(), p.at(2).get<std::uint16_t>()});
    return out;
}

json selector_to(const Selector& sel)
{
    json out = json::array();
    for (const SelectorTerm& t : sel.terms) {
        json term = {{"kind", static_cast<int>(t.kind)}};
        if (t.kind == SelectorTerm::Kind::labels)
            term["match"] = t.match;
        if (t.kind == SelectorTerm::Kind::cidr)
            term["cidr"] = t.cidr.str();
        out.push_back(term);
    }
    return out;
}

Selector selector_from(const json& j)
{
    Selector sel;
    for (const json& term : j) {
        SelectorTerm t;
        t.kind = static_cast<SelectorTerm::Kind>(term.at("kind").get<int>());
        if (term.contains("match"))
            t.match = term["match"].get<std::map<std::string, std::vector<std::string>>>();
        if (term.contains("cidr"))
            t.cidr = prefix_from(term["cidr"]);
        sel.terms.push_back(std::move(t));
    }
    return sel;
}

}  // namespace

json policy_to_json(const Policy& policy)
{
    json identities = json::array();
    for (const Identity& i : policy.identities)
        identities.push_back({{"name", i.name},
                              {"labels", i.labels},
                              {"cidrs", prefixes_to(i.cidrs)},
                              {"cgroups", i.cgroups},
                              {"ingress", static_cast<int>(i.ingress)},
                              {"egress", static_cast<int>(i.egress)}});
    json rules = json::array();
    for (const Rule& r : policy.rules)
        rules.push_back({{"name", r.name},
                         {"from", selector_to(r.from)},
                         {"to", selector_to(r.to)},
                         {"ports", ports_to(r.ports)},
                         {"action", static_cast<int>(r.action)}});
    return {{"api_version", policy.api_version},
            {"default_ingress", static_cast<int>(policy.default_ingress)},
            {"default_egress", static_cast<int>(policy.default_egress)},
            {"identities", identities},
            {"rules", rules},
            {"failsafe",
             {{"enabled", policy.failsafe.enabled},
              {"ports", ports_to(policy.failsafe.ports)},
              {"from", prefixes_to(policy.failsafe.from)}}}};
}

Policy policy_from_json(const json& j)
{
    Policy p;
    p.api_version = j.at("api_version").get<std::string>();
    p.default_ingress = static_cast<Mode>(j.at("default_ingress").get<int>());
    p.default_egress = static_cast<Mode>(j.at("default_egress").get<int>());
    for (const json& i : j.at("identities")) {
        Identity ident;
        ident.name = i.at("name").get<std::string>();
        ident.labels = i.at("labels").get<Labels>();
        ident.cidrs = prefixes_from(i.at("cidrs"));
        ident.cgroups = i.at("cgroups").get<std::vector<std::string>>();
        ident.ingress = static_cast<Mode>(i.at("ingress").get<int>());
        ident.egress = static_cast<Mode>(i.at("egress").get<int>());
        p.identities.push_back(std::move(ident));
    }
    for (const json& r : j.at("rules")) {
        Rule rule;
        rule.name = r.at("name").get<std::string>();
        rule.from = selector_from(r.at("from"));
        rule.to = selector_from(r.at("to"));
        rule.ports = ports_from(r.at("ports"));
        rule.action = static_cast<Action>(r.at("action").get<int>());
        p.rules.push_back(std::move(rule));
    }
    const json& fs = j.at("failsafe");
    p.failsafe.enabled = fs.at("enabled").get<bool>();
    p.failsafe.ports = ports_from(fs.at("ports"));
    p.failsafe.from = prefixes_from(fs.at("from"));
    return p;
}

}  // namespace bulkhead::detail
