/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The verdict function every hook shares, so a rule means the same at every
 * enforcement point: state (tracking, fragments), identities, failsafe,
 * policy, decision, counting. Layered from general to specific; the program
 * entries in bulkhead.bpf.c only say where the packet is and who is local.
 */
#ifndef BH_VERDICT_H
#define BH_VERDICT_H

#include "bh_maps.h"
#include "bh_parse.h"

#define BH_MAX_CGROUP_DEPTH 16

#define BH_SEC 1000000000ull
#define BH_CT_TCP_LIFE (6 * 3600 * BH_SEC) /* established TCP */
#define BH_CT_OPENING_LIFE (60 * BH_SEC)   /* no reply seen yet */
#define BH_CT_CLOSING_LIFE (10 * BH_SEC)   /* after FIN or RST */
#define BH_CT_DATAGRAM_LIFE (120 * BH_SEC) /* UDP, SCTP, ICMP echo, others */
#define BH_FRAG_LIFE (30 * BH_SEC)

/* The maps of one generation, looked up once per packet. */
struct bh_gen_view {
	__u64 generation;
	void *ipc_host;
	void *ipc_lpm;
	void *policy;
	void *cgroups;
	void *failsafe;
	struct bh_gen_config *cfg;
};

/* Where a packet is judged and who is local there. */
struct bh_point {
	__u8 ingress;       /* 1: the destination enforces; 0: the source */
	__u8 local_is_src;  /* which end is local (cgroup hooks) */
	__u8 local_is_host; /* the local end has no address: without a cgroup it is host */
	__u8 pad[5];
	__u64 cgroup_id;    /* registered cgroup of the local end, or 0 */
};

struct bh_decision {
	__u32 rule_id;   /* BH_RULE_ID_NONE when no rule decided */
	__u32 src_id;
	__u32 dst_id;
	__u8 reason;     /* enum bh_reason */
	__u8 pass;       /* 1: let it through */
	__u8 pad[2];
};

/* The generation in force, read once per packet; 0 when none is committed. */
static __always_inline __u64 bh_gen_read(void)
{
	__u32 current = BH_GEN_CTL_CURRENT;
	struct bh_gen_ctl *ctl = bpf_map_lookup_elem(&bh_gen_ctl, &current);

	return ctl ? *(volatile __u64 *)&ctl->generation : 0;
}

/* The maps of `generation`: every lookup of the packet uses this one slot. */
static __always_inline int bh_gen_view_of(__u64 generation, struct bh_gen_view *view)
{
	__u32 slot = (__u32)(generation & 1);

	if (generation == 0)
		return 0;
	view->generation = generation;
	view->ipc_host = bpf_map_lookup_elem(&bh_ipc_host, &slot);
	view->ipc_lpm = bpf_map_lookup_elem(&bh_ipc_lpm, &slot);
	view->policy = bpf_map_lookup_elem(&bh_policy, &slot);
	view->cgroups = bpf_map_lookup_elem(&bh_cgroups, &slot);
	view->failsafe = bpf_map_lookup_elem(&bh_failsafe, &slot);
	view->cfg = bpf_map_lookup_elem(&bh_gen_cfg, &slot);
	return view->ipc_host && view->ipc_lpm && view->policy && view->cgroups &&
	       view->failsafe && view->cfg;
}

static __always_inline void bh_count(void *map, __u32 index, __u64 bytes)
{
	struct bh_counter *counter = bpf_map_lookup_elem(map, &index);

	if (counter) {
		counter->packets++;
		counter->bytes += bytes;
	}
}

/* --- identities --- */

/* Address to identity: exact host entries first (a hash, constant cost), then
 * the prefix trie. A host entry is always the longest prefix, so a hit in the
 * hash is final. No entry: the address is world. */
static __always_inline void bh_identity_of(const struct bh_gen_view *view,
					   const struct bh_addr *addr,
					   struct bh_identity_info *out)
{
	/* bh_ipcache_host_key is a bh_addr */
	struct bh_identity_info *info = bpf_map_lookup_elem(view->ipc_host, addr);

