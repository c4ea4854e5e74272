-- nattrail schema version 2: holes in the trail.
-- One row per loss: events the agent knows it missed, with the window they fell in. A flow
-- that started and ended inside the window may be absent; `who` reports such instants as
-- "trail incomplete" instead of "no flow".

CREATE TABLE capture_gaps (
    session_id UBIGINT   NOT NULL,  -- capture_sessions.id of the agent run
    source     VARCHAR   NOT NULL,  -- 'conntrack' (kernel socket) or a pipeline stage name
    start      TIMESTAMP NOT NULL,  -- last instant the stream was known complete
    "end"      TIMESTAMP NOT NULL,  -- the resync that closed the hole finished here
    lost       UBIGINT,             -- events lost, as counted (kernel drop counter or stage); NULL if unknown
    reason     VARCHAR   NOT NULL
);
