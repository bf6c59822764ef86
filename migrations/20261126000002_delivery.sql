-- The host's own bookkeeping for the delivery protocol (BRIEF §3). Plugins can never write these.

-- Every entry the host finished: processed (commands committed) or dead-lettered. An entry found
-- here on redelivery is acknowledged without running its commands again.
CREATE TABLE processed_entries (
    stream         TEXT NOT NULL,
    entry_id       TEXT NOT NULL,
    plugin         TEXT NOT NULL,
    plugin_version TEXT NOT NULL,
    outcome        TEXT NOT NULL DEFAULT 'processed'
        CHECK (outcome IN ('processed', 'dead-lettered')),
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

-- Transactional outbox: messages (plugin emits and dead letters) written in the same transaction
-- as the entry's effects and published to Redis after commit. Rows left behind by a crash are
-- published by the relay.
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    stream     TEXT NOT NULL,
    fields     JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
