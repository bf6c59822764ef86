-- How far back the ledger has forgotten, per deployment and stream: the newest entry id whose
-- ledger row was pruned. Every entry at or before it was finished (entries are delivered in id
-- order, and rows at or after the oldest pending entry are never pruned), but the ledger can no
-- longer tell which, so the host must never run them again: a consumer group that vanished is
-- recreated just after it (not at 0), and entries at or before it delivered for the first time
-- (a rewind with XGROUP SETID) are acknowledged without being run, with a warning.
-- `through` is the entry id as {milliseconds, sequence}; numeric, as Redis ids are unsigned 64-bit.
CREATE TABLE ledger_horizons (
    source  TEXT NOT NULL,
    stream  TEXT NOT NULL,
    through NUMERIC[] NOT NULL,
    PRIMARY KEY (source, stream)
);
