-- nattrail schema version 3: log-scan rules and the event log.

-- Every event the agent reports besides the conntrack trail: log-rule hits (source
-- 'logscan'), and later the agent's own events. Appended by the writer, in time order.
CREATE SEQUENCE event_log_ids START 1;
CREATE TABLE event_log (
    id       UBIGINT   NOT NULL DEFAULT nextval('event_log_ids'),
    ts       TIMESTAMP NOT NULL,
    source   VARCHAR   NOT NULL,  -- 'logscan', 'conntrack', 'agent'
    severity VARCHAR   NOT NULL,  -- info, warning, error, critical
    message  VARCHAR   NOT NULL,  -- at most 500 bytes, cut on a character boundary
    metadata JSON                 -- workload, container, rule, stream, captures, ...
);

-- Rules: global (workload NULL) or for one workload (container name, compose service or
-- label value). The pattern is stored even when it does not compile; compile_error says why.
CREATE SEQUENCE log_scan_rule_ids START 1;
CREATE TABLE log_scan_rules (
    id            UBIGINT   NOT NULL PRIMARY KEY DEFAULT nextval('log_scan_rule_ids'),
    name          VARCHAR   NOT NULL,
    pattern       VARCHAR   NOT NULL,
    stream        VARCHAR   NOT NULL,  -- stdout, stderr, both
    severity      VARCHAR   NOT NULL,
    cooldown_s    UBIGINT   NOT NULL,
    enabled       BOOLEAN   NOT NULL,
    workload      VARCHAR,             -- NULL: global
    compile_error VARCHAR,
    updated       TIMESTAMP NOT NULL
);

-- A workload's change to a global rule: disable it, or give it another severity.
CREATE TABLE log_scan_overrides (
    rule_id  UBIGINT NOT NULL,
    workload VARCHAR NOT NULL,
    enabled  BOOLEAN,
    severity VARCHAR,
    PRIMARY KEY (rule_id, workload)
);
