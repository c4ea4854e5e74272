-- nattrail schema version 5: webhook triggers and their delivery log.

-- A trigger: AND-composed filters (JSON, see triggers/filter.rs), a rate limit, and a
-- webhook. The secret is never returned by a read.
CREATE SEQUENCE event_trigger_ids START 1;
CREATE TABLE event_triggers (
    id              UBIGINT   NOT NULL PRIMARY KEY DEFAULT nextval('event_trigger_ids'),
    name            VARCHAR   NOT NULL,
    enabled         BOOLEAN   NOT NULL,
    filter          JSON      NOT NULL,
    rate_per_min    UINTEGER  NOT NULL,  -- deliveries per minute; 0: no limit
    url             VARCHAR   NOT NULL,
    secret          VARCHAR,
    headers         JSON      NOT NULL,
    disabled_reason VARCHAR,             -- e.g. the receiver answered 410 Gone
    updated         TIMESTAMP NOT NULL
);

-- One row per delivery (all its attempts): what was sent where, and how it ended.
CREATE SEQUENCE webhook_delivery_ids START 1;
CREATE TABLE webhook_deliveries (
    id         UBIGINT   NOT NULL DEFAULT nextval('webhook_delivery_ids'),
    ts         TIMESTAMP NOT NULL,
    trigger_id UBIGINT   NOT NULL,
    event_id   UBIGINT,
    webhook_id VARCHAR   NOT NULL,
    attempts   UINTEGER  NOT NULL,
    outcome    VARCHAR   NOT NULL,  -- delivered, failed, gone, refused, dropped, rate_limited
    status     USMALLINT,
    error      VARCHAR
);
