-- Embeddings are stored out of line without compression. A 1408-float `real[]` is 5.6 kB, past
-- the 2 kB at which PostgreSQL tries to compress a row's values; model embeddings are
-- near-random bits, so pglz never reaches its minimum ratio and the value is stored as it was,
-- after the attempt cost PostgreSQL a tenth of its CPU on the mixed load (BENCHMARKS.md).
-- `EXTERNAL` keeps the out-of-line storage and skips the attempt; the values are unchanged, and
-- rows written before keep their (equally uncompressed) storage.
ALTER TABLE media_ai_insights ALTER COLUMN image_embedding SET STORAGE EXTERNAL;
ALTER TABLE media_detected_faces ALTER COLUMN embedding SET STORAGE EXTERNAL;
ALTER TABLE user_face_embeddings ALTER COLUMN embedding SET STORAGE EXTERNAL;
