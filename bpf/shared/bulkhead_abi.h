/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel/user boundary of bulkhead: every map key, map value and enum that
 * both the BPF programs and the C++ library use is defined here, once.
 *
 * Rules for this file:
 * - fixed-width types only, no pointers, no bool;
 * - every struct is laid out without implicit padding: padding is an explicit
 *   field that writers always zero (a key with garbage in its padding is a
 *   different key to a hash map);
 * - the byte order of every multi-byte field is stated: "be" means network
 *   byte order, "host" means the CPU's order;
 * - a struct whose layout changes gets a new map name suffix (BH_ABI_VERSION),
 *   so a pinned map of the old layout is never reused by mistake.
 *
 * Sizes are checked at compile time at the end of this file, on both sides.
 */
#ifndef BULKHEAD_ABI_H
#define BULKHEAD_ABI_H

#ifdef __cplusplus
#include <cstdint>
#define BH_U8 std::uint8_t
#define BH_U16 std::uint16_t
#define BH_U32 std::uint32_t
#define BH_U64 std::uint64_t
#else
#include <linux/types.h>
#define BH_U8 __u8
#define BH_U16 __u16
#define BH_U32 __u32
#define BH_U64 __u64
#endif

#define BH_ABI_VERSION 2

/* Reserved identities. Workload identities start at BH_ID_FIRST_WORKLOAD; the
 * compiler's address classes (a workload identity narrowed by the CIDR
 * selectors that contain it) start at BH_ID_FIRST_CLASS. */
enum bh_reserved_identity {
	BH_ID_ANY = 0, /* policy key wildcard: any source identity */
	BH_ID_HOST = 1,
	BH_ID_WORLD = 2,
	BH_ID_FIRST_WORKLOAD = 256,
	BH_ID_FIRST_CLASS = 0x01000000,
};

/* Default behaviour of an identity where no rule decides. */
enum bh_mode {
	BH_MODE_ALLOW = 0,
	BH_MODE_AUDIT = 1,
	BH_MODE_ENFORCE = 2,
};

enum bh_action {
	BH_ACTION_ALLOW = 1,
	BH_ACTION_DENY = 2,
};

/* Why a packet got its verdict: the index into bh_reason_counters. */
enum bh_reason {
	BH_REASON_ALLOW_RULE = 0,   /* an allow rule matched */
	BH_REASON_DENY_RULE = 1,    /* a deny rule matched, enforced */
	BH_REASON_AUDIT_RULE = 2,   /* a deny rule matched, passed in audit mode */
	BH_REASON_ALLOW_DEFAULT = 3,/* no rule; the enforcing identity's mode is allow */
	BH_REASON_DENY_DEFAULT = 4, /* no rule; mode enforce */
	BH_REASON_AUDIT_DEFAULT = 5,/* no rule; mode audit: passed, would deny */
	BH_REASON_NOT_IP = 6,       /* ARP, LLDP, other non-IP frames: passed */
	BH_REASON_ND = 7,           /* IPv6 neighbour discovery: passed */
	BH_REASON_MALFORMED = 8,    /* cut short or inconsistent headers: dropped */
	BH_REASON_NO_POLICY = 9,    /* no generation committed yet: passed */
	BH_REASON_TRACKED = 10,     /* return traffic of a tracked flow */
	BH_REASON_FAILSAFE = 11,    /* failsafe port from a management prefix */
	BH_REASON_CT_MISS = 12,     /* not a verdict: a mid-flow packet found no tracking
				     * entry (counted besides its verdict) */
	BH_REASON_REVOKED = 13,     /* not a verdict: a tracked flow that a new
				     * generation no longer allows (counted besides) */
	BH_REASON_MAX = 16,
};

/* An address as the IP cache stores it: IPv6, or IPv4 as the IPv4-mapped IPv6
 * address ::ffff:a.b.c.d, so both families share one set of maps and a mapped
 * address is its IPv4 address by construction. Bytes in network order. */
struct bh_addr {
	BH_U8 bytes[16];
};

/* IP cache, exact addresses (/32, /128): hash key. */
struct bh_ipcache_host_key {
	struct bh_addr addr;
};

/* IP cache, real prefixes: LPM trie key. prefixlen counts bits of addr, so an
 * IPv4 /24 is stored as prefixlen 96 + 24. */
