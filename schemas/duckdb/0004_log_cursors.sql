-- nattrail schema version 4: where each container's log was read up to.

-- One row per container: the last Docker record consumed (timestamp in ns and rank among
-- records with that timestamp) and a digest of its text. Written in the same transaction
-- as the hits of the lines before it, so a restart resumes with no lost and no repeated
-- hit.
CREATE TABLE log_cursors (
    container_id VARCHAR   NOT NULL PRIMARY KEY,
    ts_ns        BIGINT    NOT NULL,
    rank         UINTEGER  NOT NULL,
    digest       UBIGINT   NOT NULL,
    updated      TIMESTAMP NOT NULL
);
