"""TEST FIXTURE — never deploy. A Python handler with a bug: it looks the field `key` up in an
empty dict, so `key=label` raises `KeyError('label')`. The host reads the exception and its frames
from the traceback componentize-py prints."""

import wit_world
from wit_world.imports import types as t

from kaleidoscope_sdk import Fields, insert

LABELS = {}


def label_of(fields: Fields) -> str:
    return LABELS[fields.required("key")]


class WitWorld(wit_world.WitWorld):
    def manifest(self) -> t.Manifest:
        return t.Manifest("python-raising", "0.1.0", ["mock-python"])

    def handle(self, entry: t.Entry) -> list:
        fields = Fields(entry)
        return [insert("ml_processing_errors", {"error_message": label_of(fields)})]
