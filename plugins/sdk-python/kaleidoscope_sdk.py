"""Helpers for Kaleidoscope result handlers written in Python (contract kaleidoscope:handler@0.3.0).

A handler turns one Redis Streams entry into persistence commands; the host validates and runs
them. The classes of the contract come from the bindings componentize-py generates from the WIT
(`wit_world.imports.types`); these helpers spare you spelling them out:

    from kaleidoscope_sdk import Fields, upsert, malformed
    fields = Fields(entry)
    return [upsert("caption_quality", key={"media_id": fields.required_int("mediaId")},
                   set={"score": fields.required_float("score")})]
"""

import json
import math
from typing import Any, Dict, List, Optional

from componentize_py_types import Err
from wit_world.imports import config as _config
from wit_world.imports import log as _log
from wit_world.imports import types as t

NOW = t.Value_Now()
"""The `now` value: the start time of the transaction that persists the entry."""


def value(v: Any) -> t.Value:
    """A Python value as a typed column value: None, bool, int, float, str, a list of str or of
    float, a dict (JSON), or a value of the contract (e.g. NOW) as it is."""
    if v is None:
        return t.Value_Null()
    if isinstance(v, bool):
        return t.Value_Boolean(v)
    if isinstance(v, int):
        return t.Value_Integer(v)
    if isinstance(v, float):
        return t.Value_Float(v)
    if isinstance(v, str):
        return t.Value_Text(v)
    if isinstance(v, dict):
        return t.Value_Json(json.dumps(v))
    if isinstance(v, list) and all(isinstance(i, str) for i in v):
        return t.Value_TextArray(v)
    if isinstance(v, list) and all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in v):
        return t.Value_FloatArray([float(i) for i in v])
    if isinstance(v, (t.Value_Null, t.Value_Boolean, t.Value_Integer, t.Value_Float, t.Value_Text,
                      t.Value_Json, t.Value_TextArray, t.Value_FloatArray, t.Value_Timestamp,
                      t.Value_Now)):
        return v
    raise TypeError(f"no column value for {type(v).__name__}")


def _columns(values: Dict[str, Any]) -> List[t.ColumnValue]:
    return [t.ColumnValue(column, value(v)) for column, v in values.items()]


def upsert(table: str, key: Dict[str, Any], set: Dict[str, Any]) -> t.Command:
    """Insert the row with `key`, or update its `set` columns if it exists."""
    sets = [t.ColumnSet(column, t.ColumnOp_Assign(value(v))) for column, v in set.items()]
    return t.Command_Upsert(t.Upsert(table, _columns(key), sets))


def insert(table: str, values: Dict[str, Any], ignore_conflict: bool = True) -> t.Command:
    """Insert one row; on a unique conflict keep the existing row (or fail the entry)."""
    on_conflict = t.OnConflict.IGNORE if ignore_conflict else t.OnConflict.ERROR
    return t.Command_Insert(t.Insert(table, _columns(values), on_conflict))


def emit(target: str, fields: Dict[str, str]) -> t.Command:
    """Publish a message to stream `target` once the entry's transaction has committed."""
    return t.Command_Emit(t.Emit(target, list(fields.items())))


def malformed(reason: str) -> Err:
    """The entry can never succeed: raise this and the host dead-letters it as `malformed`."""
    return Err(t.Failure_Malformed(reason))


def retry(reason: str) -> Err:
    """The entry may succeed later: raise this and the host delivers it again."""
    return Err(t.Failure_Retry(reason))


def setting(key: str) -> Optional[str]:
    """The operator's setting `key` (`[plugins.<name>.settings]`), or None."""
    return _config.get(key)


def log_info(message: str) -> None:
    """A line in the host's log, tagged with plugin, stream and entry."""
    _log.log(_log.Level.INFO, message)


def log_warn(message: str) -> None:
    """A warning in the host's log, tagged with plugin, stream and entry."""
    _log.log(_log.Level.WARN, message)


_QUOTE_LIMIT = 60
"""How much of a bad value an error quotes (as the Rust SDK does)."""


def _quote(v: str) -> str:
    """A value quoted for an error message the way the Rust SDK quotes it: in double quotes,
    cut to a readable length with its size in bytes."""
    if len(v) > _QUOTE_LIMIT:
        return f"{json.dumps(v[:_QUOTE_LIMIT], ensure_ascii=False)}… ({len(v.encode())} bytes)"
    return json.dumps(v, ensure_ascii=False)


class Fields:
    """An entry's fields by name. Absent, empty and `"null"` values count as missing, as the
    real producers send them; errors name the field."""

    def __init__(self, entry: t.Entry):
        self._fields = {}
        for name, v in entry.fields:
            self._fields.setdefault(name, v)

    def get(self, name: str) -> Optional[str]:
        v = self._fields.get(name)
        if v is None or v.strip() in ("", "null", "None"):
            return None
        return v.strip()

    def required(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise malformed(f"missing field `{name}`")
        return v

    def int(self, name: str) -> Optional[int]:
        v = self.get(name)
        if v is None:
            return None
        try:
            return int(v)
        except ValueError:
            raise malformed(f"field `{name}`: expected an integer, got {_quote(v)}")

    def required_int(self, name: str) -> int:
        self.required(name)
        return self.int(name)

    def float(self, name: str) -> Optional[float]:
        v = self.get(name)
        if v is None:
            return None
        try:
            f = float(v)
        except ValueError:
            f = math.nan
        if not math.isfinite(f):
            raise malformed(f"field `{name}`: expected a finite number, got {_quote(v)}")
        return f

    def required_float(self, name: str) -> float:
        self.required(name)
        return self.float(name)
