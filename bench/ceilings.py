#!/usr/bin/env python3
"""Raw ceilings on this machine, for BENCHMARKS.md: how fast the two halves of the work go alone.

1. Redis: read N pre-loaded entries with XREADGROUP (COUNT 250) and XACK them, nothing else.
2. PostgreSQL: upsert N seed-shaped insights rows into media_ai_insights, 250 per statement
   (INSERT ... SELECT FROM unnest ... ON CONFLICT DO UPDATE), one transaction per statement.

Run with the bench's environment (created by `kaleidoscope bench --baseline`):
    target/bench-venv/bin/python bench/ceilings.py [N]
Uses the database `kaleidoscope_bench` (which must exist, migrated: run the bench once) and the
stream key `bench-ceiling`, both cleaned up first.
"""

import os
import sys
import time

import psycopg
import redis

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
BATCH = 250
KEY = "bench-ceiling"

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
r.delete(KEY)
pipe = r.pipeline(transaction=False)
for m in range(1, N + 1):
    pipe.xadd(KEY, {"mediaId": m, "postId": 1, "scenes": '["beach"]', "qualityScore": "0.5", "correlationId": f"c-{m}"})
    if m % 1000 == 0:
        pipe.execute()
pipe.execute()
r.xgroup_create(KEY, "g", id="0")
start = time.perf_counter()
done = 0
while done < N:
    reply = r.xreadgroup("g", "c", {KEY: ">"}, count=BATCH)
    ids = [i for _, entries in reply for i, _ in entries]
    r.xack(KEY, "g", *ids)
    done += len(ids)
redis_rate = N / (time.perf_counter() - start)
r.delete(KEY)

db = psycopg.connect(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kaleidoscope_bench"))
with db.transaction():
    db.execute("TRUNCATE media_ai_insights, post_media, posts, users CASCADE")
    db.execute("INSERT INTO users VALUES (1, 'bench')")
    db.execute("INSERT INTO posts VALUES (1, 1)")
    db.execute("INSERT INTO post_media SELECT g, 1, 'u' FROM generate_series(1, %s) g", [N])
start = time.perf_counter()
for first in range(1, N + 1, BATCH):
    ids = list(range(first, min(first + BATCH, N + 1)))
    with db.transaction():
        db.execute(
            "INSERT INTO media_ai_insights AS t (media_id, post_id, scenes, quality_score, correlation_id) "
            "SELECT m, 1, '{beach}', 0.5, 'c-' || m FROM unnest(%s::int8[]) AS u(m) "
            "ON CONFLICT (media_id) DO UPDATE SET scenes = EXCLUDED.scenes, quality_score = EXCLUDED.quality_score, "
            "correlation_id = EXCLUDED.correlation_id",
            [ids],
        )
pg_rate = N / (time.perf_counter() - start)
print(f"Redis XREADGROUP + XACK alone:              {redis_rate:>9,.0f} entries/s")
print(f"PostgreSQL multi-row upsert alone (250/tx): {pg_rate:>9,.0f} rows/s")
