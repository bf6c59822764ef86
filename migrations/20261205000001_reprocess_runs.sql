-- Reprocessing runs (`kaleidoscope reprocess`): entries already in a stream run again through a
-- chosen build of their plugin, to backfill what a new version writes or repair what a bad one
-- wrote. A run's ledger rows are keyed `<entry id>/reprocess:<run id>`, so a run applies each
-- entry once however often it is resumed, and a new run applies again on purpose.
CREATE TABLE reprocess_runs (
    id               BIGSERIAL   PRIMARY KEY,
    -- The hosts' fleet (stream prefix and consumer group) and ledger source the run writes as.
    fleet            TEXT        NOT NULL,
    source           TEXT        NOT NULL,
    stream           TEXT        NOT NULL,
    -- The build the run applies, with its bytes: a resumed run goes on with the same build
    -- whatever has been deployed since.
    plugin           TEXT        NOT NULL,
    plugin_version   TEXT        NOT NULL,
    plugin_sha256    TEXT        NOT NULL,
    plugin_bytes     BYTEA       NOT NULL,
    -- What was selected, as given on the command line and as the run reads it back.
    selection        TEXT        NOT NULL,
    selection_spec   JSONB       NOT NULL,
    emit             BOOLEAN     NOT NULL,
    rate             DOUBLE PRECISION,
    state            TEXT        NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'interrupted', 'finished', 'cancelled', 'failed')),
    reason           TEXT,
    -- The last entry (in stream order) the run has finished: a resumed run reads after it.
    position         TEXT,
    -- Entries of the selection found in the stream, and no longer there (trimmed).
    selected         BIGINT      NOT NULL DEFAULT 0,
    missing          BIGINT      NOT NULL DEFAULT 0,
    -- Counted in each batch's transaction, so exact across crashes and resumes.
    processed        BIGINT      NOT NULL DEFAULT 0,
    dead_lettered    BIGINT      NOT NULL DEFAULT 0,
    emits_suppressed BIGINT      NOT NULL DEFAULT 0,
    -- Entries this run had applied before (a resume reading them again).
    skipped          BIGINT      NOT NULL DEFAULT 0,
    started_by       TEXT        NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    finished_at      TIMESTAMPTZ
);

CREATE INDEX reprocess_runs_fleet ON reprocess_runs (fleet, state);
