-- Every request published to the ML services, tracked until its results arrive (BRIEF §6).
--
-- Result plugins append what arrived to `results_received` (and the error plugin sets FAILED)
-- through ordinary `update` commands; the trigger below completes a request once every expected
-- result is in. The host's request tracker republishes requests that stay PENDING past
-- ML_TIMEOUT_SECONDS and marks them TIMED_OUT after ML_RETRY_ATTEMPTS publications.
CREATE TABLE ml_requests (
    correlation_id    TEXT PRIMARY KEY,
    stream            TEXT NOT NULL,
    post_id           BIGINT,
    media_id          BIGINT,
    user_id           BIGINT,
    -- The published fields, to republish the request unchanged.
    fields            JSONB NOT NULL,
    status            TEXT NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED', 'TIMED_OUT')),
    expected_results  TEXT[] NOT NULL,
    results_received  TEXT[] NOT NULL DEFAULT '{}',
    attempts          INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_published_at TIMESTAMPTZ,
    completed_at      TIMESTAMPTZ
);

CREATE INDEX ml_requests_pending ON ml_requests (last_published_at) WHERE status = 'PENDING';

-- PENDING -> COMPLETED once every expected result has arrived. The seed's all-in-one insights
-- message (recorded as 'insights') stands for the five per-service insights results.
CREATE FUNCTION kaleidoscope_complete_request() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    received TEXT[] := NEW.results_received;
BEGIN
    IF 'insights' = ANY (received) THEN
        received := received || ARRAY['moderation', 'tagging', 'scene_recognition', 'image_captioning', 'image_embedding'];
    END IF;
    IF NEW.status = 'PENDING' AND NEW.expected_results <@ received THEN
        NEW.status := 'COMPLETED';
        NEW.completed_at := now();
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER ml_requests_complete BEFORE UPDATE ON ml_requests
    FOR EACH ROW EXECUTE FUNCTION kaleidoscope_complete_request();
