/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Packet parsing, shared by every hook that sees packets. The parser only
 * reads: it never writes the packet. Every read is bounds-checked against the
 * end of the data; a header that is cut short, inconsistent, or nested deeper
 * than we walk makes the packet malformed, and a malformed packet is dropped,
 * never passed unclassified.
 */
#ifndef BH_PARSE_H
#define BH_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "shared/bulkhead_abi.h"

#define BH_MAX_VLAN_TAGS 2
#define BH_MAX_EXT_HDRS 8

#ifndef IPPROTO_MH
#define IPPROTO_MH 135
#endif

enum bh_parse_result {
	BH_PARSE_OK = 0,
	BH_PARSE_NOT_IP = 1,
	BH_PARSE_MALFORMED = 2,
};

/* What the verdict needs to know about a packet. */
struct bh_pkt {
	struct bh_addr src;
	struct bh_addr dst;
	__u16 port;       /* be; destination port, or ICMP type << 8 | code */
	__u16 sport;      /* be; source port, or ICMP echo id */
	__u8 proto;       /* IPPROTO_*, after the IPv6 extension headers */
	__u8 has_port;    /* 0 for a non-first fragment: no transport header */
	__u8 nd;          /* IPv6 neighbour discovery with hop limit 255 */
	__u8 tcp_flags;   /* TCP only */
	__u8 frag_first;  /* the first fragment of a fragmented packet */
	__u8 icmp_kind;   /* enum bh_icmp_kind */
	__u8 has_inner;   /* an ICMP error whose quoted tuple was read into inner */
	__u8 pad;
	__be32 frag_id;   /* fragments only */
	struct bh_ct_key inner; /* the packet an ICMP error quotes, as it was sent */
};

enum bh_icmp_kind {
	BH_ICMP_OTHER = 0,
	BH_ICMP_ECHO_REQUEST = 1,
	BH_ICMP_ECHO_REPLY = 2,
	BH_ICMP_ERROR = 3, /* unreachable, too big, time exceeded, parameter problem */
};

struct bh_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* The first 8 bytes of every ICMP and ICMPv6 message. */
struct bh_icmp_hdr {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be16 id;
	__be16 seq;
};

/* TCP, UDP and SCTP all start with source and destination port. */
struct bh_ports {
	__be16 source;
	__be16 dest;
};

/* An extension header's first two bytes; the length field's unit varies. */
struct bh_ext_hdr {
	__u8 nexthdr;
	__u8 len;
};

struct bh_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3 | M flag */
	__be32 id;
};

/* Bytes a transport header must have for us to read what policy needs:
 * whole headers, so a truncated TCP header is malformed even when its
 * ports are there. */
static __always_inline __u32 bh_l4_min_len(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return 20;
	case IPPROTO_UDP:
		return 8;
	case IPPROTO_SCTP:
		return 12;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return 8;
	default:
		return 0;
	}
}

static __always_inline __u8 bh_icmp_kind(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP) {
		if (type == 8)
			return BH_ICMP_ECHO_REQUEST;
		if (type == 0)
			return BH_ICMP_ECHO_REPLY;
		if (type == 3 || type == 11 || type == 12)
			return BH_ICMP_ERROR;
		return BH_ICMP_OTHER;
	}
	if (type == 128)
		return BH_ICMP_ECHO_REQUEST;
	if (type == 129)
		return BH_ICMP_ECHO_REPLY;
	if (type >= 1 && type <= 4)
		return BH_ICMP_ERROR;
	return BH_ICMP_OTHER;
}

/* The ports of a quoted packet: the first 8 bytes of its transport header
 * are all an ICMP error must carry. Echo quotes put the id in both ports,
 * as connection tracking keys echo. */
static __always_inline int bh_read_quoted_ports(void *l4, void *data_end, __u8 proto,
						struct bh_ct_key *inner)
{
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct bh_icmp_hdr *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return 0;
		inner->sport = icmp->id;
		inner->dport = icmp->id;
		return 1;
	}
	struct bh_ports *ports = l4;

	if ((void *)(ports + 1) > data_end)
		return 0;
	inner->sport = ports->source;
	inner->dport = ports->dest;
	return 1;
}

static __always_inline void bh_addr_from_v4(struct bh_addr *a, __be32 v4);

/* Reads the header an ICMP error quotes, behind its 8-byte ICMP header. A
 * quote cut short just leaves has_inner clear: the error then meets policy
 * like any other packet. */