	if (!info) {
		struct bh_ipcache_lpm_key key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr.bytes, addr->bytes, sizeof(key.addr.bytes));
		info = bpf_map_lookup_elem(view->ipc_lpm, &key);
	}
	if (info) {
		*out = *info;
		return;
	}
	out->id = BH_ID_WORLD;
	out->ingress_mode = view->cfg->world_ingress_mode;
	out->egress_mode = view->cfg->world_egress_mode;
	out->flags = 0;
}

/* The identity of one end: its registered cgroup if the point names one and
 * that cgroup is (still) registered in this generation, else its address. */
static __always_inline void bh_end_identity(const struct bh_gen_view *view,
					    const struct bh_point *point, int is_src,
					    const struct bh_addr *addr,
					    struct bh_identity_info *out)
{
	int local = point->local_is_src == is_src;

	if (local && point->cgroup_id) {
		struct bh_cgroup_key key = { .cgroup_id = point->cgroup_id };
		struct bh_identity_info *info = bpf_map_lookup_elem(view->cgroups, &key);

		if (info) {
			*out = *info;
			return;
		}
	}
	if (local && point->local_is_host) {
		out->id = BH_ID_HOST;
		out->ingress_mode = view->cfg->world_ingress_mode;
		out->egress_mode = view->cfg->world_egress_mode;
		out->flags = BH_IDENTITY_HOST;
		return;
	}
	bh_identity_of(view, addr, out);
}

/* --- policy --- */

/* At most two lookups: the source's own entries, into which the compiler has
 * folded every any-source rule of the same destination, then the any-source
 * entries. A packet without ports looks up only protocol-wide entries. */
static __always_inline struct bh_policy_value *
bh_policy_lookup(const struct bh_gen_view *view, __u32 src_id, __u32 dst_id,
		 const struct bh_pkt *pkt)
{
	struct bh_policy_key key = {
		.prefixlen = pkt->has_port ? BH_POLICY_PREFIX_FULL : BH_POLICY_PREFIX_PROTO,
		.dst_id = bpf_htonl(dst_id),
		.src_id = bpf_htonl(src_id),
		.proto = pkt->proto,
		.port = pkt->has_port ? pkt->port : 0,
	};
	struct bh_policy_value *value = bpf_map_lookup_elem(view->policy, &key);

	if (value)
		return value;
	key.src_id = bpf_htonl(BH_ID_ANY);
	return bpf_map_lookup_elem(view->policy, &key);
}

/* Failsafe: a host port reachable from a management prefix whatever the
 * policy, so that a wrong policy cannot lock the operator out. */
static __always_inline int bh_failsafe_open(const struct bh_gen_view *view,
					    const struct bh_pkt *pkt,
					    const struct bh_identity_info *dst, int ingress)
{
	if (!ingress || !(dst->flags & BH_IDENTITY_HOST) || !pkt->has_port)
		return 0;

	struct bh_failsafe_key key = {
		.prefixlen = 32 + 128,
		.proto = pkt->proto,
		.port = pkt->port,
	};

	__builtin_memcpy(key.src.bytes, pkt->src.bytes, sizeof(key.src.bytes));
	__u32 *open = bpf_map_lookup_elem(view->failsafe, &key);

	return open && *open; /* 0: a closing entry (IPv4 under an IPv6 /0) */
}

static __always_inline void bh_deny(struct bh_decision *d, __u8 mode, __u8 rule_reason)
{
	/* audit passes what enforcement would drop, and says so */
	int audit = mode == BH_MODE_AUDIT;

	d->pass = audit;
	if (rule_reason)
		d->reason = audit ? BH_REASON_AUDIT_RULE : BH_REASON_DENY_RULE;
	else
		d->reason = audit ? BH_REASON_AUDIT_DEFAULT : BH_REASON_DENY_DEFAULT;
}

