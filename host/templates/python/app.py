"""Handler for `{{stream}}`: one row per media in `{{table}}` (created by
`migrations/<time>_{{table}}.sql`).

Fields: `mediaId` (integer, required), `label` (text, required). Setting `prefix`
(`[plugins.{{name}}.settings]`, default none): prepended to every label.
"""

import wit_world
from wit_world.imports import types as t

from kaleidoscope_sdk import NOW, Fields, log_info, setting, upsert

NAME = "{{name}}"
VERSION = "0.1.0"
STREAM = "{{stream}}"
TABLE = "{{table}}"


class WitWorld(wit_world.WitWorld):
    def manifest(self) -> t.Manifest:
        return t.Manifest(NAME, VERSION, [STREAM])

    def handle(self, entry: t.Entry) -> list:
        fields = Fields(entry)
        media_id = fields.required_int("mediaId")
        label = (setting("prefix") or "") + fields.required("label")
        log_info(f"media {media_id} is labelled {label!r}")
        return [
            upsert(TABLE, key={"media_id": media_id}, set={"label": label, "updated_at": NOW})
        ]
