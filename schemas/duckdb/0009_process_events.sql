-- Processes as the eBPF programs report them: executions (sched_process_exec), and the
-- beginning (fork of a new thread group) and end (exit of its leader) of processes. Columns
-- an event kind does not carry are NULL.
CREATE TABLE process_events (
    ts                  TIMESTAMP NOT NULL,  -- when it happened (UTC)
    kind                UTINYINT  NOT NULL,  -- 1 exec, 2 fork, 3 exit, 0 alive when the
                                             -- programs were attached (read from /proc)
    pid                 UINTEGER  NOT NULL,  -- the process (thread group id)
    tid                 UINTEGER,            -- exec: the thread that called exec
    ppid                UINTEGER,            -- exec, fork: the parent
    uid                 UINTEGER,            -- exec
    comm                VARCHAR   NOT NULL,  -- command name (15 bytes at most)
    filename            VARCHAR,             -- exec: the file executed, as given to exec
    filename_truncated  BOOLEAN,
    argv                VARCHAR[],           -- exec: arguments, argv[0] first (invalid UTF-8 replaced)
    argv_truncated      BOOLEAN,             -- exec: cut at 1024 bytes
    start_ts            TIMESTAMP NOT NULL,  -- when the process started
    cgroup_id           UBIGINT   NOT NULL,  -- cgroup v2 id of the reporting task
    netns               UINTEGER,            -- exec: network namespace inode
    mntns               UINTEGER,            -- exec: mount namespace inode
    wait_status         UINTEGER             -- exit: as wait(2) reports it, (code << 8) | signal
);

-- Where the writer appends process rows (its appender takes no lists): moved into
-- process_events with the arguments parsed, in one transaction at each commit.
CREATE TABLE process_staging (
    ts_us               BIGINT    NOT NULL,
    kind                UTINYINT  NOT NULL,
    pid                 UINTEGER  NOT NULL,
    tid                 UINTEGER,
    ppid                UINTEGER,
    uid                 UINTEGER,
    comm                VARCHAR   NOT NULL,
    filename            VARCHAR,
    filename_truncated  BOOLEAN,
    argv_json           VARCHAR,
    argv_truncated      BOOLEAN,
    start_us            BIGINT    NOT NULL,
    cgroup_id           UBIGINT   NOT NULL,
    netns               UINTEGER,
    mntns               UINTEGER,
    wait_status         UINTEGER
);
