-- The operator's own migrations (KALEIDOSCOPE_MIGRATIONS_DIR): SQL files that give plugins new
-- tables without a new host build. Each applied file is recorded with its content hash, so it is
-- applied once and a file changed after it was applied is reported instead of run again.
CREATE TABLE operator_migrations (
    name       TEXT PRIMARY KEY,
    sha256     TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