/* DESIGN.md "Verdict of a packet": deny rule, else allow rule, else the
 * enforcing identity's mode (destination at ingress, source at egress). */
static __always_inline void bh_decide(const struct bh_gen_view *view, const struct bh_pkt *pkt,
				      const struct bh_point *point, struct bh_decision *d)
{
	struct bh_identity_info src, dst;

	bh_end_identity(view, point, 1, &pkt->src, &src);
	bh_end_identity(view, point, 0, &pkt->dst, &dst);
	d->src_id = src.id;
	d->dst_id = dst.id;
	d->rule_id = BH_RULE_ID_NONE;

	if (bh_failsafe_open(view, pkt, &dst, point->ingress)) {
		d->pass = 1;
		d->reason = BH_REASON_FAILSAFE;
		return;
	}

	struct bh_policy_value *rule = bh_policy_lookup(view, src.id, dst.id, pkt);
	__u8 mode = point->ingress ? dst.ingress_mode : src.egress_mode;

	if (rule && rule->action == BH_ACTION_DENY) {
		d->rule_id = rule->rule_id;
		bh_deny(d, mode, 1);
	} else if (pkt->nd) {
		d->pass = 1; /* neighbour discovery keeps working unless denied */
		d->reason = BH_REASON_ND;
	} else if (rule) {
		d->rule_id = rule->rule_id;
		d->pass = 1;
		d->reason = BH_REASON_ALLOW_RULE;
	} else if (mode == BH_MODE_ALLOW) {
		d->pass = 1;
		d->reason = BH_REASON_ALLOW_DEFAULT;
	} else {
		bh_deny(d, mode, 0);
	}
}

/* --- connection tracking --- */

static __always_inline int bh_trackable(const struct bh_pkt *pkt)
{
	if (!pkt->has_port)
		return 0;
	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6)
		return pkt->icmp_kind == BH_ICMP_ECHO_REQUEST || pkt->icmp_kind == BH_ICMP_ECHO_REPLY;
	return !pkt->nd;
}

static __always_inline __u8 bh_ct_point_of(int ingress)
{
	return ingress ? BH_CT_POINT_INGRESS : BH_CT_POINT_EGRESS;
}

static __always_inline void bh_ct_tuple(const struct bh_pkt *pkt, int reverse, __u8 point,
					struct bh_ct_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->point = point;
	__builtin_memcpy(&key->src, reverse ? &pkt->dst : &pkt->src, sizeof(key->src));
	__builtin_memcpy(&key->dst, reverse ? &pkt->src : &pkt->dst, sizeof(key->dst));
	key->proto = pkt->proto;
	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		key->sport = pkt->sport; /* the echo id, both ways */
		key->dport = pkt->sport;
		return;
	}
	key->sport = reverse ? pkt->port : pkt->sport;
	key->dport = reverse ? pkt->sport : pkt->port;
}

static __always_inline __u64 bh_ct_life(const struct bh_pkt *pkt, __u8 flags)
{
	if (pkt->proto != IPPROTO_TCP)
		return BH_CT_DATAGRAM_LIFE;
	if (flags & BH_CT_CLOSING)
		return BH_CT_CLOSING_LIFE;
	return (flags & BH_CT_REPLIED) ? BH_CT_TCP_LIFE : BH_CT_OPENING_LIFE;
}

static __always_inline void bh_ct_refresh(struct bh_ct_value *ct, const struct bh_pkt *pkt,
					  int reply, __u64 now)
{
	__u8 flags = ct->flags;

	if (reply)
		flags |= BH_CT_REPLIED;
	if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & 0x05)) /* FIN or RST */
		flags |= BH_CT_CLOSING;
	if (flags != ct->flags)
		ct->flags = flags;
	ct->expires_ns = now + bh_ct_life(pkt, flags);
}

