-- nattrail schema version 7: the writer's open flows, checkpointed, so that a start loads
-- them and replays the events since, instead of scanning the whole trail for NEW events
-- without a DESTROY (a minute on a day of 40 M flows, during which nothing is captured).

-- The flows open in the trail as of the checkpoint: what the writer needs to close one
-- (an inexact DESTROY when a dump shows it gone).
CREATE TABLE open_flows (
    ct_id       UINTEGER  NOT NULL,
    zone        USMALLINT NOT NULL,
    proto       UTINYINT  NOT NULL,
    orig_src    UHUGEINT  NOT NULL,
    orig_dst    UHUGEINT  NOT NULL,
    orig_sport  USMALLINT NOT NULL,
    orig_dport  USMALLINT NOT NULL,
    reply_src   UHUGEINT  NOT NULL,
    reply_dst   UHUGEINT  NOT NULL,
    reply_sport USMALLINT NOT NULL,
    reply_dport USMALLINT NOT NULL,
    family      UTINYINT  NOT NULL,
    mark        UINTEGER  NOT NULL,
    status      UINTEGER  NOT NULL,
    start_us    BIGINT    NOT NULL
);

-- Where the next checkpoint is appended before it replaces open_flows in one transaction
-- (an appender cannot join a transaction; a crash in between leaves open_flows whole).
CREATE TABLE open_flows_staging AS SELECT * FROM open_flows LIMIT 0;

-- The checkpoint is complete until this sequence number: rows of conntrack_events at or
-- above it are replayed over open_flows at start. No row: never taken (a trail from before
-- version 7), recovered by the scan once, and checkpointed at once.
CREATE TABLE open_flows_checkpoint (
    next_seq UBIGINT   NOT NULL,
    taken    TIMESTAMP NOT NULL
);