struct bh_ipcache_lpm_key {
	BH_U32 prefixlen; /* host */
	struct bh_addr addr;
};

/* What an address resolves to. The modes travel with the identity so the
 * verdict needs no second lookup to find the enforcing identity's mode. */
struct bh_identity_info {
	BH_U32 id;          /* host */
	BH_U8 ingress_mode; /* enum bh_mode */
	BH_U8 egress_mode;  /* enum bh_mode */
	BH_U8 flags;        /* enum bh_identity_flags */
	BH_U8 pad;
};

enum bh_identity_flags {
	/* one of this machine's addresses, also when a selector CIDR has given
	 * it an address class of its own: failsafe ports apply */
	BH_IDENTITY_HOST = 1,
};

/*
 * Policy table key, an LPM trie. The trie matches whole bytes from the first
 * data byte on, so the order of fields is the order of specificity:
 * destination identity and source identity are always matched in full (they
 * are exact), then protocol, then the port prefix. A rule for "all ports of
 * tcp" is one entry of prefixlen BH_POLICY_PREFIX_PROTO; a port range is a few
 * aligned port prefixes; a rule for every protocol is BH_POLICY_PREFIX_IDS.
 * The port is big endian because prefixes are taken from its high bits.
 * ICMP and ICMPv6 put the type in the high byte and the code in the low byte,
 * so "icmp/8" is the prefix 8/8 and "icmp/8/0" the exact value.
 */
struct bh_policy_key {
	BH_U32 prefixlen; /* host; bits of the fields below */
	BH_U32 dst_id;    /* be */
	BH_U32 src_id;    /* be; BH_ID_ANY for rules from any source */
	BH_U8 proto;      /* IPPROTO_* */
	BH_U8 pad;        /* zero; inside the prefix, so it must be zero */
	BH_U16 port;      /* be; transport port, or ICMP type << 8 | code */
};

#define BH_POLICY_PREFIX_IDS 64   /* dst and src identities */
#define BH_POLICY_PREFIX_PROTO 80 /* ... and protocol (pad included) */
#define BH_POLICY_PREFIX_FULL 96  /* ... and the whole port */

/* The resolved verdict at a policy key. The compiler has already applied
 * deny precedence, so this is final for every packet that matches here. */
struct bh_policy_value {
	BH_U32 rule_id; /* host; index into bh_rule_counters */
	BH_U8 action;   /* enum bh_action */
	BH_U8 pad[3];
};

/* Per-generation settings that are not per identity. */
struct bh_gen_config {
	BH_U8 world_ingress_mode; /* enum bh_mode, for addresses no entry covers */
	BH_U8 world_egress_mode;
	BH_U8 pad[6];
};

/*
 * bh_gen_ctl entry BH_GEN_CTL_CURRENT: the generation in force. One u64,
 * written by userspace with one aligned store, read once per packet: the slot
 * of every per-generation map is (generation & 1). Generation 0 means nothing
 * committed yet. Entry BH_GEN_CTL_QUIESCED (userspace only): the latest
 * generation after whose switch a grace period has passed, so the other slot
 * is known to have no readers left.
 */
struct bh_gen_ctl {
	BH_U64 generation; /* host */
};

enum bh_gen_ctl_index {
	BH_GEN_CTL_CURRENT = 0,
	BH_GEN_CTL_QUIESCED = 1,
};

/* A packet and byte counter, per CPU. */
struct bh_counter {
	BH_U64 packets;
	BH_U64 bytes;
};

/* A cgroup's identity: cgroup v2 id (the directory's inode number) -> info.
 * Per generation, like the IP cache. */
struct bh_cgroup_key {
	BH_U64 cgroup_id; /* host */
};

/*
 * Failsafe: an LPM trie keyed on protocol, port and then the source address,
 * so one lookup answers "is this port open to this management prefix".
 * prefixlen = 32 + the source prefix length in the 128-bit form.
 */
struct bh_failsafe_key {
	BH_U32 prefixlen; /* host */
	BH_U8 proto;      /* IPPROTO_* */
	BH_U8 pad;        /* zero */
	BH_U16 port;      /* be */
	struct bh_addr src;
};

