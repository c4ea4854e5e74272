//! Process executions as they cross from the eBPF source to the writer.

/// A process's beginning or end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeKind {
    /// A new thread group (fork, vfork, clone without CLONE_THREAD).
    Fork,
    /// The thread group's leader exited.
    Exit,
}

/// A fork or an exit, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessLife {
    /// Fork or exit.
    pub kind: LifeKind,
    /// When, ns since the epoch.
    pub ts_ns: u64,
    /// The process.
    pub pid: u32,
    /// Fork: the parent's process id.
    pub ppid: Option<u32>,
    /// Exit: the status as wait(2) reports it, `(code << 8) | signal`.
    pub wait_status: Option<u32>,
    /// When the process started, ns since the epoch.
    pub start_ns: u64,
    /// cgroup v2 id of the reporting task.
    pub cgroup_id: u64,
    /// Command name.
    pub comm: String,
}

/// One process execution (exec) as the kernel reported it, or a process found alive in /proc
/// when the programs were attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExec {
    /// Read from /proc at start rather than reported by the exec program.
    pub snapshot: bool,
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

/// A socket's first packet to one destination, with the socket's owner, as the socket
/// programs reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEvent {
    /// When the packet left, ns since the epoch.
    pub ts_ns: u64,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// Source address and port as the packet carried them (the socket's network namespace).
    pub src: std::net::SocketAddr,
    /// Destination address and port.
    pub dst: std::net::SocketAddr,
    /// The owner, when a socket(), connect() or sendmsg() of this socket was seen.
    pub owner: Option<SocketOwner>,
    /// The owner's cgroup v2 id; the socket's own when the owner is unknown.
    pub cgroup_id: u64,
    /// The kernel's socket cookie.
    pub cookie: u64,
}

/// The process that owned a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOwner {
    /// Process (thread group id).
    pub pid: u32,
    /// The thread that called connect or sendmsg.
    pub tid: u32,
    /// Real user id.
    pub uid: u32,
    /// Command name.
    pub comm: String,
    /// When the process started, ns since the epoch.
    pub start_ns: u64,
    /// Its network namespace inode.
    pub netns: u32,
}