static __always_inline void bh_ct_open(const struct bh_gen_view *view, const struct bh_pkt *pkt,
				       const struct bh_point *point, const struct bh_decision *d)
{
	struct bh_ct_key key;
	struct bh_ct_value ct = {
		.generation = view->generation,
		.cgroup_id = point->cgroup_id,
		.rule_id = d->rule_id,
		.flags = point->ingress ? BH_CT_INGRESS : 0,
	};

	if (point->cgroup_id)
		ct.flags |= point->local_is_src ? BH_CT_LOCAL_SRC : BH_CT_LOCAL_DST;
	bh_ct_tuple(pkt, 0, bh_ct_point_of(point->ingress), &key);
	bh_ct_refresh(&ct, pkt, 0, bpf_ktime_get_ns());
	bpf_map_update_elem(&bh_ct, &key, &ct, BPF_ANY);
}

/*
 * A flow allowed by an older generation is judged again, in its opening
 * direction and at its opening point, by the generation in force: revoking
 * a rule cuts established flows at their next packet.
 */
/* Swaps the ends of a packet, in place. */
static __always_inline void bh_pkt_swap_ends(struct bh_pkt *pkt)
{
	struct bh_addr tmp;

	__builtin_memcpy(&tmp, &pkt->src, sizeof(tmp));
	__builtin_memcpy(&pkt->src, &pkt->dst, sizeof(tmp));
	__builtin_memcpy(&pkt->dst, &tmp, sizeof(tmp));
}

/*
 * A flow allowed by an older generation is judged again, in its opening
 * direction and at its opening point, by the generation in force: revoking
 * a rule cuts established flows at their next packet. A reply is turned
 * into its flow's opening packet in place (the stack has no room for a
 * copy) and back.
 */
static __always_inline int bh_ct_still_allowed(const struct bh_gen_view *view,
					       struct bh_pkt *pkt, int reply,
					       struct bh_ct_value *ct, int update)
{
	struct bh_point point = {
		.ingress = !!(ct->flags & BH_CT_INGRESS),
		.local_is_src = !!(ct->flags & BH_CT_LOCAL_SRC),
		.cgroup_id = ct->cgroup_id,
	};
	struct bh_decision d = {};
	__u16 sport = pkt->sport;
	__u16 port = pkt->port;

	if (reply) {
		bh_pkt_swap_ends(pkt);
		pkt->sport = port;
		pkt->port = sport;
	}
	/* an echo flow opened with a request, whichever packet asks now */
	if (pkt->proto == IPPROTO_ICMP)
		pkt->port = bpf_htons(8 << 8);
	else if (pkt->proto == IPPROTO_ICMPV6)
		pkt->port = bpf_htons(128 << 8);
	bh_decide(view, pkt, &point, &d);
	if (reply)
		bh_pkt_swap_ends(pkt);
	pkt->sport = sport;
	pkt->port = port;
	if (!d.pass)
		return 0;
	if (update)
		ct->generation = view->generation;
	return 1;
}

enum bh_ct_result {
	BH_CT_NEW = 0,     /* no entry: judge by policy */
	BH_CT_PASS = 1,    /* a packet of a tracked flow */
	BH_CT_REVOKED = 2, /* tracked, but the policy in force no longer allows it */
};

/* With `update` clear, a peek: nothing is refreshed, re-stamped or removed. */
static __always_inline int bh_ct_lookup_dir(const struct bh_gen_view *view,
					    struct bh_pkt *pkt, int reply, __u8 point,
					    __u64 now, __u32 *rule_id, int update)
{
	struct bh_ct_key key;
	struct bh_ct_value *ct;

	bh_ct_tuple(pkt, reply, point, &key);
	ct = bpf_map_lookup_elem(&bh_ct, &key);
	if (!ct)
		return BH_CT_NEW;
	if (ct->expires_ns < now) {
		if (update)
			bpf_map_delete_elem(&bh_ct, &key);
		return BH_CT_NEW;
	}
	if (ct->generation != view->generation &&
	    !bh_ct_still_allowed(view, pkt, reply, ct, update)) {
		if (update)
			bpf_map_delete_elem(&bh_ct, &key);
		return BH_CT_REVOKED;
	}
	if (update)
		bh_ct_refresh(ct, pkt, reply, now);
	*rule_id = ct->rule_id;
	return BH_CT_PASS;
}

