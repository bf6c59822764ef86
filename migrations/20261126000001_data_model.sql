-- Kaleidoscope data model (BRIEF §5).
--
-- Backend-owned tables are created only if absent, so the host also runs standalone next to a
-- database that the Java backend already created.

CREATE TABLE IF NOT EXISTS users (
    user_id  BIGINT PRIMARY KEY,
    username TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS posts (
    post_id   BIGINT PRIMARY KEY,
    author_id BIGINT REFERENCES users (user_id)
);

CREATE TABLE IF NOT EXISTS post_media (
    media_id  BIGINT PRIMARY KEY,
    post_id   BIGINT REFERENCES posts (post_id),
    media_url TEXT
);

-- The text the insights search column indexes. array_to_string is only STABLE in general, but
-- for text[] it is immutable, which a generated column requires.
CREATE FUNCTION kaleidoscope_insights_search(tags TEXT[], scenes TEXT[], objects TEXT[], caption TEXT)
RETURNS TSVECTOR LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_tsvector('simple'::regconfig,
        coalesce(array_to_string(tags, ' '), '') || ' ' ||
        coalesce(array_to_string(scenes, ' '), '') || ' ' ||
        coalesce(array_to_string(objects, ' '), '') || ' ' ||
        coalesce(caption, ''))
$$;

-- One row per media, merged from every insights message and face-detection result for it.
CREATE TABLE media_ai_insights (
    media_id              BIGINT PRIMARY KEY REFERENCES post_media (media_id) ON DELETE CASCADE,
    post_id               BIGINT,
    is_safe               BOOLEAN,
    moderation_confidence DOUBLE PRECISION,
    caption               TEXT,
    tags                  TEXT[],
    scenes                TEXT[],
    detected_objects      TEXT[],
    colors                TEXT[],
    quality_score         DOUBLE PRECISION,
    has_adult_content     BOOLEAN,
    has_violent_content   BOOLEAN,
    dominant_emotion      TEXT,
    image_embedding       REAL[],
    services_completed    TEXT[] NOT NULL DEFAULT '{}',
    face_detection_status TEXT NOT NULL DEFAULT 'PENDING'
        CHECK (face_detection_status IN ('PENDING', 'COMPLETED', 'FAILED')),
    faces_detected        INTEGER,
    correlation_id        TEXT,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The seed's "update search index", maintained by the database itself.
    search_vector         TSVECTOR GENERATED ALWAYS AS (
        kaleidoscope_insights_search(tags, scenes, detected_objects, caption)
    ) STORED
);

CREATE INDEX media_ai_insights_search ON media_ai_insights USING GIN (search_vector);
CREATE INDEX media_ai_insights_post ON media_ai_insights (post_id);

-- One row per detected face; the detector's face id (or a deterministic one) makes redelivery
-- and repeated detection idempotent.
CREATE TABLE media_detected_faces (
    id                BIGSERIAL PRIMARY KEY,
    media_id          BIGINT NOT NULL REFERENCES post_media (media_id) ON DELETE CASCADE,
    face_id           TEXT NOT NULL,
    post_id           BIGINT,
    bbox_x            DOUBLE PRECISION NOT NULL,
    bbox_y            DOUBLE PRECISION NOT NULL,
    bbox_width        DOUBLE PRECISION NOT NULL,
    bbox_height       DOUBLE PRECISION NOT NULL,
    confidence        DOUBLE PRECISION,
    estimated_age     INTEGER,
    estimated_gender  TEXT,
    dominant_emotion  TEXT,
    embedding         REAL[],
    suggested_user_id BIGINT REFERENCES users (user_id) ON DELETE SET NULL,
    matched_username  TEXT,
    match_confidence  DOUBLE PRECISION,
    status            TEXT NOT NULL DEFAULT 'UNIDENTIFIED'
        CHECK (status IN ('UNIDENTIFIED', 'SUGGESTED', 'CONFIRMED')),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (media_id, face_id)
);

-- What arrives on ml-error-results (and the producers' own ai-processing-dlq).
CREATE TABLE ml_processing_errors (
    id                  BIGSERIAL PRIMARY KEY,
    source_stream       TEXT NOT NULL,
    entry_id            TEXT NOT NULL,
    correlation_id      TEXT,
    error               TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'FAILED',
    service_name        TEXT,
    error_type          TEXT,
    retry_count         INTEGER,
    original_message_id TEXT,
    original_data       TEXT,
    producer_timestamp  TEXT,
    received_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (source_stream, entry_id)
);

CREATE INDEX ml_processing_errors_correlation ON ml_processing_errors (correlation_id);

-- Keeps updated_at true without trusting handlers (they have no clock).
CREATE FUNCTION kaleidoscope_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER media_ai_insights_touch BEFORE UPDATE ON media_ai_insights
    FOR EACH ROW EXECUTE FUNCTION kaleidoscope_touch_updated_at();
CREATE TRIGGER media_detected_faces_touch BEFORE UPDATE ON media_detected_faces
    FOR EACH ROW EXECUTE FUNCTION kaleidoscope_touch_updated_at();
