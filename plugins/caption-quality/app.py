"""Handler for `caption-quality-results`: the caption scorer's verdict on a media's caption,
one row per media in `caption_quality` (created by `migrations/0001_caption_quality.sql`).

Fields: `mediaId` (integer, required), `score` (0..1, required), `model` (optional),
`correlationId` (optional). Setting `min_score` (default 0): scores below it are stored with
`flagged = true`.
"""

import wit_world
from wit_world.imports import types as t

from kaleidoscope_sdk import NOW, Fields, malformed, setting, upsert

NAME = "caption-quality"
VERSION = "0.1.0"
STREAM = "caption-quality-results"


class WitWorld(wit_world.WitWorld):
    def manifest(self) -> t.Manifest:
        return t.Manifest(NAME, VERSION, [STREAM])

    def handle(self, entry: t.Entry) -> list:
        fields = Fields(entry)
        media_id = fields.required_int("mediaId")
        score = fields.required_float("score")
        if not 0.0 <= score <= 1.0:
            raise malformed(f"field `score`: {score} is not between 0 and 1")
        min_score = float(setting("min_score") or "0")
        return [
            upsert(
                "caption_quality",
                key={"media_id": media_id},
                set={
                    "score": score,
                    "model": fields.get("model"),
                    "flagged": score < min_score,
                    "updated_at": NOW,
                },
            )
        ]
