-- The table of the caption-quality example plugin. Give it to a running host by copying this file
-- into its operator migrations directory (KALEIDOSCOPE_MIGRATIONS_DIR).
CREATE TABLE IF NOT EXISTS caption_quality (
    media_id   BIGINT PRIMARY KEY,
    score      DOUBLE PRECISION NOT NULL,
    model      TEXT,
    flagged    BOOLEAN NOT NULL DEFAULT false,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
