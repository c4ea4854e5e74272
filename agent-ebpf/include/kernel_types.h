/* The few kernel types the programs read, declared for CO-RE: fields are found by name in
 * the running kernel's BTF when the object is loaded, so neither layout nor size here has
 * to match any kernel. Written by hand rather than a generated vmlinux.h (megabytes, tied
 * to the build machine's kernel) so that the build needs no BTF and no bpftool. */
#ifndef NATTRAIL_KERNEL_TYPES_H
#define NATTRAIL_KERNEL_TYPES_H

/* The UAPI types (__u32, struct bpf_sock_addr, ...) come from <linux/bpf.h>, which every
 * program includes first. */

#define CORE __attribute__((preserve_access_index))

struct ns_common {
	unsigned int inum;
} CORE;

struct net {
	struct ns_common ns;
} CORE;

struct mnt_namespace {
	struct ns_common ns;
} CORE;

struct nsproxy {
	struct mnt_namespace *mnt_ns;
	struct net *net_ns;
} CORE;

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
} CORE;

typedef struct {
	__u32 val;
} kuid_t;

struct cred {
	kuid_t uid;
} CORE;

struct task_struct {
	int pid;
	int tgid;
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	const struct cred *cred;
	struct mm_struct *mm;
	struct nsproxy *nsproxy;
	__u64 start_boottime;
	int exit_code;
	char comm[16];
} CORE;

struct linux_binprm {
	const char *filename;
} CORE;

#endif
