// Test packets built by fields, and a runner for XDP programs.
//
// A Packet describes a frame layer by layer; bytes() lays it out. Every
// length, offset and next-header field is derived from the layers unless a
// test overrides it, so a test states only the fields it is about:
//
//   Packet()
//       .vlan(10, kTpid8021ad).vlan(20)
//       .ipv4({.src = "203.0.113.9", .dst = "198.51.100.2", .options = {0x94, 0x04, 0, 0}})
//       .tcp({.dport = 443})
//       .bytes();
//
// Checksums (IPv4 header, TCP, UDP, ICMP, ICMPv6) are computed over what the
// packet holds; they are right for unfragmented packets and merely plausible
// for fragments. The parser under test does not look at them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace bulkhead::test {

using Bytes = std::vector<std::uint8_t>;

inline constexpr std::uint16_t kEthIpv4 = 0x0800;
inline constexpr std::uint16_t kEthIpv6 = 0x86dd;
inline constexpr std::uint16_t kEthArp = 0x0806;
inline constexpr std::uint16_t kEthLldp = 0x88cc;
inline constexpr std::uint16_t kTpid8021Q = 0x8100;
inline constexpr std::uint16_t kTpid8021ad = 0x88a8;

inline constexpr std::uint8_t kProtoIcmp = 1;
inline constexpr std::uint8_t kProtoTcp = 6;
inline constexpr std::uint8_t kProtoUdp = 17;
inline constexpr std::uint8_t kProtoIcmpv6 = 58;
inline constexpr std::uint8_t kProtoSctp = 132;
inline constexpr std::uint8_t kProtoGre = 47;
inline constexpr std::uint8_t kProtoEsp = 50;
inline constexpr std::uint8_t kProtoNoNext = 59;

// IPv6 extension header types (next-header values).
inline constexpr std::uint8_t kExtHopByHop = 0;
inline constexpr std::uint8_t kExtRouting = 43;
inline constexpr std::uint8_t kExtFragment = 44;
inline constexpr std::uint8_t kExtAh = 51;
inline constexpr std::uint8_t kExtDestOpts = 60;

// TCP flags.
inline constexpr std::uint8_t kTcpFin = 0x01;
inline constexpr std::uint8_t kTcpSyn = 0x02;
inline constexpr std::uint8_t kTcpRst = 0x04;
inline constexpr std::uint8_t kTcpAck = 0x10;

struct Ethernet {
    std::string src = "02:00:00:00:00:01";
    std::string dst = "02:00:00:00:00:02";
};

struct VlanTag {
    std::uint16_t tpid = kTpid8021Q;
    std::uint16_t vid = 0;  // 12 bits
    std::uint8_t pcp = 0;   // 3 bits
};

struct Ipv4 {
    std::string src = "203.0.113.1";
    std::string dst = "198.51.100.1";
    std::optional<std::uint8_t> protocol{};  // default: from the transport layer
    Bytes options{};                         // zero-padded to a multiple of 4
    std::optional<std::uint8_t> ihl{};       // default: 5 + options / 4
    std::uint16_t frag_offset = 0;         // in 8-byte units, 13 bits
    bool more_fragments = false;
    bool dont_fragment = false;
    std::uint16_t id = 0x4242;
    std::optional<std::uint16_t> total_length{};  // default: header + everything after it
    std::uint8_t ttl = 64;
    std::uint8_t tos = 0;
    std::optional<std::uint8_t> version{};  // default 4
};

// One IPv6 extension header. Use the factories; fields may be adjusted after.
struct Ipv6Ext {
    std::uint8_t type = kExtHopByHop;
    std::optional<std::uint8_t> next_header{};  // default: the following header
    // The header's own length field. Hop-by-hop, routing and destination
    // options count 8-byte units beyond the first 8 bytes; AH counts 4-byte
    // units minus 2; the fragment header has none (reserved byte).
    std::uint8_t length = 0;
    // bytes() emits the size the length field says unless this overrides it
    // (for headers that lie about their length).
    std::optional<std::size_t> emitted_size{};
    // fragment header only
    std::uint16_t frag_offset = 0;  // 8-byte units, 13 bits
    bool more_fragments = false;
    std::uint32_t frag_id = 0x12345678;

    static Ipv6Ext hop_by_hop(std::uint8_t length = 0);
    static Ipv6Ext routing(std::uint8_t length = 0);
    static Ipv6Ext dest_opts(std::uint8_t length = 0);
    static Ipv6Ext fragment(std::uint16_t offset, bool more, std::uint32_t id = 0x12345678);
    // AH with payload length `length`: (length + 2) * 4 bytes; 4 gives 24.
    static Ipv6Ext ah(std::uint8_t length = 4);

    // Bytes this header takes by its own length rule.
    std::size_t size() const;
};

struct Ipv6 {
    std::string src = "2001:db8::1";
    std::string dst = "2001:db8::2";
    std::optional<std::uint8_t> next_header{};  // default: first extension or transport
    std::uint8_t hop_limit = 64;
    std::optional<std::uint16_t> payload_length{};  // default: everything after the header
    std::uint8_t traffic_class = 0;
    std::uint32_t flow_label = 0;
    std::optional<std::uint8_t> version{};  // default 6
};

