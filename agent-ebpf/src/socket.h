/* What the socket programs send to user space: one record per socket and destination, with
 * the first packet's real addresses and ports and the socket's owner. The layout is mirrored
 * by agent/src/ebpf/event.rs, which checks the size and the version before reading. */
#ifndef NATTRAIL_SOCKET_H
#define NATTRAIL_SOCKET_H

#define NT_SOCKET_VERSION 1
#define NT_KIND_SOCKET 4
#define NT_SOCK_COMM_LEN 16

/* flags */
#define NT_OWNER_KNOWN 1 /* always set by this version: the programs report owned sockets only */

struct nt_socket {
	__u16 version;
	__u16 kind;
	__u8 family;          /* 4 or 6 */
	__u8 proto;           /* IPPROTO_TCP or IPPROTO_UDP */
	__u16 sport;          /* host order */
	__u16 dport;          /* host order */
	__u16 flags;
	__u32 pid;            /* owner's thread group id; 0 when unknown */
	__u32 tid;
	__u32 uid;
	__u32 netns;          /* owner's network namespace inode */
	__u32 pad;
	__u64 ts_boot_ns;     /* the packet, CLOCK_BOOTTIME */
	__u64 start_boot_ns;  /* owner's process start, CLOCK_BOOTTIME */
	__u64 cgroup_id;      /* owner's cgroup v2 id (the socket's when the owner is unknown) */
	__u64 cookie;         /* the socket's cookie */
	__u8 saddr[16];       /* IPv4: the first 4 bytes */
	__u8 daddr[16];
	char comm[NT_SOCK_COMM_LEN];
};

_Static_assert(sizeof(struct nt_socket) == 112, "agent/src/ebpf/event.rs reads 112 bytes");

#endif
