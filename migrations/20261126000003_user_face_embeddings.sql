-- Face embeddings of users' profile pictures (from `user-profile-face-embedding-results`), used
-- to recognise users in posted photos. One row per user; a new profile picture replaces it.
CREATE TABLE user_face_embeddings (
    user_id        BIGINT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    embedding      REAL[] NOT NULL,
    correlation_id TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TRIGGER user_face_embeddings_touch BEFORE UPDATE ON user_face_embeddings
    FOR EACH ROW EXECUTE FUNCTION kaleidoscope_touch_updated_at();