struct Tcp {
    std::uint16_t sport = 40000;
    std::uint16_t dport = 80;
    std::uint8_t flags = kTcpSyn;
    std::uint32_t seq = 1;
    std::uint32_t ack = 0;
    Bytes options{};                            // zero-padded to a multiple of 4
    std::optional<std::uint8_t> data_offset{};  // default: 5 + options / 4
    std::uint16_t window = 65535;
};

struct Udp {
    std::uint16_t sport = 40000;
    std::uint16_t dport = 53;
    std::optional<std::uint16_t> length{};  // default: header + payload
};

struct Sctp {
    std::uint16_t sport = 40000;
    std::uint16_t dport = 5000;
    std::uint32_t verification_tag = 0;
};

// ICMP and ICMPv6 share the first 8 bytes: type, code, checksum, id, seq.
struct Icmp {
    std::uint8_t type = 8;  // echo request (ICMPv6: use 128)
    std::uint8_t code = 0;
    std::uint16_t id = 0x1234;
    std::uint16_t seq = 1;
};

struct Arp {
    std::uint16_t op = 1;  // request
    std::string sender_ip = "198.51.100.1";
    std::string target_ip = "198.51.100.2";
};

// Where the layers start in the frame bytes() returns (before truncation).
struct Layout {
    std::size_t l3 = 0;
    std::size_t l4 = 0;       // after the IPv6 extension headers
    std::size_t payload = 0;  // after the transport header
    std::size_t size = 0;
};

class Packet {
public:
    Packet& eth(Ethernet fields);
    Packet& vlan(std::uint16_t vid, std::uint16_t tpid = kTpid8021Q);
    // The ethertype after the tags; default from the network layer.
    Packet& ethertype(std::uint16_t type);

    Packet& ipv4(Ipv4 fields);
    Packet& ipv6(Ipv6 fields);
    // Appends one extension header after the IPv6 header (in call order).
    Packet& ext(Ipv6Ext header);
    Packet& arp(Arp fields = {});

    Packet& tcp(Tcp fields = {});
    Packet& udp(Udp fields = {});
    Packet& sctp(Sctp fields = {});
    Packet& icmp(Icmp fields = {});    // ICMP for IPv4
    Packet& icmpv6(Icmp fields = {});  // ICMPv6, checksummed with the IPv6 pseudo header
    // No transport header we know: the IP protocol / last next header is
    // `proto` and whatever payload() gives follows.
    Packet& raw_l4(std::uint8_t proto);

    // Makes the packet its own flow for connection and fragment tracking:
    // `port` becomes the TCP, UDP or SCTP source port or the ICMP echo id
    // (echo request and reply only), `ip_id` the IPv4 id and the id of any
    // IPv6 fragment header.
    Packet& flow_ids(std::uint16_t port, std::uint32_t ip_id);

    Packet& payload(Bytes data);
    Packet& payload(std::size_t size, std::uint8_t fill);

    // Cuts the frame after `size` bytes, wherever that falls.
    Packet& truncate(std::size_t size);
    // Cuts the frame `bytes_in` bytes into the transport header.
    Packet& truncate_in_l4(std::size_t bytes_in);
    // Appends zero bytes after the IP packet until the frame has `size`
    // bytes (Ethernet minimum-length padding).
    Packet& pad_to(std::size_t size);

    Bytes bytes() const;
    Layout layout() const;
    // One line naming the layers, for test messages.
    std::string describe() const;

private:
    using L3 = std::variant<std::monostate, Ipv4, Ipv6, Arp>;
    struct Raw {
        std::uint8_t proto;
    };
    struct IcmpV6 {
        Icmp fields;
    };
    using L4 = std::variant<std::monostate, Tcp, Udp, Sctp, Icmp, IcmpV6, Raw>;

    Bytes build(Layout* layout) const;
    std::optional<std::uint8_t> l4_proto() const;

    Ethernet eth_;
    std::vector<VlanTag> vlans_;
    std::optional<std::uint16_t> ethertype_{};
    L3 l3_;
    std::vector<Ipv6Ext> ext_;
    L4 l4_;
    Bytes payload_{};
    std::optional<std::size_t> truncate_{};
    std::optional<std::size_t> truncate_in_l4_{};
    std::size_t pad_to_ = 0;
};

// The outcome of running an XDP program on one frame.
struct XdpRun {
    std::uint32_t retval = 0;  // XDP_DROP 1, XDP_PASS 2
    Bytes data{};                // the frame as the program left it
    std::uint32_t duration_ns = 0;
};

inline constexpr std::uint32_t kXdpDrop = 1;
inline constexpr std::uint32_t kXdpPass = 2;

// Runs the XDP program `prog_fd` on `frame` with BPF_PROG_TEST_RUN, `repeat`
// times in the kernel. Throws std::system_error when the kernel refuses.
XdpRun run_xdp(int prog_fd, const Bytes& frame, std::uint32_t repeat = 1);

// "pass", "drop" or the number.
std::string xdp_action_name(std::uint32_t retval);

}  // namespace bulkhead::test
