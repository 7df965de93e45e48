// Value types shared by the whole public API: addresses, prefixes, flows,
// verdicts and the one error type.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace bulkhead {

// The single error type of the library. what() is a complete sentence for a
// user: the action, the object and the cause, and what to do where known.
class Error : public std::runtime_error {
public:
    explicit Error(std::string message, int error_number = 0)
        : std::runtime_error(std::move(message)), errno_(error_number)
    {
    }

    // The errno behind the failure, or 0 when it was not a system call.
    int error_number() const noexcept { return errno_; }

private:
    int errno_;
};

// An IPv4 or IPv6 address. IPv4 is kept as the IPv4-mapped IPv6 address
// (::ffff:a.b.c.d), the form the IP cache uses, so an IPv4-mapped IPv6
// address and its IPv4 address are the same value.
struct IpAddr {
    std::array<std::uint8_t, 16> bytes{};

    bool is_v4() const noexcept;
    // Parses "198.51.100.7" or "2001:db8::1"; nullopt if it is neither.
    static std::optional<IpAddr> parse(std::string_view text);
    static IpAddr v4(std::uint32_t host_order);
    std::string str() const;

    auto operator<=>(const IpAddr&) const = default;
};

// An address prefix. `len` counts bits of the 128-bit form: an IPv4 /24 has
// len 120. Use family_len() for the length as written. An IPv6 prefix
// shorter than /96, such as ::/0, contains no IPv4 address: as in nftables,
// a prefix written for IPv6 never covers IPv4.
struct Prefix {
    IpAddr addr;
    std::uint8_t len = 128;

    // Parses "198.51.100.0/24", "2001:db8::/32", or a bare address (host
    // prefix). Bits beyond the length must be zero; nullopt otherwise, with
    // the reason in *why when given.
    static std::optional<Prefix> parse(std::string_view text, std::string* why = nullptr);
    bool contains(const IpAddr& a) const noexcept;
    bool contains(const Prefix& p) const noexcept;
    bool is_host() const noexcept { return len == 128; }
    int family_len() const noexcept { return addr.is_v4() ? len - 96 : len; }
    std::string str() const;

    auto operator<=>(const Prefix&) const = default;
};

// One packet or connection attempt, as explain() and the reference
// evaluator see it.
struct Flow {
    IpAddr src;
    IpAddr dst;
    std::uint8_t proto = 6;  // IPPROTO_*
    // Destination port for TCP, UDP and SCTP; type << 8 | code for ICMP.
    std::uint16_t port = 0;
    // False for a non-first fragment: the port is unknown, and only rules
    // that cover every port of the protocol apply.
    bool has_port = true;
    // IPv6 neighbour discovery (ICMPv6 133-137 with hop limit 255).
    bool neighbour_discovery = false;
};

enum class VerdictKind : std::uint8_t { allow, deny, audit };
enum class Reason : std::uint8_t { rule, default_mode, tracked, failsafe, not_policed };

std::string_view to_string(VerdictKind v);
std::string_view to_string(Reason r);

// The outcome for one flow: what happens to it and why.
struct Verdict {
    VerdictKind kind = VerdictKind::allow;
    Reason reason = Reason::default_mode;
    std::optional<std::string> rule;  // the deciding rule's name
    std::uint32_t src_identity = 0;   // datapath identities, for diagnostics
    std::uint32_t dst_identity = 0;

    bool passes() const noexcept { return kind != VerdictKind::deny; }
    bool operator==(const Verdict&) const = default;
};

}  // namespace bulkhead
