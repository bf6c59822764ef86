-- The ledger's identity of an entry includes where it was read from. Two deployments sharing one
-- PostgreSQL (different Redis servers or databases, or different stream prefixes) may read entries
-- with the same stream name and id; keyed by stream and id alone, one deployment's ledger row made
-- the other acknowledge its entry unprocessed. `source` is the deployment's identity, kept in its
-- Redis (see `streams::source_identity`). Rows written before this column existed have '' and are
-- adopted by the first host that starts after the upgrade.
ALTER TABLE processed_entries ADD COLUMN source TEXT NOT NULL DEFAULT '';
ALTER TABLE processed_entries DROP CONSTRAINT processed_entries_pkey;
ALTER TABLE processed_entries ADD PRIMARY KEY (source, stream, entry_id);
