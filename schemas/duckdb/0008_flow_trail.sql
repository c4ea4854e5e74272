-- nattrail schema version 8: one row per finished flow, partitioned by hour, instead of one
-- row per conntrack event. Why, with the measurements: docs/DESIGN-trail.md.
--
-- A flow is stored as "slices", one per hour it was alive in: a final slice in the hour its
-- end falls in, with everything known of it, and an interim slice (no end, no counters) in
-- every earlier hour whose end it outlived, written when that hour ends (as IPFIX's active
-- timeout does). A lookup at T therefore reads only the hours around T. Flows still open are
-- in open_flows (checkpoint) and open_journal (opened since). Times are milliseconds since
-- the epoch: starts rounded down, ends rounded up, so a stored interval holds the true one.

-- Slices of hours not sealed yet, in order of writing.
CREATE TABLE trail_recent (
    hour        INTEGER   NOT NULL,  -- partition: hours since the epoch
    flags       UTINYINT  NOT NULL,  -- 1 final (else interim), 2 found by dump, 4 end inexact,
                                     -- 16 start not seen (NEW lost; start from the end event)
    proto       UTINYINT  NOT NULL,
    zone        USMALLINT NOT NULL,
    pub4        UINTEGER,            -- public address after source NAT (reply destination)
    pub6        UHUGEINT,            --   IPv4 in pub4, IPv6 in pub6, the other NULL
    pub_port    USMALLINT NOT NULL,  -- public port (reply destination port, ICMP id)
    src4        UINTEGER,            -- internal client (original source)
    src6        UHUGEINT,
    src_port    USMALLINT NOT NULL,
    dst4        UINTEGER,            -- destination as the client sees it
    dst6        UHUGEINT,
    dst_port    USMALLINT NOT NULL,
    dnat4       UINTEGER,            -- reply source where it differs (destination NAT)
    dnat6       UHUGEINT,
    dnat_port   USMALLINT,
    start_ms    BIGINT,              -- NULL: the trail never saw the flow start
    end_ms      BIGINT,              -- final slices: the end; interim: NULL (alive past the hour)
    end_lo_ms   BIGINT,              -- inexact ends: alive until at least here
    packets_out UBIGINT,
    bytes_out   UBIGINT,
    packets_in  UBIGINT,
    bytes_in    UBIGINT,
    ct_id       UINTEGER,            -- conntrack id (not kept once sealed)
    seq         UBIGINT              -- writer's order, for recovery (not kept once sealed)
);

-- Sealed hours: sorted by public address and port, so a lookup reads one row group an hour.
-- The destination (address and port) is an index into the hour's dictionary.
CREATE TABLE flow_sealed (
    hour        INTEGER   NOT NULL,
    flags       UTINYINT  NOT NULL,
    proto       UTINYINT  NOT NULL,
    zone        USMALLINT NOT NULL,
    pub4        UINTEGER,
    pub6        UHUGEINT,
    pub_port    USMALLINT NOT NULL,
    src4        UINTEGER,
    src6        UHUGEINT,
    src_port    USMALLINT NOT NULL,
    dst_id      UINTEGER  NOT NULL,  -- trail_dst.id of this hour
    dnat4       UINTEGER,
    dnat6       UHUGEINT,
    dnat_port   USMALLINT,
    start_ms    BIGINT,
    end_ms      BIGINT,
    end_lo_ms   BIGINT,
    packets_out UBIGINT,
    bytes_out   UBIGINT,
    packets_in  UBIGINT,
    bytes_in    UBIGINT
);

-- Each sealed hour's destinations, sorted by address and port.
CREATE TABLE trail_dst (
    hour     INTEGER   NOT NULL,
    id       UINTEGER  NOT NULL,
    dst4     UINTEGER,
    dst6     UHUGEINT,
    dst_port USMALLINT NOT NULL
);

