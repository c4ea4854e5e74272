-- nattrail schema version 6: trigger secrets and header values leave the database.
-- Every connection of a DuckDB instance sees every table, and /sql runs user text on one:
-- the agent moves these values into its private secrets file (store/secrets.rs) before this
-- migration runs, and drops the columns here.
ALTER TABLE event_triggers DROP COLUMN secret;
ALTER TABLE event_triggers DROP COLUMN headers;
