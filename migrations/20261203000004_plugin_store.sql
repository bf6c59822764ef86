-- The fleet's plugin store: the plugins `kaleidoscope plugin deploy` deployed, one row per plugin
-- name per fleet (the hosts of one stream prefix and consumer group). Every host writes these into
-- its plugins directory and loads them from there, so every host runs the same build and a new
-- host gets them at start; the directory alone stays for single-machine use and development.
CREATE TABLE plugin_store (
    fleet       TEXT        NOT NULL,
    name        TEXT        NOT NULL,
    version     TEXT        NOT NULL,
    sha256      TEXT        NOT NULL,
    streams     TEXT[]      NOT NULL,
    bytes       BYTEA       NOT NULL,
    deployed_by TEXT        NOT NULL,
    deployed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (fleet, name)
);

-- Which build of a plugin handled an entry: the first 12 hex digits of its file's SHA-256, since
-- every build during development carries the same manifest version.
ALTER TABLE processed_entries ADD COLUMN plugin_build TEXT;
