-- nattrail schema version 1: the conntrack trail.
-- All times are UTC. Addresses are UHUGEINT: IPv6 as is, IPv4 mapped (::ffff:a.b.c.d),
-- so both families compare and range-scan in one column. nt_ip(x) renders them as text.

CREATE TABLE conntrack_events (
    seq           UBIGINT   NOT NULL,  -- writer-assigned, strictly increasing: order of receipt
    ts            TIMESTAMP NOT NULL,  -- event time (see ts_source)
    ts_source     UTINYINT  NOT NULL,  -- 0 kernel timestamp, 1 receive clock
    kind          UTINYINT  NOT NULL,  -- 1 new, 2 destroy, 3 found by dump
    family        UTINYINT  NOT NULL,  -- 4 or 6
    proto         UTINYINT  NOT NULL,  -- IP protocol number
    zone          USMALLINT NOT NULL,
    ct_id         UINTEGER  NOT NULL,  -- CTA_ID
    mark          UINTEGER  NOT NULL,
    status        UINTEGER  NOT NULL,  -- IPS_* bits
    orig_src      UHUGEINT  NOT NULL,  -- internal client
    orig_dst      UHUGEINT  NOT NULL,  -- destination as the client sees it
    orig_sport    USMALLINT NOT NULL,  -- client port, or ICMP id
    orig_dport    USMALLINT NOT NULL,
    reply_src     UHUGEINT  NOT NULL,
    reply_dst     UHUGEINT  NOT NULL,  -- public address after source NAT
    reply_sport   USMALLINT NOT NULL,
    reply_dport   USMALLINT NOT NULL,  -- public port after source NAT (or ICMP id)
    start_ts      TIMESTAMP,           -- kernel flow start (CTA_TIMESTAMP start)
    stop_ts       TIMESTAMP,           -- kernel flow stop (CTA_TIMESTAMP stop)
    end_lo        TIMESTAMP,           -- for inexact ends: the flow was alive until at least here
    inexact       BOOLEAN   NOT NULL,  -- end time only bounded (closed by reconciliation)
    orig_packets  UBIGINT,
    orig_bytes    UBIGINT,
    reply_packets UBIGINT,
    reply_bytes   UBIGINT,
    tcp_state     UTINYINT,
    icmp_type     UTINYINT,
    icmp_code     UTINYINT
);

-- One row per agent run: the intervals the trail covers.
CREATE TABLE capture_sessions (
    id       UBIGINT   NOT NULL,
    started  TIMESTAMP NOT NULL,
    stopped  TIMESTAMP,            -- NULL while running, or after a crash (see last_seen)
    last_seen TIMESTAMP NOT NULL,  -- advanced at every commit
    hostname VARCHAR,
    version  VARCHAR
);

-- Text form of a stored address.
CREATE MACRO nt_ip(a) AS CASE
    WHEN a IS NULL THEN NULL
    WHEN (a >> 32) = 65535 THEN
        concat_ws('.', ((a >> 24) & 255)::UINTEGER, ((a >> 16) & 255)::UINTEGER,
                       ((a >> 8) & 255)::UINTEGER, (a & 255)::UINTEGER)
    ELSE
        concat_ws(':', printf('%x', ((a >> 112) & 65535)::UINTEGER), printf('%x', ((a >> 96) & 65535)::UINTEGER),
                       printf('%x', ((a >> 80) & 65535)::UINTEGER), printf('%x', ((a >> 64) & 65535)::UINTEGER),
                       printf('%x', ((a >> 48) & 65535)::UINTEGER), printf('%x', ((a >> 32) & 65535)::UINTEGER),
                       printf('%x', ((a >> 16) & 65535)::UINTEGER), printf('%x', (a & 65535)::UINTEGER))
END;

CREATE MACRO nt_proto(p) AS CASE p WHEN 6 THEN 'tcp' WHEN 17 THEN 'udp' WHEN 1 THEN 'icmp'
    WHEN 58 THEN 'icmpv6' WHEN 132 THEN 'sctp' WHEN 136 THEN 'udplite' WHEN 33 THEN 'dccp'
    WHEN 47 THEN 'gre' ELSE p::VARCHAR END;

-- One row per flow: its start (NEW or dump) joined with the first DESTROY received after it,
-- plus DESTROYs whose start the trail never saw. "end" is NULL while the flow is open.
CREATE VIEW flows AS
WITH s AS (SELECT * FROM conntrack_events WHERE kind IN (1, 3)),
     d AS (SELECT * FROM conntrack_events WHERE kind = 2)
SELECT
    coalesce(d.start_ts, s.start_ts, s.ts) AS start,
    d.ts AS "end",
    coalesce(d.inexact, false) AS end_inexact,
    d.end_lo,
    s.kind = 3 AS found_by_dump,
    nt_proto(s.proto) AS proto,
    nt_ip(s.orig_src) AS internal_ip, s.orig_sport AS internal_port,
    nt_ip(s.reply_dst) AS public_ip, s.reply_dport AS public_port,
    nt_ip(s.orig_dst) AS dst_ip, s.orig_dport AS dst_port,
    d.orig_bytes AS bytes_out, d.orig_packets AS packets_out,
    d.reply_bytes AS bytes_in, d.reply_packets AS packets_in,
    s.ct_id, s.zone, s.mark, s.family,
    s.orig_src, s.reply_dst, s.orig_dst, s.proto AS proto_num,
    s.seq AS start_seq, d.seq AS end_seq
FROM s ASOF LEFT JOIN d
  ON s.ct_id = d.ct_id AND s.zone = d.zone AND s.proto = d.proto
 AND s.orig_src = d.orig_src AND s.orig_sport = d.orig_sport
 AND s.orig_dst = d.orig_dst AND s.orig_dport = d.orig_dport
 AND d.seq > s.seq
UNION ALL
SELECT
    d.start_ts AS start, d.ts AS "end", d.inexact AS end_inexact, d.end_lo, false AS found_by_dump,
    nt_proto(d.proto), nt_ip(d.orig_src), d.orig_sport, nt_ip(d.reply_dst), d.reply_dport,
    nt_ip(d.orig_dst), d.orig_dport, d.orig_bytes, d.orig_packets, d.reply_bytes, d.reply_packets,
    d.ct_id, d.zone, d.mark, d.family, d.orig_src, d.reply_dst, d.orig_dst, d.proto,
    NULL, d.seq
FROM d
WHERE NOT EXISTS (
    SELECT 1 FROM s
    WHERE s.ct_id = d.ct_id AND s.zone = d.zone AND s.proto = d.proto
      AND s.orig_src = d.orig_src AND s.orig_sport = d.orig_sport
      AND s.orig_dst = d.orig_dst AND s.orig_dport = d.orig_dport
      AND s.seq < d.seq);
