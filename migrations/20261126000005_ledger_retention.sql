-- The ledger is pruned by age (`ledger_retention_ms`). Rows are appended in time order, so a BRIN
-- index finds the old ones at almost no cost to the inserts of the delivery path.
CREATE INDEX processed_entries_processed_at ON processed_entries USING brin (processed_at);
