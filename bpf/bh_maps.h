/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Every map of bulkhead, declared once. Userspace pins them under the pin
 * directory as bh_<name>_v<BH_ABI_VERSION>.
 *
 * Per-generation state (IP cache, policy, generation config) lives in
 * ARRAY_OF_MAPS outer maps with one slot per generation. A packet reads
 * bh_gen_ctl once and uses slot (generation & 1) of every outer map, so all
 * its lookups see one generation. The inner maps are created by userspace
 * (with the sizes the user chose) and put into the slots; the inner
 * definitions here are only templates that give the kernel their type; hash
 * and LPM inner maps may differ from their template in max_entries.
 */
#ifndef BH_MAPS_H
#define BH_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "shared/bulkhead_abi.h"

/* See struct bh_btf_anchor in the shared header. */
const volatile struct bh_btf_anchor bh_btf_anchor __attribute__((used));

/* Sizes of the maps the object itself creates; userspace may override the
 * rule counter size before load. */
#define BH_DEFAULT_MAX_RULES 16384
#define BH_DEFAULT_MAX_CT 262144
#define BH_DEFAULT_MAX_FRAGS 16384

/* Exact addresses: a hash, whose lookup cost does not grow with its size. */
struct bh_inner_ipc_host {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct bh_ipcache_host_key);
	__type(value, struct bh_identity_info);
};

/* Real prefixes: an LPM trie, longest prefix wins. */
struct bh_inner_ipc_lpm {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct bh_ipcache_lpm_key);
	__type(value, struct bh_identity_info);
};

/* Compiled policy; see struct bh_policy_key for why it is an LPM trie. */
struct bh_inner_policy {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct bh_policy_key);
	__type(value, struct bh_policy_value);
};

/* Registered cgroups: the identity of local processes. */
struct bh_inner_cgroups {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct bh_cgroup_key);
	__type(value, struct bh_identity_info);
};

/* Failsafe ports by management prefix; value 1 opens, 0 closes (see the
 * compiler: it keeps IPv4 out of IPv6 prefixes such as ::/0). */
struct bh_inner_failsafe {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct bh_failsafe_key);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, BH_GENERATION_SLOTS);
	__type(key, __u32);
	__array(values, struct bh_inner_ipc_host);
} bh_ipc_host SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, BH_GENERATION_SLOTS);
	__type(key, __u32);
	__array(values, struct bh_inner_cgroups);
} bh_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, BH_GENERATION_SLOTS);
	__type(key, __u32);
	__array(values, struct bh_inner_failsafe);
} bh_failsafe SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, BH_GENERATION_SLOTS);
	__type(key, __u32);
	__array(values, struct bh_inner_ipc_lpm);
} bh_ipc_lpm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, BH_GENERATION_SLOTS);
	__type(key, __u32);
	__array(values, struct bh_inner_policy);
} bh_policy SEC(".maps");

/* The generation in force, and the last one known quiesced (struct bh_gen_ctl). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct bh_gen_ctl);
} bh_gen_ctl SEC(".maps");

/* Per-generation settings, indexed by slot. A plain array is enough: a slot
 * is only written while no packet can read it (see the commit protocol). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BH_GENERATION_SLOTS);
	__type(key, __u32);
	__type(value, struct bh_gen_config);
} bh_gen_cfg SEC(".maps");

/* Packets and bytes per verdict reason (enum bh_reason). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BH_REASON_MAX);
	__type(key, __u32);
	__type(value, struct bh_counter);
} bh_reason_cnt SEC(".maps");

/* Packets and bytes per deciding rule, indexed by rule id. Rule ids are
 * stable across commits, so a rule's counters survive policy changes. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BH_DEFAULT_MAX_RULES);
	__type(key, __u32);
	__type(value, struct bh_counter);
} bh_rule_cnt SEC(".maps");

/* Connection tracking. LRU: under pressure the least recently used flow is
 * forgotten rather than a new flow refused; a forgotten flow's next reply is
 * counted as BH_REASON_CT_MISS. Not per generation: entries carry the
 * generation that allowed them and are re-checked when it is not current. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BH_DEFAULT_MAX_CT);
	__type(key, struct bh_ct_key);
	__type(value, struct bh_ct_value);
} bh_ct SEC(".maps");

/* First fragments allowed, for the fragments that follow them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BH_DEFAULT_MAX_FRAGS);
	__type(key, struct bh_frag_key);
	__type(value, struct bh_frag_value);
} bh_frag SEC(".maps");

/* Userspace-only: the bookkeeping of each generation (struct bh_meta_value).
 * Allocated on demand; the limit allows a 256 MiB blob. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct bh_meta_key);
	__type(value, struct bh_meta_value);
} bh_meta SEC(".maps");

#endif /* BH_MAPS_H */