static __always_inline void bh_parse_quoted(void *quoted, void *data_end, struct bh_pkt *pkt)
{
	struct bh_ct_key *inner = &pkt->inner;

	if (pkt->proto == IPPROTO_ICMP) {
		struct iphdr *ip = quoted;

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
			return;
		bh_addr_from_v4(&inner->src, ip->saddr);
		bh_addr_from_v4(&inner->dst, ip->daddr);
		inner->proto = ip->protocol;
		pkt->has_inner = bh_read_quoted_ports(quoted + ip->ihl * 4, data_end, ip->protocol,
						      inner);
		return;
	}
	struct ipv6hdr *ip6 = quoted;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return;
	__builtin_memcpy(inner->src.bytes, &ip6->saddr, 16);
	__builtin_memcpy(inner->dst.bytes, &ip6->daddr, 16);
	inner->proto = ip6->nexthdr;
	pkt->has_inner = bh_read_quoted_ports((void *)(ip6 + 1), data_end, ip6->nexthdr, inner);
}

static __always_inline int bh_is_nd(__u8 type)
{
	/* router solicitation/advertisement, neighbour sol./adv., redirect */
	return type >= 133 && type <= 137;
}

/* Reads the transport header at l4, which has l4_len bytes by the IP header. */
static __always_inline int bh_parse_l4(void *l4, void *data_end, __u32 l4_len, __u8 hop_limit,
				       struct bh_pkt *pkt)
{
	__u32 need = bh_l4_min_len(pkt->proto);

	pkt->has_port = 1;
	if (need == 0)
		return BH_PARSE_OK; /* no ports: matched by protocol only */
	if (l4_len < need || l4 + need > data_end)
		return BH_PARSE_MALFORMED;

	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		struct bh_icmp_hdr *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return BH_PARSE_MALFORMED;
		pkt->port = bpf_htons((__u16)(icmp->type << 8 | icmp->code));
		pkt->sport = icmp->id;
		pkt->nd = pkt->proto == IPPROTO_ICMPV6 && bh_is_nd(icmp->type) && hop_limit == 255;
		pkt->icmp_kind = bh_icmp_kind(pkt->proto, icmp->type);
		if (pkt->icmp_kind == BH_ICMP_ERROR)
			bh_parse_quoted((void *)(icmp + 1), data_end, pkt);
		return BH_PARSE_OK;
	}

	struct bh_ports *ports = l4;

	if ((void *)(ports + 1) > data_end)
		return BH_PARSE_MALFORMED;
	if (pkt->proto == IPPROTO_TCP) {
		__u32 header = (((__u8 *)l4)[12] >> 4) * 4;

		/* below the fixed header, or longer than the segment */
		if (header < 20 || header > l4_len)
			return BH_PARSE_MALFORMED;
	}
	if (pkt->proto == IPPROTO_UDP) {
		__u32 length = bpf_ntohs(((__be16 *)l4)[2]);

		/* a first fragment carries only part of the datagram it measures */
		if (length < 8 || (!pkt->frag_first && length > l4_len))
			return BH_PARSE_MALFORMED;
	}
	pkt->port = ports->dest;
	pkt->sport = ports->source;
	if (pkt->proto == IPPROTO_TCP)
		pkt->tcp_flags = ((__u8 *)l4)[13];
	return BH_PARSE_OK;
}

static __always_inline void bh_addr_from_v4(struct bh_addr *a, __be32 v4)
{
	__builtin_memset(a->bytes, 0, 10);
	a->bytes[10] = 0xff;
	a->bytes[11] = 0xff;
	__builtin_memcpy(&a->bytes[12], &v4, 4);
}

/* `avail` is how many bytes the packet has from l3 on. It can exceed
 * data_end - l3: at cgroup hooks data_end ends the skb's linear part, and a
 * payload beyond it is still part of the packet. Lengths are checked against
 * avail, reads against data_end. */
static __always_inline int bh_parse_ipv4(void *l3, void *data_end, __u32 avail,
					 struct bh_pkt *pkt)
{
	struct iphdr *ip = l3;

	if ((void *)(ip + 1) > data_end)
		return BH_PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return BH_PARSE_MALFORMED;

	__u32 hdr_len = ip->ihl * 4;
	__u32 tot_len = bpf_ntohs(ip->tot_len);

	if (l3 + hdr_len > data_end || tot_len < hdr_len || tot_len > avail)
		return BH_PARSE_MALFORMED;

	bh_addr_from_v4(&pkt->src, ip->saddr);
	bh_addr_from_v4(&pkt->dst, ip->daddr);
	pkt->proto = ip->protocol;

	__u16 frag = bpf_ntohs(ip->frag_off);

	pkt->frag_id = bpf_htonl(bpf_ntohs(ip->id));
	pkt->frag_first = (frag & 0x3fff) == 0x2000; /* MF set, offset 0 */
	/* a later fragment carries payload where the ports would be */
	if (frag & 0x1fff) {
		pkt->has_port = 0;
		return BH_PARSE_OK;
	}
	return bh_parse_l4(l3 + hdr_len, data_end, tot_len - hdr_len, 0, pkt);
}

