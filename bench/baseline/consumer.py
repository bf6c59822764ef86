#!/usr/bin/env python3
"""The reference consumer `kaleidoscope bench --baseline` measures the host against.

What a team would write by hand in an afternoon, tuned: no plugins, no validation, no dead-letter
stream, no reclaim, no outbox. It reads the three result streams the benchmark loads and does the
same work as the shipped plugins, set-based: per batch (up to 500 entries) one transaction with

- one ledger insert (`INSERT ... SELECT unnest ... ON CONFLICT DO NOTHING RETURNING`), so a
  redelivered entry is skipped,
- one merge upsert into `media_ai_insights` per column shape (the messages of one media folded
  first), one upsert of the faces, one insert of the errors,
- one `ml_requests` update for the results and one for the failures,

then one XACK. Set-up: `python3 -m venv .venv && .venv/bin/pip install redis 'psycopg[binary]'`
(`kaleidoscope bench --baseline` does this itself in `target/bench-venv`).

Environment: REDIS_URL, DATABASE_URL, KALEIDOSCOPE_STREAM_PREFIX, BASELINE_BATCH (500).
Stops when it receives SIGTERM.
"""

import json
import os
import signal
import sys

import psycopg
import redis

PREFIX = os.environ.get("KALEIDOSCOPE_STREAM_PREFIX", "")
GROUP = "baseline-group"
BATCH = int(os.environ.get("BASELINE_BATCH", "500"))
INSIGHTS, FACES, ERRORS = "ml-insights-results", "face-detection-results", "ml-error-results"
SERVICES = {"moderation", "tagging", "scene_recognition", "image_captioning", "image_embedding"}
# media_ai_insights column <- (field, parser)
COLUMNS = [
    ("post_id", "postId", int, "bigint"),
    ("is_safe", "isSafe", lambda v: v == "true", "boolean"),
    ("moderation_confidence", "moderationConfidence", float, "float8"),
    ("caption", "caption", str, "text"),
    ("tags", "tags", json.loads, "text[]"),
    ("scenes", "scenes", json.loads, "text[]"),
    ("detected_objects", "detectedObjects", json.loads, "text[]"),
    ("colors", "colors", json.loads, "text[]"),
    ("quality_score", "qualityScore", float, "float8"),
    ("has_adult_content", "hasAdultContent", lambda v: v == "true", "boolean"),
    ("has_violent_content", "hasViolentContent", lambda v: v == "true", "boolean"),
    ("dominant_emotion", "dominantEmotion", str, "text"),
    # Kept as its JSON text; PostgreSQL turns `[...]` into `{...}` and parses it.
    ("image_embedding", "imageEmbedding", str, "real[]"),
    ("correlation_id", "correlationId", str, "text"),
]
TYPES = {c: t for c, _, _, t in COLUMNS}
TYPES.update(face_detection_status="text", faces_detected="integer")


