-- nattrail schema version 13: the sealed hours in one pair of tables per UTC day
-- (flow_sealed_YYYYMMDD, trail_dst_YYYYMMDD) instead of one pair for the whole history.
--
-- DuckDB loads the metadata of every row group a scan considers (about 5.6 KiB each, 344
-- row groups a day at 40 M flows), so with one table a lookup's first read, and the memory
-- of the process making it, grew with the history kept. A lookup now names the tables of
-- its window; retention drops whole days' tables. trail_state.days lists the days that have
-- tables; the views flow_sealed and trail_dst (every day) keep the names of schema 8 for
-- SQL and the views built on them. Why, with the measurements: docs/DESIGN-trail.md.
ALTER TABLE trail_state ADD COLUMN days INTEGER[];
ALTER TABLE flow_sealed RENAME TO flow_sealed_v12;
ALTER TABLE trail_dst RENAME TO trail_dst_v12;

-- SPLIT THE SEALED DAYS HERE

DROP TABLE flow_sealed_v12;
DROP TABLE trail_dst_v12;
