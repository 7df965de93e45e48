// Lays out test packets from their fields; runs XDP programs on them.
#include "support/packet.hpp"

#include <arpa/inet.h>
#include <bpf/bpf.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <system_error>

#include <fmt/format.h>

namespace bulkhead::test {

namespace {

// Appends big-endian integers and raw bytes.
class Writer {
public:
    explicit Writer(Bytes& out) : out_(out) {}

    void u8(std::uint32_t v) { out_.push_back(static_cast<std::uint8_t>(v)); }
    void u16(std::uint32_t v)
    {
        u8(v >> 8);
        u8(v);
    }
    void u32(std::uint32_t v)
    {
        u16(v >> 16);
        u16(v & 0xffff);
    }
    void bytes(const Bytes& b) { out_.insert(out_.end(), b.begin(), b.end()); }
    void zeros(std::size_t n) { out_.insert(out_.end(), n, 0); }

private:
    Bytes& out_;
};

void put_u16(Bytes& b, std::size_t at, std::uint16_t v)
{
    b[at] = static_cast<std::uint8_t>(v >> 8);
    b[at + 1] = static_cast<std::uint8_t>(v);
}

// The Internet checksum over `data`, starting from a partial sum.
std::uint16_t inet_checksum(const Bytes& data, std::uint32_t sum = 0)
{
    for (std::size_t i = 0; i + 1 < data.size(); i += 2)
        sum += static_cast<std::uint32_t>(data[i] << 8 | data[i + 1]);
    if (data.size() % 2 != 0)
        sum += static_cast<std::uint32_t>(data.back() << 8);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return static_cast<std::uint16_t>(~sum & 0xffff);
}

std::uint32_t partial_sum(const Bytes& data)
{
    std::uint32_t sum = 0;
    for (std::size_t i = 0; i + 1 < data.size(); i += 2)
        sum += static_cast<std::uint32_t>(data[i] << 8 | data[i + 1]);
    return sum;
}

Bytes pad4(const Bytes& options)
{
    Bytes out = options;
    while (out.size() % 4 != 0)
        out.push_back(0);
    return out;
}

Bytes parse_mac(const std::string& text)
{
    unsigned int b[6];
    if (std::sscanf(text.c_str(), "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4],
                    &b[5]) != 6)
        throw std::invalid_argument(fmt::format("'{}' is not a MAC address", text));
    Bytes out;
    for (unsigned int x : b)
        out.push_back(static_cast<std::uint8_t>(x));
    return out;
}

Bytes parse_ip(const std::string& text, int family)
{
    Bytes out(family == AF_INET ? 4 : 16);
    if (inet_pton(family, text.c_str(), out.data()) != 1) {
        throw std::invalid_argument(fmt::format("'{}' is not an {} address", text,
                                                family == AF_INET ? "IPv4" : "IPv6"));
    }
    return out;
}

// The bytes of one extension header, whose next header is `next`.
Bytes ext_bytes(const Ipv6Ext& ext, std::uint8_t next)
{
    Bytes out;
    Writer w(out);
    std::size_t size = ext.size();

    w.u8(ext.next_header.value_or(next));
    switch (ext.type) {
    case kExtFragment:
        w.u8(0);  // reserved
        w.u16(static_cast<std::uint32_t>((ext.frag_offset & 0x1fff) << 3 |
                                         (ext.more_fragments ? 1 : 0)));
        w.u32(ext.frag_id);
        break;
    case kExtAh:
        w.u8(ext.length);
        w.u16(0);           // reserved
        w.u32(0x1000);      // SPI
        w.u32(1);           // sequence number
        break;
    case kExtRouting:
        w.u8(ext.length);
        w.u8(253);  // routing type: experimental (RFC 4727)
        w.u8(0);    // segments left
        break;
    default:
        // hop-by-hop and destination options: one PadN option fills the rest
        w.u8(ext.length);
        if (size >= 4) {
            w.u8(1);  // PadN
            w.u8(static_cast<std::uint32_t>(size - 4));
        }
        break;
    }
    out.resize(ext.emitted_size.value_or(size), 0);
    return out;
}

}  // namespace

Ipv6Ext Ipv6Ext::hop_by_hop(std::uint8_t length)
{
    return Ipv6Ext{.type = kExtHopByHop, .length = length};
}

Ipv6Ext Ipv6Ext::routing(std::uint8_t length)
{
    return Ipv6Ext{.type = kExtRouting, .length = length};
}

Ipv6Ext Ipv6Ext::dest_opts(std::uint8_t length)
{
    return Ipv6Ext{.type = kExtDestOpts, .length = length};
}

Ipv6Ext Ipv6Ext::fragment(std::uint16_t offset, bool more, std::uint32_t id)
{
    return Ipv6Ext{.type = kExtFragment, .frag_offset = offset, .more_fragments = more,
                   .frag_id = id};
}

Ipv6Ext Ipv6Ext::ah(std::uint8_t length)
{
    return Ipv6Ext{.type = kExtAh, .length = length};
}

std::size_t Ipv6Ext::size() const
{
    switch (type) {
    case kExtFragment:
        return 8;
    case kExtAh:
        return (std::size_t{length} + 2) * 4;
    default:
        return (std::size_t{length} + 1) * 8;
    }
}

Packet& Packet::eth(Ethernet fields)
{
    eth_ = std::move(fields);
    return *this;
}

Packet& Packet::vlan(std::uint16_t vid, std::uint16_t tpid)
{
    vlans_.push_back(VlanTag{.tpid = tpid, .vid = vid});
    return *this;
}

Packet& Packet::ethertype(std::uint16_t type)
{
    ethertype_ = type;
    return *this;
}

Packet& Packet::ipv4(Ipv4 fields)
{
    l3_ = std::move(fields);
    return *this;
}

Packet& Packet::ipv6(Ipv6 fields)
{
    l3_ = std::move(fields);
    return *this;
}

Packet& Packet::ext(Ipv6Ext header)
{
    ext_.push_back(header);
    return *this;
}

Packet& Packet::arp(Arp fields)
{
    l3_ = std::move(fields);
    return *this;
}

Packet& Packet::tcp(Tcp fields)
{
    l4_ = std::move(fields);
    return *this;
}

Packet& Packet::udp(Udp fields)
{
    l4_ = fields;
    return *this;
}

Packet& Packet::sctp(Sctp fields)
{
    l4_ = fields;
    return *this;
}

Packet& Packet::icmp(Icmp fields)
{
    l4_ = fields;
    return *this;
}

Packet& Packet::icmpv6(Icmp fields)
{
    l4_ = IcmpV6{fields};
    return *this;
}

Packet& Packet::raw_l4(std::uint8_t proto)
{
    l4_ = Raw{proto};
    return *this;
}

Packet& Packet::flow_ids(std::uint16_t port, std::uint32_t ip_id)
{
    auto echo = [](std::uint8_t type) {
        return type == 0 || type == 8 || type == 128 || type == 129;
    };
    if (auto* tcp = std::get_if<Tcp>(&l4_))
        tcp->sport = port;
    else if (auto* udp = std::get_if<Udp>(&l4_))
        udp->sport = port;
    else if (auto* sctp = std::get_if<Sctp>(&l4_))
        sctp->sport = port;
    else if (auto* icmp = std::get_if<Icmp>(&l4_); icmp && echo(icmp->type))
        icmp->id = port;
    else if (auto* icmp6 = std::get_if<IcmpV6>(&l4_); icmp6 && echo(icmp6->fields.type))
        icmp6->fields.id = port;

    if (auto* ip = std::get_if<Ipv4>(&l3_))
        ip->id = static_cast<std::uint16_t>(ip_id);
    for (Ipv6Ext& e : ext_) {
        if (e.type == kExtFragment)
            e.frag_id = ip_id;
    }
    return *this;
}

Packet& Packet::payload(Bytes data)
{
    payload_ = std::move(data);
    return *this;
}

Packet& Packet::payload(std::size_t size, std::uint8_t fill)
{
    payload_.assign(size, fill);
    return *this;
}

Packet& Packet::truncate(std::size_t size)
{
    truncate_ = size;
    return *this;
}

Packet& Packet::truncate_in_l4(std::size_t bytes_in)
{
    truncate_in_l4_ = bytes_in;
    return *this;
}

Packet& Packet::pad_to(std::size_t size)
{
    pad_to_ = size;
    return *this;
}

std::optional<std::uint8_t> Packet::l4_proto() const
{
    struct Visitor {
        std::optional<std::uint8_t> operator()(std::monostate) const { return std::nullopt; }
        std::optional<std::uint8_t> operator()(const Tcp&) const { return kProtoTcp; }
        std::optional<std::uint8_t> operator()(const Udp&) const { return kProtoUdp; }
        std::optional<std::uint8_t> operator()(const Sctp&) const { return kProtoSctp; }
        std::optional<std::uint8_t> operator()(const Icmp&) const { return kProtoIcmp; }
        std::optional<std::uint8_t> operator()(const IcmpV6&) const { return kProtoIcmpv6; }
        std::optional<std::uint8_t> operator()(const Raw& r) const { return r.proto; }
    };
    return std::visit(Visitor{}, l4_);
}

Bytes Packet::bytes() const
{
    return build(nullptr);
}

Layout Packet::layout() const
{
    Layout layout;
    build(&layout);
    return layout;
}

Bytes Packet::build(Layout* layout) const
{
    Layout where;
    Bytes frame;
    Writer w(frame);

    // Ethernet and its tags: each tag's TPID sits where the previous
    // header's ethertype would be
    std::uint16_t inner = 0x88b5;  // IEEE local experimental: no network layer
    if (ethertype_)
        inner = *ethertype_;
    else if (std::holds_alternative<Ipv4>(l3_))
        inner = kEthIpv4;
    else if (std::holds_alternative<Ipv6>(l3_))
        inner = kEthIpv6;
    else if (std::holds_alternative<Arp>(l3_))
        inner = kEthArp;

    w.bytes(parse_mac(eth_.dst));
    w.bytes(parse_mac(eth_.src));
    for (const VlanTag& tag : vlans_) {
        w.u16(tag.tpid);
        w.u16(0);  // placeholder for the TCI of this tag, written below
    }
    w.u16(inner);
    for (std::size_t i = 0; i < vlans_.size(); i++) {
        // the TCI of tag i follows the TPID of tag i at 12 + 4i
        std::size_t at = 12 + 4 * i;
        put_u16(frame, at, vlans_[i].tpid);
        put_u16(frame, at + 2,
                static_cast<std::uint16_t>((vlans_[i].pcp & 7) << 13 | (vlans_[i].vid & 0xfff)));
    }
    where.l3 = frame.size();

    // the network layer needs the transport bytes (lengths, checksums), and
    // the transport checksum needs the addresses: build addresses first
    Bytes src, dst;
    bool v6 = std::holds_alternative<Ipv6>(l3_);
    if (const auto* ip = std::get_if<Ipv4>(&l3_)) {
        src = parse_ip(ip->src, AF_INET);
        dst = parse_ip(ip->dst, AF_INET);
    } else if (const auto* ip6 = std::get_if<Ipv6>(&l3_)) {
        src = parse_ip(ip6->src, AF_INET6);
        dst = parse_ip(ip6->dst, AF_INET6);
    }

    // transport header and payload
    Bytes upper;
    Writer u(upper);
    std::size_t checksum_at = 0;
    bool pseudo = false;
    if (const auto* tcp = std::get_if<Tcp>(&l4_)) {
        Bytes options = pad4(tcp->options);
        auto doff = tcp->data_offset.value_or(static_cast<std::uint8_t>(5 + options.size() / 4));
        u.u16(tcp->sport);
        u.u16(tcp->dport);
        u.u32(tcp->seq);
        u.u32(tcp->ack);
        u.u8(static_cast<std::uint32_t>((doff & 0xf) << 4));
        u.u8(tcp->flags);
        u.u16(tcp->window);
        checksum_at = upper.size();
        u.u16(0);
        u.u16(0);  // urgent pointer
        u.bytes(options);
        pseudo = true;
    } else if (const auto* udp = std::get_if<Udp>(&l4_)) {
        u.u16(udp->sport);
        u.u16(udp->dport);
        u.u16(udp->length.value_or(static_cast<std::uint16_t>(8 + payload_.size())));
        checksum_at = upper.size();
        u.u16(0);
        pseudo = true;
    } else if (const auto* sctp = std::get_if<Sctp>(&l4_)) {
        u.u16(sctp->sport);
        u.u16(sctp->dport);
        u.u32(sctp->verification_tag);
        u.u32(0);  // CRC32c, not computed
    } else if (const auto* icmp = std::get_if<Icmp>(&l4_)) {
        u.u8(icmp->type);
        u.u8(icmp->code);
        checksum_at = upper.size();
        u.u16(0);
        u.u16(icmp->id);
        u.u16(icmp->seq);
    } else if (const auto* icmp6 = std::get_if<IcmpV6>(&l4_)) {
        u.u8(icmp6->fields.type);
        u.u8(icmp6->fields.code);
        checksum_at = upper.size();
        u.u16(0);
        u.u16(icmp6->fields.id);
        u.u16(icmp6->fields.seq);
        pseudo = true;
    }
    std::size_t l4_header_size = upper.size();
    u.bytes(payload_);

    bool has_checksum = std::holds_alternative<Tcp>(l4_) || std::holds_alternative<Udp>(l4_) ||
                        std::holds_alternative<Icmp>(l4_) || std::holds_alternative<IcmpV6>(l4_);
    std::uint8_t proto = l4_proto().value_or(v6 ? kProtoNoNext : 253);
    if (has_checksum && upper.size() >= checksum_at + 2) {
        std::uint32_t sum = 0;
        if (pseudo && !src.empty()) {
            Bytes ph;
            Writer p(ph);
            p.bytes(src);
            p.bytes(dst);
            if (v6)
                p.u32(static_cast<std::uint32_t>(upper.size()));
            else
                p.u16(static_cast<std::uint32_t>(upper.size()));
            p.u16(proto);
            sum = partial_sum(ph);
        }
        put_u16(upper, checksum_at, inet_checksum(upper, sum));
    }

    if (const auto* ip = std::get_if<Ipv4>(&l3_)) {
        Bytes options = pad4(ip->options);
        std::size_t header = 20 + options.size();
        std::uint8_t ihl = ip->ihl.value_or(static_cast<std::uint8_t>(header / 4));
        std::uint32_t frag = (ip->dont_fragment ? 0x4000u : 0u) |
                             (ip->more_fragments ? 0x2000u : 0u) |
                             (ip->frag_offset & 0x1fffu);
        std::size_t ip_start = frame.size();

        w.u8(static_cast<std::uint32_t>(ip->version.value_or(4) << 4 | (ihl & 0xf)));
        w.u8(ip->tos);
        w.u16(ip->total_length.value_or(static_cast<std::uint16_t>(header + upper.size())));
        w.u16(ip->id);
        w.u16(frag);
        w.u8(ip->ttl);
        w.u8(ip->protocol.value_or(proto));
        w.u16(0);  // checksum, below
        w.bytes(src);
        w.bytes(dst);
        w.bytes(options);
        Bytes ip_header(frame.begin() + static_cast<std::ptrdiff_t>(ip_start), frame.end());
        put_u16(frame, ip_start + 10, inet_checksum(ip_header));
    } else if (const auto* ip6 = std::get_if<Ipv6>(&l3_)) {
        Bytes chain;
        for (std::size_t i = 0; i < ext_.size(); i++) {
            std::uint8_t next = i + 1 < ext_.size() ? ext_[i + 1].type : proto;
            Bytes e = ext_bytes(ext_[i], next);
            chain.insert(chain.end(), e.begin(), e.end());
        }
        std::uint8_t first = ext_.empty() ? proto : ext_.front().type;

        w.u32(static_cast<std::uint32_t>(ip6->version.value_or(6)) << 28 |
              static_cast<std::uint32_t>(ip6->traffic_class) << 20 | (ip6->flow_label & 0xfffff));
        auto after_header = static_cast<std::uint16_t>(chain.size() + upper.size());
        w.u16(ip6->payload_length.value_or(after_header));
        w.u8(ip6->next_header.value_or(first));
        w.u8(ip6->hop_limit);
        w.bytes(src);
        w.bytes(dst);
        w.bytes(chain);
    } else if (const auto* arp = std::get_if<Arp>(&l3_)) {
        w.u16(1);       // hardware: Ethernet
        w.u16(kEthIpv4);
        w.u8(6);
        w.u8(4);
        w.u16(arp->op);
        w.bytes(parse_mac(eth_.src));
        w.bytes(parse_ip(arp->sender_ip, AF_INET));
        w.zeros(6);
        w.bytes(parse_ip(arp->target_ip, AF_INET));
    }

    where.l4 = frame.size();
    where.payload = where.l4 + l4_header_size;
    w.bytes(upper);
    if (frame.size() < pad_to_)
        frame.resize(pad_to_, 0);
    where.size = frame.size();

    if (truncate_in_l4_)
        frame.resize(std::min(frame.size(), where.l4 + *truncate_in_l4_));
    if (truncate_)
        frame.resize(std::min(frame.size(), *truncate_));
    if (layout)
        *layout = where;
    return frame;
}

std::string Packet::describe() const
{
    std::string out = "eth";
    for (const VlanTag& tag : vlans_)
        out += fmt::format(" vlan({:04x}:{})", tag.tpid, tag.vid);
    if (ethertype_)
        out += fmt::format(" type {:04x}", *ethertype_);

    if (const auto* ip = std::get_if<Ipv4>(&l3_)) {
        out += fmt::format(" ipv4 {} > {}", ip->src, ip->dst);
        if (ip->ihl)
            out += fmt::format(" ihl={}", *ip->ihl);
        if (!ip->options.empty())
            out += fmt::format(" +{}B options", ip->options.size());
        if (ip->frag_offset != 0 || ip->more_fragments)
            out += fmt::format(" frag={}{}", ip->frag_offset, ip->more_fragments ? "+MF" : "");
        if (ip->total_length)
            out += fmt::format(" tot_len={}", *ip->total_length);
        if (ip->protocol)
            out += fmt::format(" proto={}", *ip->protocol);
    } else if (const auto* ip6 = std::get_if<Ipv6>(&l3_)) {
        out += fmt::format(" ipv6 {} > {} hlim={}", ip6->src, ip6->dst, ip6->hop_limit);
        if (ip6->payload_length)
            out += fmt::format(" plen={}", *ip6->payload_length);
        for (const Ipv6Ext& e : ext_) {
            if (e.type == kExtFragment)
                out += fmt::format(" frag({}{})", e.frag_offset, e.more_fragments ? "+M" : "");
            else
                out += fmt::format(" ext{}({}B)", e.type, e.emitted_size.value_or(e.size()));
        }
    } else if (std::holds_alternative<Arp>(l3_)) {
        out += " arp";
    }

    if (const auto* tcp = std::get_if<Tcp>(&l4_)) {
        out += fmt::format(" tcp {} > {} flags={:02x}", tcp->sport, tcp->dport, tcp->flags);
        if (tcp->data_offset)
            out += fmt::format(" doff={}", *tcp->data_offset);
    } else if (const auto* udp = std::get_if<Udp>(&l4_)) {
        out += fmt::format(" udp {} > {}", udp->sport, udp->dport);
        if (udp->length)
            out += fmt::format(" len={}", *udp->length);
    }
    if (const auto* sctp = std::get_if<Sctp>(&l4_))
        out += fmt::format(" sctp {} > {}", sctp->sport, sctp->dport);
    else if (const auto* icmp = std::get_if<Icmp>(&l4_))
        out += fmt::format(" icmp {}/{}", icmp->type, icmp->code);
    else if (const auto* icmp6 = std::get_if<IcmpV6>(&l4_))
        out += fmt::format(" icmpv6 {}/{}", icmp6->fields.type, icmp6->fields.code);
    else if (const auto* raw = std::get_if<Raw>(&l4_))
        out += fmt::format(" proto {}", raw->proto);

    if (!payload_.empty())
        out += fmt::format(" +{}B payload", payload_.size());
    if (truncate_in_l4_)
        out += fmt::format(" cut {}B into l4", *truncate_in_l4_);
    if (truncate_)
        out += fmt::format(" cut at {}B", *truncate_);
    if (pad_to_ != 0)
        out += fmt::format(" padded to {}B", pad_to_);
    return out;
}

XdpRun run_xdp(int prog_fd, const Bytes& frame, std::uint32_t repeat)
{
    XdpRun run;
    // room for a program that grows the frame; ours never does
    run.data.resize(frame.size() + 512);

    bpf_test_run_opts opts;
    std::memset(&opts, 0, sizeof(opts));  // libbpf checks that unknown tail bytes are zero
    opts.sz = sizeof(opts);
    opts.data_in = frame.data();
    opts.data_size_in = static_cast<std::uint32_t>(frame.size());
    opts.data_out = run.data.data();
    opts.data_size_out = static_cast<std::uint32_t>(run.data.size());
    opts.repeat = static_cast<int>(repeat);
    if (bpf_prog_test_run_opts(prog_fd, &opts) != 0) {
        int err = errno;
        throw std::system_error(err, std::generic_category(),
                                fmt::format("BPF_PROG_TEST_RUN of XDP program fd {} on a {}-byte "
                                            "frame",
                                            prog_fd, frame.size()));
    }
    run.data.resize(opts.data_size_out);
    run.retval = opts.retval;
    run.duration_ns = opts.duration;
    return run;
}

std::string xdp_action_name(std::uint32_t retval)
{
    switch (retval) {
    case kXdpDrop:
        return "drop";
    case kXdpPass:
        return "pass";
    default:
        return std::to_string(retval);
    }
}

}  // namespace bulkhead::test
