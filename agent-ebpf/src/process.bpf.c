// SPDX-License-Identifier: GPL-2.0
/* Processes: executions, forks and exits, from the sched_process_* raw tracepoints (no
 * tracefs needed to attach). Each becomes one ring-buffer record; a record that finds the
 * ring full is counted in process_lost, which user space turns into a capture gap. GPL: the
 * helpers that read kernel and user memory require it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "kernel_types.h"
#include <bpf/bpf_core_read.h>
#include "process.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} process_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} process_lost SEC(".maps");

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&process_lost, &zero);
	if (lost)
		*lost += 1;
}

static __always_inline void life(struct task_struct *task, __u16 kind, __u32 ppid, __u32 wait_status)
{
	struct nt_life *e = bpf_ringbuf_reserve(&process_events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return;
	}
	e->version = NT_EVENT_VERSION;
	e->kind = kind;
	e->pid = BPF_CORE_READ(task, tgid);
	e->ppid = ppid;
	e->wait_status = wait_status;
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->start_boot_ns = BPF_CORE_READ(task, start_boottime);
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), task->comm);
	bpf_ringbuf_submit(e, 0);
}

/* sched_process_fork(struct task_struct *parent, struct task_struct *child): new thread
 * groups only, not threads. */
SEC("raw_tracepoint/sched_process_fork")
int nattrail_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx->args[0];
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0;
	life(child, NT_KIND_FORK, BPF_CORE_READ(parent, tgid), 0);
	return 0;
}

/* sched_process_exit(struct task_struct *p, ...): the thread group's leader only. */
SEC("raw_tracepoint/sched_process_exit")
int nattrail_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task = (struct task_struct *)ctx->args[0];
	if (BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid))
		return 0;
	life(task, NT_KIND_EXIT, 0, BPF_CORE_READ(task, exit_code));
	return 0;
}

/* sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
SEC("raw_tracepoint/sched_process_exec")
int nattrail_exec(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task = (struct task_struct *)ctx->args[0];
	struct linux_binprm *bprm = (struct linux_binprm *)ctx->args[2];
	struct nt_exec *e = bpf_ringbuf_reserve(&process_events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return 0;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->version = NT_EVENT_VERSION;
	e->kind = NT_KIND_EXEC;
	e->flags = 0;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = BPF_CORE_READ(task, cred, uid.val);
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->start_boot_ns = BPF_CORE_READ(task, start_boottime);
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	e->mntns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	const char *filename = BPF_CORE_READ(bprm, filename);
	long n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename);
	e->filename_len = n > 0 ? n - 1 : 0;
	if (n == sizeof(e->filename))
		e->flags |= NT_FILENAME_TRUNCATED;

	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(task, mm, arg_end);
	unsigned long len = arg_end > arg_start ? arg_end - arg_start : 0;
	if (len > NT_ARGV_LEN) {
		len = NT_ARGV_LEN;
		e->flags |= NT_ARGV_TRUNCATED;
	}
	e->argv_len = 0;
	if (len > 0 && bpf_probe_read_user(e->argv, len, (void *)arg_start) == 0)
		e->argv_len = len;
	bpf_ringbuf_submit(e, 0);
	return 0;
}