/*
 * Connection tracking, shared by every hook: one entry per flow and kind of
 * enforcement point, keyed by the tuple of its opening direction. A packet of
 * the opposite direction finds it by looking up its own tuple reversed, at
 * either kind of point: return traffic passes wherever it is seen. A packet of
 * the opening direction passes only on an entry of its own kind of point, so
 * a flow that the source's egress allowed is still judged at the
 * destination's ingress on the same host. ICMP echo puts the echo id in both
 * ports, so request and reply have mirror tuples.
 */
struct bh_ct_key {
	struct bh_addr src;
	struct bh_addr dst;
	BH_U16 sport;  /* be */
	BH_U16 dport;  /* be */
	BH_U8 proto;   /* IPPROTO_* */
	BH_U8 point;   /* enum bh_ct_point: where the flow was opened */
	BH_U8 pad[2];
};

enum bh_ct_point {
	BH_CT_POINT_EGRESS = 1,
	BH_CT_POINT_INGRESS = 2,
};

enum bh_ct_flags {
	BH_CT_REPLIED = 1,   /* a packet of the reply direction was seen */
	BH_CT_CLOSING = 2,   /* FIN or RST seen: short life */
	BH_CT_INGRESS = 4,   /* opened at an ingress point (the destination enforced) */
	BH_CT_LOCAL_SRC = 8, /* the source end was identified by cgroup_id */
	BH_CT_LOCAL_DST = 16,/* the destination end was identified by cgroup_id */
};

struct bh_ct_value {
	BH_U64 expires_ns; /* host; bpf_ktime_get_ns() time after which it is stale */
	BH_U64 generation; /* host; the generation that allowed the flow */
	BH_U64 cgroup_id;  /* host; registered cgroup of the local end, or 0 */
	BH_U32 rule_id;    /* host; the rule that allowed it, or BH_RULE_ID_NONE */
	BH_U8 flags;       /* enum bh_ct_flags */
	BH_U8 pad[3];
};

/* Fragments: the first fragment's verdict, for the fragments that follow it
 * (which carry no ports). Keyed like the kernel's reassembly queue. */
struct bh_frag_key {
	struct bh_addr src;
	struct bh_addr dst;
	BH_U32 id;    /* be as on the wire (IPv4's 16 bits widened) */
	BH_U8 proto;  /* IPPROTO_* of the fragmented packet */
	BH_U8 pad[3];
};

/* What the first fragment was, so that a later generation can judge it again
 * for the fragments still following it. */
struct bh_frag_value {
	BH_U64 expires_ns; /* host */
	BH_U64 generation; /* host; the generation that let the first fragment in */
	BH_U16 sport;      /* be; as struct bh_pkt */
	BH_U16 port;       /* be */
	BH_U8 icmp_kind;   /* enum bh_icmp_kind */
	BH_U8 ingress;     /* judged at an ingress point */
	BH_U8 pad[2];
};

/* Where a program runs, for events and for the verdict's direction. */
enum bh_hook {
	BH_HOOK_XDP = 0,
	BH_HOOK_CGROUP_INGRESS = 1,
	BH_HOOK_CGROUP_EGRESS = 2,
	BH_HOOK_CONNECT = 3,
	BH_HOOK_SENDMSG = 4,
};

/*
 * Userspace bookkeeping of a generation: the policy it was compiled from and
 * the numbers the compiler gave out, as JSON cut into chunks. It lives in a
 * pinned map beside the tables it describes, so a new process can explain,
 * diff and delta-commit, and it vanishes with them. BPF never reads it.
 * Chunk 0 is written last and says how many chunks there are.
 */
struct bh_meta_key {
	BH_U32 slot;  /* host; generation slot */
	BH_U32 chunk; /* host */
};

#define BH_META_CHUNK_BYTES 4088

struct bh_meta_value {
	BH_U32 len;       /* host; bytes used in data */
	BH_U32 chunks;    /* host; in chunk 0: how many chunks the blob has */
	BH_U8 data[BH_META_CHUNK_BYTES];
};

/*
 * BTF anchor. Clang puts a type into the object's BTF only when a global or a
 * function signature uses it; a key type reached only through an inner map
 * template would be a forward declaration, which libbpf cannot size. This
 * struct, instantiated once as a read-only global of the BPF object, makes
 * every shared layout part of the BTF, which also lets tests compare the
 * shared header with the compiled object.
 */
