-- nattrail schema version 12: the open flows' checkpoint keeps, for each flow, the last hour
-- it has an interim slice for. Without it a start took every recovered flow as covered up
-- to the hour before its start only, and the next sweep wrote all its interim slices again:
-- duplicate rows in sealed hours (a 12-hour flow, 12 of them), and those hours marked late
-- (read through trail_recent) until the next seal. NULL (a checkpoint of an older writer)
-- keeps that old reading.
ALTER TABLE open_flows ADD COLUMN covered INTEGER;
ALTER TABLE open_flows_staging ADD COLUMN covered INTEGER;
