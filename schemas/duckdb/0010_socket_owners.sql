-- Sockets as the eBPF socket programs report them: the first packet of a socket to each
-- destination, with its real addresses and ports (in the socket's network namespace) and
-- the process that owned the socket. A NAT flow is attributed by joining its original tuple
-- to these rows within a few seconds of its start. Addresses are 128-bit, IPv4 as
-- ::ffff:a.b.c.d, as the flow views give them.
CREATE TABLE socket_events (
    ts           TIMESTAMP NOT NULL,  -- when the packet left (UTC)
    proto        UTINYINT  NOT NULL,  -- 6 TCP, 17 UDP
    src          UHUGEINT  NOT NULL,
    src_port     USMALLINT NOT NULL,
    dst          UHUGEINT  NOT NULL,
    dst_port     USMALLINT NOT NULL,
    owner_known  BOOLEAN   NOT NULL,  -- false: no socket(), connect() or sendmsg() was seen
    pid          UINTEGER,            -- the owner (thread group id)
    tid          UINTEGER,
    uid          UINTEGER,
    comm         VARCHAR,
    start_ts     TIMESTAMP,           -- when the owner process started
    netns        UINTEGER,            -- the owner's network namespace inode
    cgroup_id    UBIGINT   NOT NULL,  -- the owner's cgroup v2 id (the socket's when unknown)
    cookie       UBIGINT   NOT NULL   -- the kernel's socket cookie
);

-- Each run of a container, as Docker describes it. Docker hands a stopped container's
-- address to the next one at once, so sockets are attributed by cgroup (or network
-- namespace) within the interval a run lasted, never by address.
CREATE TABLE containers (
    id         VARCHAR   NOT NULL,
    started    TIMESTAMP NOT NULL,
    ended      TIMESTAMP,
    name       VARCHAR   NOT NULL,
    image      VARCHAR   NOT NULL,
    workload   VARCHAR   NOT NULL,
    cgroup_id  UBIGINT,             -- where its tasks have a cgroup of their own in cgroup v2
    netns      UINTEGER,            -- its network namespace inode
    addresses  VARCHAR[],
    PRIMARY KEY (id, started)
);

-- When the socket programs were attached, per capture session. A flow that started while
-- they ran (and outside any `ebpf` gap) and matches no socket row had no owner on this host:
-- forwarded traffic, expected on a gateway. Before, its owner is unknown.
CREATE TABLE ebpf_coverage (
    session_id    UBIGINT   NOT NULL,  -- capture_sessions.id
    sockets_from  TIMESTAMP NOT NULL
);
