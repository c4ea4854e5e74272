-- nattrail schema version 11: where a lookup must read more than the sealed hours.
--
-- A sealed hour can lack slices for a while: a slice written late (a DESTROY that queued
-- past the seal's grace, a flow closed by a start-up dump) waits in trail_recent until the
-- next seal, and a flow that opened after the sweep of hours it outlived has no interim
-- slice in them until the next sweep. late_hour is the oldest such hour, NULL when there is
-- none: a lookup of sealed hours reads trail_recent and the open flows only from late_hour
-- on (two to three statements' worth of planning less otherwise; docs/DESIGN-trail.md). The
-- writer sets it before it writes, so a reader never misses a flow; a seal resets it.
ALTER TABLE trail_state ADD COLUMN late_hour INTEGER;
-- Open flows recovered by an older writer may lack interim slices of any hour since their
-- start (its sweep wrote them again after a restart): the first seal after this one clears
-- the mark.
UPDATE trail_state SET late_hour = (
    SELECT min(h) FROM (
        SELECT hour AS h FROM trail_recent
        UNION ALL SELECT (start_us // 3600000000)::INTEGER FROM open_flows
        UNION ALL SELECT (start_us // 3600000000)::INTEGER FROM open_journal)
    WHERE h <= trail_state.sealed_hour);
