-- nattrail schema version 14: each day gets a third table, flow_ends_YYYYMMDD, holding a copy
-- of the final slice of every flow that started that day and lived through a whole hour (it
-- ended two hours or more after the one it started in), written when the hour of its end is
-- sealed and kept sorted by public port and address.
--
-- A lookup that finds a flow by an interim slice (a 12-hour session asked about in its fifth
-- hour) wants its end and counters: it searched the sealed hours after, up to a week, one
-- row group of each not yet cached (1-2 ms an hour). It now reads the one row group of the
-- start day's ends table holding the port (asked about in the hour it started, the flow may
-- have ended in the next: that hour is read first). Hours sealed before this version have no ends
-- rows: ends_from is the first hour that does, and lookups of older interim slices search
-- as before. Why, with the measurements: docs/DESIGN-trail.md.
ALTER TABLE trail_state ADD COLUMN ends_from INTEGER;
UPDATE trail_state SET ends_from = coalesce(sealed_hour + 1, 0);

-- ADD THE ENDS TABLES HERE
