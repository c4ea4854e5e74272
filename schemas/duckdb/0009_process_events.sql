-- Process executions reported by the eBPF exec program (sched_process_exec).
CREATE TABLE process_events (
    ts                  TIMESTAMP NOT NULL,  -- when the exec happened (UTC)
    kind                UTINYINT  NOT NULL,  -- 1 exec
    pid                 UINTEGER  NOT NULL,  -- the process (thread group id)
    tid                 UINTEGER  NOT NULL,  -- the thread that called exec
    ppid                UINTEGER  NOT NULL,  -- its real parent
    uid                 UINTEGER  NOT NULL,
    comm                VARCHAR   NOT NULL,  -- command name after the exec (15 bytes at most)
    filename            VARCHAR   NOT NULL,  -- the file executed, as given to exec
    filename_truncated  BOOLEAN   NOT NULL,
    argv                VARCHAR[] NOT NULL,  -- arguments, argv[0] first (invalid UTF-8 replaced)
    argv_truncated      BOOLEAN   NOT NULL,  -- cut at 1024 bytes
    start_ts            TIMESTAMP NOT NULL,  -- when the process started
    cgroup_id           UBIGINT   NOT NULL,  -- cgroup v2 id
    netns               UINTEGER  NOT NULL,  -- network namespace inode
    mntns               UINTEGER  NOT NULL   -- mount namespace inode
);
