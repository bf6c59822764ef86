-- Rollouts: a candidate build of a deployed plugin running beside its live build, on every host of
-- a fleet, in shadow mode (it runs on the same entries, its writes are compared and never executed)
-- or as a canary (a share of the entries, chosen by a key, is handled by it). One running rollout
-- per plugin per fleet; finished ones stay as the record of what happened and why.
CREATE TABLE rollouts (
    id                   BIGSERIAL   PRIMARY KEY,
    fleet                TEXT        NOT NULL,
    plugin               TEXT        NOT NULL,
    live_version         TEXT        NOT NULL,
    live_sha256          TEXT        NOT NULL,
    candidate_version    TEXT        NOT NULL,
    candidate_sha256     TEXT        NOT NULL,
    candidate_streams    TEXT[]      NOT NULL,
    candidate_bytes      BYTEA       NOT NULL,
    mode                 TEXT        NOT NULL CHECK (mode IN ('shadow', 'canary')),
    -- The share of entries (by key) the candidate runs on, in percent.
    percent              DOUBLE PRECISION NOT NULL CHECK (percent >= 0 AND percent <= 100),
    -- The entry field whose value routes an entry; entries without it go by entry id.
    key_field            TEXT,
    -- Automatic rollback: the candidate's failure rate above the live one's by more than this
    -- many points, over windows of `window_entries` of its entries; its handler time p99 above
    -- `max_latency_factor` times the live one's; in shadow mode, differences above
    -- `max_difference_percent` of the compared entries (when set).
    max_failure_points   DOUBLE PRECISION NOT NULL,
    window_entries       INTEGER     NOT NULL CHECK (window_entries > 0),
    max_latency_factor   DOUBLE PRECISION NOT NULL,
    max_difference_percent DOUBLE PRECISION,
    state                TEXT        NOT NULL DEFAULT 'running'
                         CHECK (state IN ('running', 'promoted', 'aborted', 'rolled-back')),
    reason               TEXT,
    -- Raised at every change, so a tool can wait for every host to follow this very change.
    revision             INTEGER     NOT NULL DEFAULT 1,
    started_by           TEXT        NOT NULL,
    started_at           TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX rollouts_one_running ON rollouts (fleet, plugin) WHERE state = 'running';

-- What each host finished under a rollout, written in the transaction that finished the entries,
-- so the counts are exact (a redelivery counts nothing). Canary: `role` live or candidate,
-- `outcome` processed or dead-lettered. Shadow: `role` shadow, `outcome` the comparison (same,
-- different, candidate-failed, candidate-succeeded, candidate-rejected). A host spreads its
-- batches over 16 `shard`s, so two of its batches committing at once never wait for each other on
-- one counter row; readers add them up.
CREATE TABLE rollout_tallies (
    rollout_id BIGINT   NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    host       TEXT     NOT NULL,
    shard      SMALLINT NOT NULL,
    role       TEXT     NOT NULL,
    outcome    TEXT     NOT NULL,
    entries    BIGINT   NOT NULL,
    PRIMARY KEY (rollout_id, host, shard, role, outcome)
);

-- A bounded sample of the entries on which a shadow candidate's outcome differed from the live
-- one: both outcomes, as `kaleidoscope rollout diff` shows them.
CREATE TABLE rollout_differences (
    rollout_id  BIGINT      NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    stream      TEXT        NOT NULL,
    entry_id    TEXT        NOT NULL,
    verdict     TEXT        NOT NULL,
    live        JSONB       NOT NULL,
    candidate   JSONB       NOT NULL,
    host        TEXT        NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (rollout_id, stream, entry_id)
);