/* Looks the packet up as its flow's opening direction at this kind of point,
 * then as a reply to a flow opened at either kind (the other first: a reply
 * at an ingress point usually answers a local egress). On BH_CT_PASS,
 * *rule_id is the rule that allowed the flow: a rule's counters count every
 * packet of the flows it let in, both ways. */
static __always_inline int bh_ct_lookup(const struct bh_gen_view *view, struct bh_pkt *pkt,
					int ingress, __u32 *rule_id, int update)
{
	__u64 now = bpf_ktime_get_ns();
	__u8 here = bh_ct_point_of(ingress);
	__u8 other = bh_ct_point_of(!ingress);
	int result = bh_ct_lookup_dir(view, pkt, 0, here, now, rule_id, update);

	if (result == BH_CT_NEW)
		result = bh_ct_lookup_dir(view, pkt, 1, other, now, rule_id, update);
	if (result == BH_CT_NEW)
		result = bh_ct_lookup_dir(view, pkt, 1, here, now, rule_id, update);
	return result;
}

/* An ICMP error is related to a tracked flow if the packet it quotes is one
 * of that flow's, in either direction, opened at either kind of point. */
static __always_inline int bh_ct_related(const struct bh_pkt *pkt)
{
	struct bh_ct_key quoted = pkt->inner;
	struct bh_ct_key reversed = {
		.sport = pkt->inner.dport,
		.dport = pkt->inner.sport,
		.proto = pkt->inner.proto,
	};

	__builtin_memcpy(&reversed.src, &pkt->inner.dst, sizeof(reversed.src));
	__builtin_memcpy(&reversed.dst, &pkt->inner.src, sizeof(reversed.dst));
	for (__u8 point = BH_CT_POINT_EGRESS; point <= BH_CT_POINT_INGRESS; point++) {
		quoted.point = point;
		reversed.point = point;
		if (bpf_map_lookup_elem(&bh_ct, &quoted) || bpf_map_lookup_elem(&bh_ct, &reversed))
			return 1;
	}
	return 0;
}

/* --- fragments --- */

static __always_inline void bh_frag_key_of(const struct bh_pkt *pkt, struct bh_frag_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->src, &pkt->src, sizeof(key->src));
	__builtin_memcpy(&key->dst, &pkt->dst, sizeof(key->dst));
	key->id = pkt->frag_id;
	key->proto = pkt->proto;
}

static __always_inline void bh_frag_remember(const struct bh_gen_view *view,
					     const struct bh_pkt *pkt, int ingress)
{
	struct bh_frag_key key;
	struct bh_frag_value value = {
		.expires_ns = bpf_ktime_get_ns() + BH_FRAG_LIFE,
		.generation = view->generation,
		.sport = pkt->sport,
		.port = pkt->port,
		.icmp_kind = pkt->icmp_kind,
		.ingress = ingress,
	};

	bh_frag_key_of(pkt, &key);
	bpf_map_update_elem(&bh_frag, &key, &value, BPF_ANY);
}

/* A later fragment passes if its first fragment passed: in this generation,
 * or, after a commit, if the first fragment would pass now (tracked, or by
 * policy), so a commit that keeps a datagram's rule does not cut it. */