-- Sealed slices in the layout of trail_recent.
CREATE VIEW flow_trail AS
SELECT s.hour, s.flags, s.proto, s.zone, s.pub4, s.pub6, s.pub_port, s.src4, s.src6, s.src_port,
       d.dst4, d.dst6, d.dst_port, s.dnat4, s.dnat6, s.dnat_port, s.start_ms, s.end_ms,
       s.end_lo_ms, s.packets_out, s.bytes_out, s.packets_in, s.bytes_in,
       NULL::UINTEGER AS ct_id, NULL::UBIGINT AS seq
FROM flow_sealed s JOIN trail_dst d ON d.hour = s.hour AND d.id = s.dst_id;

-- An open flow's conntrack mark and status bits are not kept: nothing reads them back, and
-- the writer holds every open flow in memory (at most 64 B each).
ALTER TABLE open_flows DROP COLUMN mark;
ALTER TABLE open_flows DROP COLUMN status;

-- Flows opened since the open-flow checkpoint (the checkpoint removes what it covers).
CREATE TABLE open_journal AS SELECT *, 0::UBIGINT AS seq, false AS by_dump FROM open_flows LIMIT 0;
ALTER TABLE open_flows ADD COLUMN by_dump BOOLEAN DEFAULT false;
DROP TABLE open_flows_staging;
CREATE TABLE open_flows_staging AS SELECT * FROM open_flows LIMIT 0;

-- The trail's partitions: the newest sealed hour, and where retention has cut it.
CREATE TABLE trail_state (
    sealed_hour   INTEGER,           -- hours up to this one are in flow_trail
    retained_from BIGINT             -- ms since the epoch: older hours were removed
);
INSERT INTO trail_state VALUES (NULL, NULL);

CREATE MACRO nt_v4(a) AS CASE WHEN (a >> 32) = 65535 THEN (a & 4294967295)::UINTEGER END;
CREATE MACRO nt_v6(a) AS CASE WHEN (a >> 32) <> 65535 THEN a END;
CREATE MACRO nt_addr(a4, a6) AS coalesce(a6, a4::UHUGEINT | 281470681743360::UHUGEINT);

-- MOVE THE EVENTS HERE

DROP VIEW flows;
DROP TABLE conntrack_events;

-- Open flows in the slice layout: the checkpoint and the journal.
CREATE VIEW open_slices AS
SELECT NULL::INTEGER AS hour, (8 | CASE WHEN by_dump THEN 2 ELSE 0 END)::UTINYINT AS flags,
       proto, zone, nt_v4(reply_dst) AS pub4, nt_v6(reply_dst) AS pub6, reply_dport AS pub_port,
       nt_v4(orig_src) AS src4, nt_v6(orig_src) AS src6, orig_sport AS src_port,
       nt_v4(orig_dst) AS dst4, nt_v6(orig_dst) AS dst6, orig_dport AS dst_port,
       CASE WHEN reply_src <> orig_dst OR (proto NOT IN (1, 58) AND reply_sport <> orig_dport) THEN nt_v4(reply_src) END AS dnat4,
       CASE WHEN reply_src <> orig_dst OR (proto NOT IN (1, 58) AND reply_sport <> orig_dport) THEN nt_v6(reply_src) END AS dnat6,
       CASE WHEN reply_src <> orig_dst OR (proto NOT IN (1, 58) AND reply_sport <> orig_dport) THEN reply_sport END AS dnat_port,
       start_us // 1000 AS start_ms, NULL::BIGINT AS end_ms, NULL::BIGINT AS end_lo_ms,
       NULL::UBIGINT AS packets_out, NULL::UBIGINT AS bytes_out,
       NULL::UBIGINT AS packets_in, NULL::UBIGINT AS bytes_in, ct_id, seq
FROM (SELECT * FROM open_journal UNION ALL BY NAME SELECT * FROM open_flows);

