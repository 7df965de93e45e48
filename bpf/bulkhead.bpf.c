// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * bulkhead's BPF programs, one per hook. One object, so every hook shares one
 * set of maps and one verdict function (bh_verdict.h); each entry only says
 * where the packet is and which end is local.
 */
#include "bh_verdict.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* XDP is an ingress point: the destination's ingress mode applies. */
SEC("xdp")
int bh_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	return bh_verdict_packet(data, data_end, data_end - data, NULL, 1) ? XDP_PASS : XDP_DROP;
}

/* A program that does nothing, the baseline of the per-packet benchmarks. */
SEC("xdp")
int bh_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* Packets to the sockets of a cgroup: the local process is the destination. */
SEC("cgroup_skb/ingress")
int bh_cg_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	return bh_verdict_packet(data, data_end, skb->len, skb, 1);
}

/* Packets from the sockets of a cgroup: the local process is the source. */
SEC("cgroup_skb/egress")
int bh_cg_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	return bh_verdict_packet(data, data_end, skb->len, skb, 0);
}

/* A denied connect() or unconnected send fails with EPERM at once, instead
 * of a silent drop the application would time out on. */
SEC("cgroup/connect4")
int bh_connect4(struct bpf_sock_addr *ctx)
{
	return bh_verdict_sock_addr(ctx, 0);
}

SEC("cgroup/connect6")
int bh_connect6(struct bpf_sock_addr *ctx)
{
	return bh_verdict_sock_addr(ctx, 1);
}

SEC("cgroup/sendmsg4")
int bh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return bh_verdict_sock_addr(ctx, 0);
}

SEC("cgroup/sendmsg6")
int bh_sendmsg6(struct bpf_sock_addr *ctx)
{
	return bh_verdict_sock_addr(ctx, 1);
}