static __always_inline int bh_frag_follows(const struct bh_gen_view *view, struct bh_pkt *pkt)
{
	struct bh_frag_key key;

	bh_frag_key_of(pkt, &key);
	struct bh_frag_value *first = bpf_map_lookup_elem(&bh_frag, &key);

	if (!first || first->expires_ns < bpf_ktime_get_ns())
		return 0;
	if (first->generation == view->generation)
		return 1;

	/* judge the head again in this packet's place (the stack has no room for a
	 * copy): its ports in, then back */
	struct bh_point point = { .ingress = first->ingress, .local_is_src = !first->ingress };
	struct bh_decision d = {};
	__u16 sport = pkt->sport;
	__u8 icmp_kind = pkt->icmp_kind;
	__u32 rule_id; /* a fragment counts as tracked, under no rule */
	int pass = 1;

	pkt->has_port = 1;
	pkt->sport = first->sport;
	pkt->port = first->port;
	pkt->icmp_kind = first->icmp_kind;
	if (bh_ct_lookup(view, pkt, first->ingress, &rule_id, 0) != BH_CT_PASS) {
		bh_decide(view, pkt, &point, &d);
		pass = d.pass;
	}
	pkt->has_port = 0;
	pkt->sport = sport;
	pkt->port = 0;
	pkt->icmp_kind = icmp_kind;
	if (!pass)
		return 0;
	first->generation = view->generation;
	return 1;
}

/* --- the whole verdict --- */

/* Judges a parsed packet at `point`: state first (a fragment of an allowed
 * packet, an error about a tracked flow, a tracked flow), then policy; an
 * allowed packet opens tracking state. */
static __always_inline void bh_judge(const struct bh_gen_view *view, struct bh_pkt *pkt,
				     const struct bh_point *point, struct bh_decision *d)
{
	if (!pkt->has_port && bh_frag_follows(view, pkt)) {
		d->pass = 1;
		d->reason = BH_REASON_TRACKED;
		return;
	}

	int ct = BH_CT_NEW;

	if (pkt->has_inner && bh_ct_related(pkt)) {
		d->pass = 1;
		d->reason = BH_REASON_TRACKED;
	} else if (bh_trackable(pkt)) {
		ct = bh_ct_lookup(view, pkt, point->ingress, &d->rule_id, 1);
		if (ct == BH_CT_PASS) {
			d->pass = 1;
			d->reason = BH_REASON_TRACKED;
		} else if (ct == BH_CT_REVOKED) {
			bh_count(&bh_reason_cnt, BH_REASON_REVOKED, 0);
		} else if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & 0x12) != 0x02) {
			/* anything but a SYN opens nothing: a flow we do not know */
			bh_count(&bh_reason_cnt, BH_REASON_CT_MISS, 0);
		}
	}

	if (!d->pass) {
		bh_decide(view, pkt, point, d);
		if (d->pass && bh_trackable(pkt) &&
		    pkt->icmp_kind != BH_ICMP_ECHO_REPLY)
			bh_ct_open(view, pkt, point, d);
	}
	/* a first fragment that passed, for whatever reason, lets its train follow */
	if (d->pass && pkt->frag_first)
		bh_frag_remember(view, pkt, point->ingress);
}

static __always_inline void bh_account(const struct bh_decision *d, __u64 bytes)
{
	bh_count(&bh_reason_cnt, d->reason, bytes);
	if (d->rule_id != BH_RULE_ID_NONE)
		bh_count(&bh_rule_cnt, d->rule_id, bytes);
}

/* The registered cgroup nearest to the local process: deepest ancestor
 * first, so a nested cgroup inherits from its closest registered one. Levels
 * past the cgroup's own depth read as 0. From the packet's socket when skb is
 * given, else from the current task (the sock_addr hooks); skb is a constant
 * at every call site, so each program keeps only the helper it may call. */
static __always_inline __u64 bh_nearest_cgroup(const struct bh_gen_view *view,
					       struct __sk_buff *skb)
{
	for (int level = BH_MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		struct bh_cgroup_key key = {
			.cgroup_id = skb ? bpf_skb_ancestor_cgroup_id(skb, level)
					 : bpf_get_current_ancestor_cgroup_id(level),
		};

		if (key.cgroup_id && bpf_map_lookup_elem(view->cgroups, &key))
			return key.cgroup_id;
	}
	return 0;
}