struct bh_btf_anchor {
	struct bh_ipcache_host_key ipc_host_key;
	struct bh_ipcache_lpm_key ipc_lpm_key;
	struct bh_identity_info identity_info;
	struct bh_policy_key policy_key;
	struct bh_policy_value policy_value;
	struct bh_gen_config gen_config;
	struct bh_gen_ctl gen_ctl;
	struct bh_counter counter;
	struct bh_meta_key meta_key;
	struct bh_cgroup_key cgroup_key;
	struct bh_failsafe_key failsafe_key;
	struct bh_ct_key ct_key;
	struct bh_ct_value ct_value;
	struct bh_frag_key frag_key;
	struct bh_frag_value frag_value;
};

#define BH_GENERATION_SLOTS 2
#define BH_RULE_ID_NONE 0xffffffffu

#ifdef __cplusplus
static_assert(sizeof(struct bh_addr) == 16, "bh_addr layout");
static_assert(sizeof(struct bh_ipcache_host_key) == 16, "bh_ipcache_host_key layout");
static_assert(sizeof(struct bh_ipcache_lpm_key) == 20, "bh_ipcache_lpm_key layout");
static_assert(sizeof(struct bh_identity_info) == 8, "bh_identity_info layout");
static_assert(sizeof(struct bh_policy_key) == 16, "bh_policy_key layout");
static_assert(sizeof(struct bh_policy_value) == 8, "bh_policy_value layout");
static_assert(sizeof(struct bh_gen_config) == 8, "bh_gen_config layout");
static_assert(sizeof(struct bh_gen_ctl) == 8, "bh_gen_ctl layout");
static_assert(sizeof(struct bh_counter) == 16, "bh_counter layout");
static_assert(sizeof(struct bh_meta_key) == 8, "bh_meta_key layout");
static_assert(sizeof(struct bh_cgroup_key) == 8, "bh_cgroup_key layout");
static_assert(sizeof(struct bh_failsafe_key) == 24, "bh_failsafe_key layout");
static_assert(sizeof(struct bh_ct_key) == 40, "bh_ct_key layout");
static_assert(sizeof(struct bh_ct_value) == 32, "bh_ct_value layout");
static_assert(sizeof(struct bh_frag_key) == 40, "bh_frag_key layout");
static_assert(sizeof(struct bh_frag_value) == 24, "bh_frag_value layout");
static_assert(sizeof(struct bh_meta_value) == 4096, "bh_meta_value layout");
#else
_Static_assert(sizeof(struct bh_addr) == 16, "bh_addr layout");
_Static_assert(sizeof(struct bh_ipcache_host_key) == 16, "bh_ipcache_host_key layout");
_Static_assert(sizeof(struct bh_ipcache_lpm_key) == 20, "bh_ipcache_lpm_key layout");
_Static_assert(sizeof(struct bh_identity_info) == 8, "bh_identity_info layout");
_Static_assert(sizeof(struct bh_policy_key) == 16, "bh_policy_key layout");
_Static_assert(sizeof(struct bh_policy_value) == 8, "bh_policy_value layout");
_Static_assert(sizeof(struct bh_gen_config) == 8, "bh_gen_config layout");
_Static_assert(sizeof(struct bh_gen_ctl) == 8, "bh_gen_ctl layout");
_Static_assert(sizeof(struct bh_counter) == 16, "bh_counter layout");
_Static_assert(sizeof(struct bh_meta_key) == 8, "bh_meta_key layout");
_Static_assert(sizeof(struct bh_cgroup_key) == 8, "bh_cgroup_key layout");
_Static_assert(sizeof(struct bh_failsafe_key) == 24, "bh_failsafe_key layout");
_Static_assert(sizeof(struct bh_ct_key) == 40, "bh_ct_key layout");
_Static_assert(sizeof(struct bh_ct_value) == 32, "bh_ct_value layout");
_Static_assert(sizeof(struct bh_frag_key) == 40, "bh_frag_key layout");
_Static_assert(sizeof(struct bh_frag_value) == 24, "bh_frag_value layout");
_Static_assert(sizeof(struct bh_meta_value) == 4096, "bh_meta_value layout");
#endif

#undef BH_U8
#undef BH_U16
#undef BH_U32
#undef BH_U64

#endif /* BULKHEAD_ABI_H */
