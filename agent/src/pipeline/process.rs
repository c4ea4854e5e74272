//! Process executions as they cross from the eBPF source to the writer.

/// One process execution (exec), as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExec {
    /// When, ns since the epoch.
    pub ts_ns: u64,
    /// The process (thread group id).
    pub pid: u32,
    /// The thread that called exec.
    pub tid: u32,
    /// The real parent's process id.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Command name after the exec (at most 15 bytes).
    pub comm: String,
    /// The file executed, as given to exec.
    pub filename: String,
    /// Whether `filename` was cut to the record's size.
    pub filename_truncated: bool,
    /// The arguments, argv[0] first.
    pub argv: Vec<String>,
    /// Whether arguments were cut to the record's size.
    pub argv_truncated: bool,
    /// When the process started, ns since the epoch.
    pub start_ns: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Network namespace inode number.
    pub netns: u32,
    /// Mount namespace inode number.
    pub mntns: u32,
}