static __always_inline int bh_is_ext_hdr(__u8 nexthdr)
{
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_MH:
		return 1;
	default:
		return 0;
	}
}

/* Extension headers total at most 8 * 2048 bytes: masking the offset with
 * this bound changes no value, but tells the verifier that every path through
 * one header leaves the same range, so it can merge them instead of walking
 * each combination of header kinds. */
#define BH_EXT_OFF_MASK 0x7fff

static __always_inline int bh_parse_ipv6(void *l3, void *data_end, __u32 avail,
					 struct bh_pkt *pkt)
{
	struct ipv6hdr *ip6 = l3;

	if ((void *)(ip6 + 1) > data_end)
		return BH_PARSE_MALFORMED;
	if (ip6->version != 6)
		return BH_PARSE_MALFORMED;

	__u32 end = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	__u32 off = sizeof(*ip6);
	__u8 nexthdr = ip6->nexthdr;

	if (end > avail)
		return BH_PARSE_MALFORMED;
	__builtin_memcpy(pkt->src.bytes, &ip6->saddr, 16);
	__builtin_memcpy(pkt->dst.bytes, &ip6->daddr, 16);

#pragma unroll
	for (int i = 0; i < BH_MAX_EXT_HDRS; i++) {
		if (!bh_is_ext_hdr(nexthdr))
			break;

		off &= BH_EXT_OFF_MASK;
		struct bh_frag_hdr *ext = l3 + off; /* every kind starts nexthdr, len */
		__u32 len;

		if ((void *)(ext + 1) > data_end)
			return BH_PARSE_MALFORMED;
		if (nexthdr == IPPROTO_FRAGMENT) {
			pkt->frag_id = ext->id;
			/* offset 0 with M clear is an atomic fragment: a whole packet */
			pkt->frag_first = (bpf_ntohs(ext->frag_off) & 0xfff9) == 1;
			if (bpf_ntohs(ext->frag_off) & 0xfff8) {
				/* a later fragment: no transport header here */
				pkt->proto = ext->nexthdr;
				pkt->has_port = 0;
				return off + sizeof(*ext) <= end ? BH_PARSE_OK : BH_PARSE_MALFORMED;
			}
			len = sizeof(*ext);
		} else if (nexthdr == IPPROTO_AH) {
			len = ((__u32)ext->reserved + 2) * 4; /* AH: 4-byte units, minus 2 */
		} else {
			len = ((__u32)ext->reserved + 1) * 8; /* the others: 8-byte units, minus 1 */
		}
		if (off + len > end)
			return BH_PARSE_MALFORMED;
		nexthdr = ext->nexthdr;
		off += len;
	}
	if (bh_is_ext_hdr(nexthdr))
		return BH_PARSE_MALFORMED; /* deeper than we walk */

	pkt->proto = nexthdr;
	off &= BH_EXT_OFF_MASK;
	return bh_parse_l4(l3 + off, data_end, end - off, ip6->hop_limit, pkt);
}

/* Parses a packet from its network header (cgroup_skb: no link layer). */
static __always_inline int bh_parse_l3(void *data, void *data_end, __u32 avail, __be16 proto,
				       struct bh_pkt *pkt)
{
	if (proto == bpf_htons(ETH_P_IP))
		return bh_parse_ipv4(data, data_end, avail, pkt);
	if (proto == bpf_htons(ETH_P_IPV6))
		return bh_parse_ipv6(data, data_end, avail, pkt);
	return BH_PARSE_NOT_IP;
}

/* Parses a frame from its Ethernet header. */
static __always_inline int bh_parse_eth(void *data, void *data_end, struct bh_pkt *pkt)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return BH_PARSE_MALFORMED;

	void *cursor = (void *)(eth + 1);
	__be16 proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < BH_MAX_VLAN_TAGS; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;

		struct bh_vlan_hdr *vlan = cursor;

		if ((void *)(vlan + 1) > data_end)
			return BH_PARSE_MALFORMED;
		proto = vlan->proto;
		cursor = (void *)(vlan + 1);
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return BH_PARSE_MALFORMED; /* a third tag: deeper than we walk */

	/* 14, 18 or 22 bytes; as a masked offset the three cases are one to the
	 * verifier, which then checks the network layer once, not three times */
	__u32 l3_off = (__u32)(cursor - data) & 0x1f;
	void *l3 = data + l3_off;

	if (l3 > data_end)
		return BH_PARSE_MALFORMED;
	return bh_parse_l3(l3, data_end, data_end - l3, proto, pkt);
}

#endif /* BH_PARSE_H */
