/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The verdict function every hook shares, so a rule means the same at every
 * enforcement point: identity lookup, policy lookup, decision, counting.
 */
#ifndef BH_VERDICT_H
#define BH_VERDICT_H

#include "bh_maps.h"
#include "bh_parse.h"

/* The maps of one generation, looked up once per packet. */
struct bh_gen_view {
	void *ipc_host;
	void *ipc_lpm;
	void *policy;
	struct bh_gen_config *cfg;
};

struct bh_decision {
	__u32 rule_id;   /* BH_RULE_ID_NONE when no rule decided */
	__u32 src_id;
	__u32 dst_id;
	__u8 reason;     /* enum bh_reason */
	__u8 pass;       /* 1: let it through */
	__u8 pad[2];
};

/* Reads the generation in force. Returns 0 when none is committed yet. */
static __always_inline int bh_gen_current(struct bh_gen_view *view)
{
	__u32 zero = 0;
	struct bh_gen_ctl *ctl = bpf_map_lookup_elem(&bh_gen_ctl, &zero);

	if (!ctl)
		return 0;

	/* one read: every lookup below uses the same slot */
	__u64 generation = *(volatile __u64 *)&ctl->generation;
	__u32 slot = (__u32)(generation & 1);

	if (generation == 0)
		return 0;
	view->ipc_host = bpf_map_lookup_elem(&bh_ipc_host, &slot);
	view->ipc_lpm = bpf_map_lookup_elem(&bh_ipc_lpm, &slot);
	view->policy = bpf_map_lookup_elem(&bh_policy, &slot);
	view->cfg = bpf_map_lookup_elem(&bh_gen_cfg, &slot);
	return view->ipc_host && view->ipc_lpm && view->policy && view->cfg;
}

/* Address to identity: exact host entries first (a hash, constant cost), then
 * the prefix trie. A host entry is always the longest prefix, so a hit in the
 * hash is final. No entry: the address is world. */
static __always_inline void bh_identity_of(const struct bh_gen_view *view,
					   const struct bh_addr *addr,
					   struct bh_identity_info *out)
{
	struct bh_identity_info *info = bpf_map_lookup_elem(view->ipc_host, addr); /* bh_ipcache_host_key is a bh_addr */

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
}

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

static __always_inline void bh_count(void *map, __u32 index, __u64 bytes)
{
	struct bh_counter *counter = bpf_map_lookup_elem(map, &index);

	if (counter) {
		counter->packets++;
		counter->bytes += bytes;
	}
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
				      int ingress, struct bh_decision *d)
{
	struct bh_identity_info src, dst;

	bh_identity_of(view, &pkt->src, &src);
	bh_identity_of(view, &pkt->dst, &dst);
	d->src_id = src.id;
	d->dst_id = dst.id;
	d->rule_id = BH_RULE_ID_NONE;

	struct bh_policy_value *rule = bh_policy_lookup(view, src.id, dst.id, pkt);
	__u8 mode = ingress ? dst.ingress_mode : src.egress_mode;

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

/* Parses, decides and counts one frame; returns 1 to pass it. */
static __always_inline int bh_verdict_frame(void *data, void *data_end, int ingress)
{
	struct bh_pkt pkt = {};
	struct bh_decision d = { .rule_id = BH_RULE_ID_NONE };
	struct bh_gen_view view;
	__u64 bytes = data_end - data;
	int parsed = bh_parse_eth(data, data_end, &pkt);

	if (parsed == BH_PARSE_MALFORMED) {
		d.reason = BH_REASON_MALFORMED;
	} else if (parsed == BH_PARSE_NOT_IP) {
		d.pass = 1;
		d.reason = BH_REASON_NOT_IP;
	} else if (!bh_gen_current(&view)) {
		d.pass = 1;
		d.reason = BH_REASON_NO_POLICY;
	} else {
		bh_decide(&view, &pkt, ingress, &d);
	}

	bh_count(&bh_reason_cnt, d.reason, bytes);
	if (d.rule_id != BH_RULE_ID_NONE)
		bh_count(&bh_rule_cnt, d.rule_id, bytes);
	return d.pass;
}

#endif /* BH_VERDICT_H */
