-- The table of plugin {{name}}. Give it to a running host by copying this file into its operator
-- migrations directory (KALEIDOSCOPE_MIGRATIONS_DIR): applied once, no restart, no rebuild.
CREATE TABLE IF NOT EXISTS {{table}} (
    media_id   BIGINT PRIMARY KEY,
    label      TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
