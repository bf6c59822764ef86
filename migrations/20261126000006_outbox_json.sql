-- The outbox carries messages exactly as they were written. `jsonb` cannot hold a NUL character
-- (`\u0000`), so one emitted field or dead letter containing it failed every attempt to write its
-- batch and blocked the stream; `json` keeps the text as given.
ALTER TABLE outbox ALTER COLUMN fields TYPE json USING fields::json;