def literal(items):
    """A PostgreSQL array literal, every element quoted."""
    return "{" + ",".join('"' + str(i).replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "}"


def union(a, b):
    return list(dict.fromkeys(list(a) + list(b)))


def upsert_insights(cur, rows):
    """rows: media_id -> (columns dict, services list); one statement per column shape."""
    shapes = {}
    for media_id, (cols, services) in sorted(rows.items()):
        shapes.setdefault(tuple(sorted(cols)), []).append((media_id, cols, services))
    for shape, group in shapes.items():
        arrays = [[m for m, _, _ in group], [literal(s) for _, _, s in group]]
        select = ["u.c0", "CAST(u.c1 AS text[])"]
        for i, column in enumerate(shape, start=2):
            values = [cols[column] for _, cols, _ in group]
            if column == "image_embedding":
                select.append(f"CAST(translate(u.c{i}, '[]', '{{}}') AS real[])")
                arrays.append(values)
                continue
            if TYPES[column].endswith("[]"):
                values = [literal(v) for v in values]
            else:
                values = [None if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values]
            arrays.append(values)
            select.append(f"CAST(u.c{i} AS {TYPES[column]})")
        names = ", ".join(["media_id", "services_completed", *shape])
        sets = ["services_completed = ARRAY(SELECT DISTINCT ON (x) x FROM unnest(target.services_completed || EXCLUDED.services_completed) WITH ORDINALITY AS t(x, n) ORDER BY x, n)"]
        sets += [f"{c} = EXCLUDED.{c}" for c in shape]
        aliases = ", ".join(f"c{i}" for i in range(len(arrays)))
        params = ", ".join(["%s::int8[]"] + ["%s::text[]"] * (len(arrays) - 1))
        cur.execute(
            f"INSERT INTO media_ai_insights AS target ({names}) SELECT {', '.join(select)} "
            f"FROM unnest({params}) AS u({aliases}) ON CONFLICT (media_id) DO UPDATE SET {', '.join(sets)}",
            arrays,
        )


def update_requests(cur, results):
    """results: correlation id -> services that reported."""
    if not results:
        return
    cids = sorted(results)
    cur.execute(
        "UPDATE ml_requests AS r SET results_received = ARRAY(SELECT DISTINCT ON (x) x FROM unnest(r.results_received || CAST(u.got AS text[])) WITH ORDINALITY AS t(x, n) ORDER BY x, n) "
        "FROM unnest(%s::text[], %s::text[]) AS u(cid, got) WHERE r.correlation_id = u.cid",
        [cids, [literal(results[c]) for c in cids]],
    )


def handle(cur, stream, entries):
    rows, results = {}, {}

    def merge(media_id, cols, service):
        current, services = rows.setdefault(media_id, ({}, []))
        current.update(cols)
        if service and service not in services:
            services.append(service)

    def result(fields, name):
        cid = fields.get("correlationId")
        if cid:
            got = results.setdefault(cid, [])
            if name not in got:
                got.append(name)

    if stream == INSIGHTS:
        for _, f in entries:
            service = f.get("service")
            cols = {c: parse(f[field]) for c, field, parse, _ in COLUMNS if f.get(field) not in (None, "", "null")}
            merge(int(f["mediaId"]), cols, service if service in SERVICES else None)
            result(f, service or "insights")
        upsert_insights(cur, rows)
        update_requests(cur, results)
    elif stream == FACES:
        faces = {}
        for _, f in entries:
            media_id = int(f["mediaId"])
            listed = json.loads(f.get("faces") or "[]")
            cols = {"face_detection_status": "COMPLETED", "faces_detected": len(listed)}
            if f.get("postId"):
                cols["post_id"] = int(f["postId"])
            if f.get("correlationId"):
                cols["correlation_id"] = f["correlationId"]
            merge(media_id, cols, "face_detection")
            for face in listed:
                x0, y0, x1, y1 = face["bbox"]
                emb = face.get("embedding")
                emb = json.dumps(emb) if emb and any(emb) else None
                faces[(media_id, face["faceId"])] = (cols.get("post_id"), x0, y0, x1 - x0, y1 - y0, face.get("confidence"), emb)
            result(f, "face_detection")
        upsert_insights(cur, rows)
        if faces:
            keys = sorted(faces)
            cols = list(zip(*(faces[k] for k in keys)))
            cur.execute(
                "INSERT INTO media_detected_faces AS target (media_id, face_id, post_id, bbox_x, bbox_y, bbox_width, bbox_height, confidence, embedding) "
                "SELECT m, f, p, x, y, w, h, c, CAST(translate(e, '[]', '{}') AS real[]) FROM unnest(%s::int8[], %s::text[], %s::int8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::text[]) AS u(m, f, p, x, y, w, h, c, e) "
                "ON CONFLICT (media_id, face_id) DO UPDATE SET post_id = EXCLUDED.post_id, bbox_x = EXCLUDED.bbox_x, bbox_y = EXCLUDED.bbox_y, "
                "bbox_width = EXCLUDED.bbox_width, bbox_height = EXCLUDED.bbox_height, confidence = EXCLUDED.confidence, embedding = EXCLUDED.embedding",
                [[k[0] for k in keys], [k[1] for k in keys], *[list(c) for c in cols[:7]]],
            )
        update_requests(cur, results)
    elif stream == ERRORS:
        ids = [i for i, _ in entries]
        cids = [f.get("correlationId") or None for _, f in entries]
        cur.execute(
            "INSERT INTO ml_processing_errors (source_stream, entry_id, correlation_id, error, status) "
            "SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) ON CONFLICT DO NOTHING",
            [stream, ids, cids, [f["error"] for _, f in entries], [f.get("status", "FAILED") for _, f in entries]],
        )
        failed = {f["correlationId"]: f["error"] for _, f in entries if f.get("correlationId")}
        if failed:
            keys = sorted(failed)
            cur.execute(
                "UPDATE ml_requests AS r SET status = 'FAILED', error = u.error FROM unnest(%s::text[], %s::text[]) AS u(cid, error) "
                "WHERE r.correlation_id = u.cid AND r.status = 'PENDING'",
                [keys, [failed[k] for k in keys]],
            )


def main():
    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), decode_responses=True)
    db = psycopg.connect(os.environ["DATABASE_URL"], autocommit=False)
    keys = [PREFIX + s for s in (INSIGHTS, FACES, ERRORS)]
    for key in keys:
        try:
            r.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        reply = r.xreadgroup(GROUP, "baseline", {k: ">" for k in keys}, count=BATCH, block=200)
        for key, entries in reply or []:
            stream = key[len(PREFIX):]
            with db.transaction(), db.cursor() as cur:
                cur.execute(
                    "INSERT INTO processed_entries (stream, entry_id, plugin, plugin_version) "
                    "SELECT %s, unnest(%s::text[]), 'baseline', '1' ON CONFLICT DO NOTHING RETURNING entry_id",
                    [stream, sorted(i for i, _ in entries)],
                )
                claimed = {row[0] for row in cur.fetchall()}
                handle(cur, stream, [(i, f) for i, f in entries if i in claimed])
            r.xack(key, GROUP, *[i for i, _ in entries])
    return 0


if __name__ == "__main__":
    sys.exit(main())