/*
 * Judges and counts a parsed packet in `generation`. A global function: the
 * verifier checks it once, with every field of *pkt unknown, rather than once
 * per path through the parser (VLAN tags times extension headers times
 * fragment shapes), which would multiply its cost many times over.
 */
__noinline int bh_judge_packet(struct bh_pkt *pkt, const struct bh_point *point,
			       __u64 generation, __u64 bytes)
{
	struct bh_decision d = { .rule_id = BH_RULE_ID_NONE };
	struct bh_gen_view view;

	if (!pkt || !point)
		return 0;
	if (!bh_gen_view_of(generation, &view)) {
		d.pass = 1;
		d.reason = BH_REASON_NO_POLICY;
	} else {
		bh_judge(&view, pkt, point, &d);
	}
	bh_account(&d, bytes);
	return d.pass;
}

/* Parses (from Ethernet for XDP, from the network header for cgroup_skb),
 * judges and counts one packet; returns 1 to pass it. */
static __always_inline int bh_verdict_packet(void *data, void *data_end, __u64 bytes,
					     struct __sk_buff *skb, int ingress)
{
	struct bh_pkt pkt = {};
	struct bh_point point = { .ingress = ingress, .local_is_src = !ingress };
	struct bh_decision d = { .rule_id = BH_RULE_ID_NONE };
	int parsed = skb ? bh_parse_l3(data, data_end, skb->len, skb->protocol, &pkt)
			 : bh_parse_eth(data, data_end, &pkt);

	if (parsed == BH_PARSE_MALFORMED || parsed == BH_PARSE_NOT_IP) {
		d.pass = parsed == BH_PARSE_NOT_IP;
		d.reason = d.pass ? BH_REASON_NOT_IP : BH_REASON_MALFORMED;
		bh_account(&d, bytes);
		return d.pass;
	}

	__u64 generation = bh_gen_read();
	struct bh_gen_view view;

	if (skb && bh_gen_view_of(generation, &view))
		point.cgroup_id = bh_nearest_cgroup(&view, skb);
	/* the verifier sees a global function's result as any value */
	return bh_judge_packet(&pkt, &point, generation, bytes) ? 1 : 0;
}

/* connect() and unconnected sendmsg(): judged before any packet exists, at
 * an egress point, with the calling process as the source. A process in no
 * registered cgroup is `host`. Returns 1 to allow the call. */
static __always_inline int bh_verdict_sock_addr(struct bpf_sock_addr *ctx, int v6)
{
	struct bh_pkt pkt = { .has_port = 1 };
	struct bh_decision d = { .rule_id = BH_RULE_ID_NONE };
	struct bh_point point = { .ingress = 0, .local_is_src = 1, .local_is_host = 1 };
	struct bh_gen_view view;

	if (!bh_gen_view_of(bh_gen_read(), &view)) {
		d.pass = 1;
		d.reason = BH_REASON_NO_POLICY;
		bh_account(&d, 0);
		return 1;
	}

	if (v6) {
		__u32 *words = (__u32 *)pkt.dst.bytes;

		/* an IPv4-mapped destination is already its IPv4 address here */
		words[0] = ctx->user_ip6[0];
		words[1] = ctx->user_ip6[1];
		words[2] = ctx->user_ip6[2];
		words[3] = ctx->user_ip6[3];
	} else {
		bh_addr_from_v4(&pkt.dst, ctx->user_ip4);
	}
	pkt.proto = (__u8)ctx->protocol;
	pkt.port = (__u16)ctx->user_port; /* be, in the low 16 bits */
	if (pkt.proto == IPPROTO_ICMP)
		pkt.port = bpf_htons(8 << 8); /* a ping socket: echo request */
	else if (pkt.proto == IPPROTO_ICMPV6)
		pkt.port = bpf_htons(128 << 8);
	point.cgroup_id = bh_nearest_cgroup(&view, NULL);

	bh_decide(&view, &pkt, &point, &d);
	bh_account(&d, 0);
	return d.pass;
}

#endif /* BH_VERDICT_H */
