// Addresses, prefixes and the names of verdicts.
#include <bulkhead/types.hpp>

#include <arpa/inet.h>

#include <algorithm>
#include <string>

#include <fmt/format.h>

namespace bulkhead {

namespace {

constexpr std::size_t v4_offset = 12;  // IPv4 bytes inside ::ffff:a.b.c.d
constexpr int v4_prefix_base = 96;     // an IPv4 /n is a /(96 + n) of the mapped form

// `addr` with every bit beyond the first `len` cleared.
IpAddr masked(const IpAddr& addr, int len)
{
    IpAddr out = addr;
    for (int bit = 0; bit < 128; bit += 8) {
        int keep = std::clamp(len - bit, 0, 8);
        out.bytes[bit / 8] &= static_cast<std::uint8_t>(0xff00u >> keep);
    }
    return out;
}

std::nullopt_t fail(std::string* why, std::string reason)
{
    if (why)
        *why = std::move(reason);
    return std::nullopt;
}

// Digits only: "+24", " 24" and "24x" are not prefix lengths. Saturates at
// 1000, so a long run of digits is out of range rather than wrapped around.
std::optional<int> parse_length(std::string_view text)
{
    if (text.empty())
        return std::nullopt;

    int value = 0;
    for (char c : text) {
        if (c < '0' || c > '9')
            return std::nullopt;
        value = std::min(value * 10 + (c - '0'), 1000);
    }
    return value;
}

}  // namespace

bool IpAddr::is_v4() const noexcept
{
    for (std::size_t i = 0; i < 10; i++) {
        if (bytes[i] != 0)
            return false;
    }
    return bytes[10] == 0xff && bytes[11] == 0xff;
}

std::optional<IpAddr> IpAddr::parse(std::string_view text)
{
    // inet_pton needs a terminated string, and would stop early at an embedded NUL
    std::string copy(text);
    if (copy.size() != std::char_traits<char>::length(copy.c_str()))
        return std::nullopt;

    IpAddr addr;
    if (inet_pton(AF_INET, copy.c_str(), &addr.bytes[v4_offset]) == 1) {
        addr.bytes[10] = 0xff;
        addr.bytes[11] = 0xff;
        return addr;
    }
    if (inet_pton(AF_INET6, copy.c_str(), addr.bytes.data()) == 1)
        return addr;
    return std::nullopt;
}

IpAddr IpAddr::v4(std::uint32_t host_order)
{
    IpAddr addr;
    addr.bytes[10] = 0xff;
    addr.bytes[11] = 0xff;
    for (std::size_t i = 0; i < 4; i++)
        addr.bytes[v4_offset + i] = static_cast<std::uint8_t>(host_order >> (24 - 8 * i));
    return addr;
}

std::string IpAddr::str() const
{
    char text[INET6_ADDRSTRLEN] = {};
    if (is_v4())
        inet_ntop(AF_INET, &bytes[v4_offset], text, sizeof(text));
    else
        inet_ntop(AF_INET6, bytes.data(), text, sizeof(text));
    return text;
}

std::optional<Prefix> Prefix::parse(std::string_view text, std::string* why)
{
    std::size_t slash = text.find('/');
    std::string_view addr_text = text.substr(0, slash);
    std::optional<IpAddr> addr = IpAddr::parse(addr_text);
    if (!addr) {
        return fail(why, fmt::format("'{}' is not an IPv4 or IPv6 address; expected a prefix "
                                     "such as 198.51.100.0/24 or 2001:db8::/32",
                                     addr_text));
    }

    // the length counts in the family the address was written in, so
    // ::ffff:198.51.100.0/120 and 198.51.100.0/24 are the same prefix
    bool written_v4 = addr_text.find(':') == std::string_view::npos;
    int max_len = written_v4 ? 32 : 128;
    std::string_view family = written_v4 ? "IPv4" : "IPv6";
    int len = max_len;
    if (slash != std::string_view::npos) {
        std::string_view len_text = text.substr(slash + 1);
        std::optional<int> parsed = parse_length(len_text);
        if (!parsed) {
            return fail(why, fmt::format("prefix length '{}' is not a number; expected 0-{} for {}",
                                         len_text, max_len, family));
        }
        if (*parsed > max_len) {
            return fail(why, fmt::format("prefix length {} is out of range; expected 0-{} for {}",
                                         len_text, max_len, family));
        }
        len = *parsed;
    }

    Prefix prefix{*addr, static_cast<std::uint8_t>(written_v4 ? v4_prefix_base + len : len)};
    Prefix network{masked(prefix.addr, prefix.len), prefix.len};
    if (network != prefix)
        return fail(why, fmt::format("host bits set; did you mean {}?", network.str()));
    return prefix;
}

bool Prefix::contains(const IpAddr& a) const noexcept
{
    // IPv4 lives inside ::ffff:0:0/96 of the 128-bit space, but an IPv6
    // prefix such as ::/0 means IPv6 addresses only, as in nftables
    if (len < v4_prefix_base && a.is_v4())
        return false;
    return masked(a, len) == addr;
}

bool Prefix::contains(const Prefix& p) const noexcept
{
    return p.len >= len && contains(p.addr);
}

std::string Prefix::str() const
{
    // a prefix inside ::ffff:0:0/96 was an IPv4 prefix, and prints as one
    if (addr.is_v4() && len >= v4_prefix_base)
        return fmt::format("{}/{}", addr.str(), len - v4_prefix_base);
    return fmt::format("{}/{}", addr.str(), len);
}

std::string_view to_string(VerdictKind v)
{
    switch (v) {
    case VerdictKind::allow:
        return "allow";
    case VerdictKind::deny:
        return "deny";
    case VerdictKind::audit:
        return "audit";
    }
    return "unknown";
}

std::string_view to_string(Reason r)
{
    switch (r) {
    case Reason::rule:
        return "rule";
    case Reason::default_mode:
        return "default";
    case Reason::tracked:
        return "tracked";
    case Reason::failsafe:
        return "failsafe";
    case Reason::not_policed:
        return "not-policed";
    }
    return "unknown";
}

}  // namespace bulkhead
