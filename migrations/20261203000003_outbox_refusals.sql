-- An outbox message Redis refuses (an emit to a key that holds another type, a stream past
-- its limits) must not block the messages behind it. The relay records the refusal on the row and
-- tries it again later, backing off; the rows behind it go out meanwhile.
ALTER TABLE outbox ADD COLUMN refusals   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN last_error TEXT;
ALTER TABLE outbox ADD COLUMN retry_at   TIMESTAMPTZ;