-- One row per flow: its final slice, or while open its open record, else its newest interim
-- slice (flags: 1 final, 2 found by dump, 4 end inexact, 8 open, 16 start not seen).
CREATE VIEW flows AS
SELECT make_timestamp(start_ms * 1000) AS start,
       make_timestamp(CASE WHEN flags & 1 = 1 THEN end_ms END * 1000) AS "end",
       flags & 4 = 4 AS end_inexact, make_timestamp(end_lo_ms * 1000) AS end_lo,
       flags & 2 = 2 AS found_by_dump, flags & 8 = 8 AS open, nt_proto(proto) AS proto,
       nt_ip(nt_addr(src4, src6)) AS internal_ip, src_port AS internal_port,
       nt_ip(nt_addr(pub4, pub6)) AS public_ip, pub_port AS public_port,
       nt_ip(nt_addr(dst4, dst6)) AS dst_ip, dst_port,
       bytes_out, packets_out, bytes_in, packets_in, ct_id, zone,
       CASE WHEN src6 IS NULL THEN 4 ELSE 6 END AS family,
       nt_addr(src4, src6) AS orig_src, nt_addr(pub4, pub6) AS reply_dst,
       nt_addr(dst4, dst6) AS orig_dst, proto AS proto_num, start_ms, end_ms
FROM (SELECT * FROM flow_trail UNION ALL SELECT * FROM trail_recent UNION ALL SELECT * FROM open_slices)
QUALIFY row_number() OVER (
    PARTITION BY proto, zone, src4, src6, src_port, dst4, dst6, dst_port, coalesce(start_ms, -end_ms)
    ORDER BY flags & 1 DESC, flags & 8 DESC, flags & 4, hour DESC) = 1;

-- The conntrack events a flow stands for, rebuilt from its row for older queries: a start
-- (1 new, 3 found by dump) where the trail saw it (not where only the end was seen), an end (2 destroy) once it ended. seq is
-- the rank in time order, not the order of receipt (which is no longer stored).
CREATE VIEW conntrack_events AS
WITH f AS (
    SELECT * FROM (SELECT * FROM flow_trail UNION ALL SELECT * FROM trail_recent UNION ALL SELECT * FROM open_slices)
    QUALIFY row_number() OVER (
        PARTITION BY proto, zone, src4, src6, src_port, dst4, dst6, dst_port, coalesce(start_ms, -end_ms)
        ORDER BY flags & 1 DESC, flags & 8 DESC, flags & 4, hour DESC) = 1),
e AS (
    SELECT start_ms AS t, CASE WHEN flags & 2 = 2 THEN 3 ELSE 1 END AS kind, * EXCLUDE (seq)
    FROM f WHERE start_ms IS NOT NULL AND flags & 16 = 0
    UNION ALL
    SELECT end_ms, 2, * EXCLUDE (seq) FROM f WHERE flags & 1 = 1)
SELECT (row_number() OVER (ORDER BY t, kind, proto, zone, nt_addr(src4, src6), src_port,
                                  nt_addr(dst4, dst6), dst_port, nt_addr(pub4, pub6), pub_port) - 1)::UBIGINT AS seq,
       make_timestamp(t * 1000) AS ts, 0::UTINYINT AS ts_source, kind::UTINYINT AS kind,
       CASE WHEN src6 IS NULL THEN 4 ELSE 6 END::UTINYINT AS family, proto, zone, ct_id,
       nt_addr(src4, src6) AS orig_src, nt_addr(dst4, dst6) AS orig_dst,
       src_port AS orig_sport, dst_port AS orig_dport,
       coalesce(nt_addr(dnat4, dnat6), nt_addr(dst4, dst6)) AS reply_src,
       nt_addr(pub4, pub6) AS reply_dst, coalesce(dnat_port, dst_port) AS reply_sport,
       pub_port AS reply_dport, make_timestamp(start_ms * 1000) AS start_ts,
       make_timestamp(CASE WHEN kind = 2 AND flags & 4 = 0 THEN end_ms END * 1000) AS stop_ts,
       make_timestamp(CASE WHEN kind = 2 THEN end_lo_ms END * 1000) AS end_lo,
       kind = 2 AND flags & 4 = 4 AS inexact,
       CASE WHEN kind = 2 THEN packets_out END AS orig_packets,
       CASE WHEN kind = 2 THEN bytes_out END AS orig_bytes,
       CASE WHEN kind = 2 THEN packets_in END AS reply_packets,
       CASE WHEN kind = 2 THEN bytes_in END AS reply_bytes
FROM e;
