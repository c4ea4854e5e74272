-- nattrail schema version 13: hours sealed from now on go to one pair of tables per UTC day
-- (flow_sealed_YYYYMMDD, trail_dst_YYYYMMDD) instead of one pair for the whole history.
--
-- DuckDB loads the metadata of every row group a scan considers (about 5.6 KiB each, 344
-- row groups a day at 40 M flows), so with one table a lookup's first read, and the memory
-- of the process making it, grew with the history kept. A lookup now names the tables of
-- its window; retention drops whole days' tables. trail_state.days lists the days that have
-- tables; the views flow_sealed and trail_dst (every day) keep the names of schema 8 for
-- SQL and the views built on them.
--
-- The hours sealed before stay in their tables, renamed (copying them would keep the
-- upgraded agent from capturing for 8-10 s per day of 40 M flows kept): lookups read them
-- for the hours up to legacy_until, and retention removes them. Why, with the
-- measurements: docs/DESIGN-trail.md.
ALTER TABLE trail_state ADD COLUMN days INTEGER[];
ALTER TABLE trail_state ADD COLUMN legacy_until INTEGER;
UPDATE trail_state SET legacy_until = sealed_hour;
ALTER TABLE flow_sealed RENAME TO flow_sealed_before13;
ALTER TABLE trail_dst RENAME TO trail_dst_before13;

-- KEEP THE SEALED HOURS HERE
