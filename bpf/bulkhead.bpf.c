// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * bulkhead's BPF programs. One object, so every hook shares one set of maps
 * and one verdict function.
 */
#include "bh_verdict.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* XDP is an ingress point: the destination's ingress mode applies. */
SEC("xdp")
int bh_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	return bh_verdict_frame(data, data_end, 1) ? XDP_PASS : XDP_DROP;
}

/* A program that does nothing, the baseline of the per-packet benchmarks. */
SEC("xdp")
int bh_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
