// SPDX-License-Identifier: GPL-2.0
/* Sockets: who owns each, and the real addresses of its first packet to each destination.
 *
 * The owner (process, uid, cgroup, network namespace) is taken where the kernel runs in the
 * owner's context: socket() (cgroup/sock_create), connect() and sendmsg() (cgroup/connect4|6,
 * cgroup/sendmsg4|6), and kept in the socket's own storage. The addresses are taken at
 * cgroup_skb/egress, attached at the cgroup-v2 root so every socket of the host and of its
 * containers passes there: at that point TCP, connected UDP and unconnected sendto() all carry
 * their real source port, which connect() does not know yet. One record per socket and
 * destination, for sockets whose owner was seen; a record that finds the ring full is counted
 * in socket_lost. Every program
 * allows the operation: they observe, never filter. GPL: the helpers that read kernel memory
 * require it. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "kernel_types.h"
#include <bpf/bpf_core_read.h>
#include "socket.h"

char LICENSE[] SEC("license") = "GPL";

/* Bytes waiting in the ring before the reader is woken (about 580 records). */
#define WAKE_BYTES (64 << 10)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} socket_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} socket_lost SEC(".maps");

/* Per socket: its owner, and the destination last reported (so each is reported once). */
struct owner {
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 netns;
	__u64 start_boot_ns;
	__u64 cgroup_id;
	char comm[NT_SOCK_COMM_LEN];
	__u8 known;
	__u8 sent_proto;
	__u16 sent_sport;
	__u16 sent_dport;
	__u16 pad;
	__u8 sent_daddr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct owner);
} socket_owners SEC(".maps");

static __always_inline void own(struct bpf_sock *sk)
{
	if (!sk)
		return;
	struct owner *o = bpf_sk_storage_get(&socket_owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	/* The thread that created the socket connects it: its owner is recorded already. */
	if (o->known && o->tid == (__u32)pid_tgid && o->pid == pid_tgid >> 32)
		return;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	o->pid = pid_tgid >> 32;
	o->tid = (__u32)pid_tgid;
	o->uid = (__u32)bpf_get_current_uid_gid();
	o->cgroup_id = bpf_get_current_cgroup_id();
	/* The process's start, as the exec program records it: its leader's. */
	o->start_boot_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	o->netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	o->known = 1;
}

SEC("cgroup/connect4")
int nattrail_connect4(struct bpf_sock_addr *ctx)
{
	own(ctx->sk);
	return 1;
}

SEC("cgroup/connect6")
int nattrail_connect6(struct bpf_sock_addr *ctx)
{
	own(ctx->sk);
	return 1;
}

SEC("cgroup/sendmsg4")
int nattrail_sendmsg4(struct bpf_sock_addr *ctx)
{
	own(ctx->sk);
	return 1;
}

SEC("cgroup/sendmsg6")
int nattrail_sendmsg6(struct bpf_sock_addr *ctx)
{
	own(ctx->sk);
	return 1;
}

SEC("cgroup/sock_create")
int nattrail_sock_create(struct bpf_sock *sk)
{
	own(sk);
	return 1;
}

SEC("cgroup_skb/egress")
int nattrail_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	/* Only sockets whose owner was seen: the kernel's own sockets (a TCP reset, an ICMP
	 * error) have none, and reporting them would let anyone who sends us packets fill the
	 * ring. Sockets opened before the programs were attached have none either. */
	struct owner *o = bpf_sk_storage_get(&socket_owners, sk, 0, 0);
	if (!o || !o->known)
		return 1;
	/* A connected socket whose tuple was reported already: every packet after its first
	 * ends here, without reading the packet. */
	if (o->sent_proto && sk->family == 2 /* AF_INET */ && sk->dst_port &&
	    sk->src_port == o->sent_sport && bpf_ntohs((__u16)sk->dst_port) == o->sent_dport) {
		__u32 d;
		__builtin_memcpy(&d, o->sent_daddr, 4);
		if (d == sk->dst_ip4)
			return 1;
	}
	__u8 family, proto;
	__u8 saddr[16] = {}, daddr[16] = {};
	__u32 ports; /* source then destination, network order */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 1;
		/* Later fragments carry no ports; the first one was reported. */
		if (ip.frag_off & bpf_htons(0x1fff))
			return 1;
		proto = ip.protocol;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return 1;
		if (bpf_skb_load_bytes(skb, ip.ihl * 4, &ports, sizeof(ports)))
			return 1;
		__builtin_memcpy(saddr, &ip.saddr, 4);
		__builtin_memcpy(daddr, &ip.daddr, 4);
		family = 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 1;
		/* Extension headers are not followed: TCP and UDP sockets send none by default. */
		proto = ip6.nexthdr;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return 1;
		if (bpf_skb_load_bytes(skb, sizeof(ip6), &ports, sizeof(ports)))
			return 1;
		__builtin_memcpy(saddr, &ip6.saddr, 16);
		__builtin_memcpy(daddr, &ip6.daddr, 16);
		family = 6;
	} else {
		return 1;
	}
	__u16 sport = bpf_ntohs((__u16)ports), dport = bpf_ntohs((__u16)(ports >> 16));
	/* Compared by hand: the BPF backend turns memcmp into a call it cannot link. */
	__u64 a0, a1, b0, b1;
	__builtin_memcpy(&a0, o->sent_daddr, 8);
	__builtin_memcpy(&a1, o->sent_daddr + 8, 8);
	__builtin_memcpy(&b0, daddr, 8);
	__builtin_memcpy(&b1, daddr + 8, 8);
	if (o->sent_proto == proto && o->sent_sport == sport && o->sent_dport == dport && a0 == b0 &&
	    a1 == b1)
		return 1;
	o->sent_proto = proto;
	o->sent_sport = sport;
	o->sent_dport = dport;
	__builtin_memcpy(o->sent_daddr, daddr, 16);
	struct nt_socket *e = bpf_ringbuf_reserve(&socket_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&socket_lost, &zero);
		if (lost)
			*lost += 1;
		return 1;
	}
	e->version = NT_SOCKET_VERSION;
	e->kind = NT_KIND_SOCKET;
	e->family = family;
	e->proto = proto;
	e->sport = sport;
	e->dport = dport;
	e->pad = 0;
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->cookie = bpf_get_socket_cookie(skb);
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->flags = NT_OWNER_KNOWN;
	e->pid = o->pid;
	e->tid = o->tid;
	e->uid = o->uid;
	e->netns = o->netns;
	e->start_boot_ns = o->start_boot_ns;
	e->cgroup_id = o->cgroup_id;
	__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	/* Wake the reader only once a batch is waiting: a wakeup per record cost a third of
	 * the connect() rate on loopback (cargo xtask bench ebpf). The reader also drains the
	 * ring every WAKE_POLL_MS, so a lone record waits no longer than that. */
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&socket_events, BPF_RB_AVAIL_DATA) >= WAKE_BYTES
				      ? BPF_RB_FORCE_WAKEUP
				      : BPF_RB_NO_WAKEUP);
	return 1;
}
