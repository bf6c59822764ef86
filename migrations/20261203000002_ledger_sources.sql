-- The ledger identity (`processed_entries.source`) lives in Redis, so every host of a deployment
-- shares it. When Redis loses its data it loses the identity too; a host starting then must not
-- make a new one (entries recorded under the old identity would run again on a rewind). So each
-- identity is also remembered here, by the deployment it belongs to: the Redis server and
-- database as configured (without credentials) and the stream prefix. A host that finds no
-- identity in Redis restores the one remembered for its deployment.
CREATE TABLE ledger_sources (
    deployment TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    seen_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- `dlq replay` marks a replayed dead letter with the id of the entry it replays, and the host
-- records it in the ledger under that id: the same dead letter replayed twice is applied once.
-- Producers write to the same Redis, so the mark alone could be forged (an entry claiming to
-- replay another, and vanishing as its "redelivery"). Each deployment's replays therefore carry a
-- proof made with a secret only PostgreSQL holds; a mark without a valid proof is ignored.
CREATE TABLE replay_secrets (
    source TEXT PRIMARY KEY,
    secret TEXT NOT NULL DEFAULT replace(gen_random_uuid()::text, '-', '')
                               || replace(gen_random_uuid()::text, '-', '')
);
