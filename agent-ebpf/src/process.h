/* Events the process programs send to user space. The layout is mirrored by
 * agent/src/ebpf/event.rs, which checks the size and the version before reading. */
#ifndef NATTRAIL_PROCESS_H
#define NATTRAIL_PROCESS_H

#define NT_EVENT_VERSION 1
#define NT_KIND_EXEC 1
#define NT_KIND_FORK 2
#define NT_KIND_EXIT 3

#define NT_COMM_LEN 16
#define NT_FILENAME_LEN 256
#define NT_ARGV_LEN 1024

/* flags */
#define NT_ARGV_TRUNCATED 1
#define NT_FILENAME_TRUNCATED 2

struct nt_exec {
	__u16 version;
	__u16 kind;
	__u32 flags;
	__u32 pid;       /* thread group id: the process */
	__u32 tid;
	__u32 ppid;      /* the real parent's thread group id */
	__u32 uid;
	__u64 ts_boot_ns;    /* when, CLOCK_BOOTTIME */
	__u64 start_boot_ns; /* the process's start, CLOCK_BOOTTIME */
	__u64 cgroup_id;     /* cgroup v2 id */
	__u32 netns;
	__u32 mntns;
	__u32 filename_len;  /* bytes, without the NUL */
	__u32 argv_len;      /* bytes of NUL-separated arguments */
	char comm[NT_COMM_LEN];
	char filename[NT_FILENAME_LEN];
	char argv[NT_ARGV_LEN];
};

_Static_assert(sizeof(struct nt_exec) == 1360, "agent/src/ebpf/event.rs reads 1360 bytes");

/* A process begins (fork of a new thread group) or ends (its leader exits). */
struct nt_life {
	__u16 version;
	__u16 kind;
	__u32 pid;
	__u32 ppid;           /* fork: the parent's thread group id */
	__u32 wait_status;    /* exit: as wait(2) reports it, (code << 8) | signal */
	__u64 ts_boot_ns;
	__u64 start_boot_ns;
	__u64 cgroup_id;
	char comm[NT_COMM_LEN];
};

_Static_assert(sizeof(struct nt_life) == 56, "agent/src/ebpf/event.rs reads 56 bytes");

#endif
