"""One JSON Lines record, read one way by calibration (grape.data.text) and evaluation
(grape.data.heldout): one object per line, its text in a named field, errors naming file:line."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from grape.errors import DataError


def parse_line(line: str, text_field: str, where: Callable[[], str], fix: str) -> dict | None:
    """The record of one JSONL line, None for a blank line. Its `text_field` holds a string or
    null (no text); anything else is a DataError naming where() (called on errors only: counting
    lines is the caller's cost) and how to `fix` it."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where()} is not valid JSON ({exc.msg}); each line of a .jsonl file "
                        f"must be one JSON object") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where()} has no {text_field!r} field (it has {keys}); {fix}")
    if not is_text(record[text_field]):
        raise not_text(record[text_field], text_field, where())
    return record


def is_text(value: Any) -> bool:
    """A document's text is a string, or null for none. Numbers, lists and objects are not:
    stringified, they would calibrate on "[1, 2]" or "{'a': ...}" instead of the intended text."""
    return value is None or isinstance(value, str)


def not_text(value: Any, text_field: str, where: str) -> DataError:
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, (int, float)):
        kind = "a number"
    else:
        kind = {list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    return DataError(f"{where}: field {text_field!r} holds {kind} ({str(value)[:40]}), not a "
                     "string; --text-field must name the field holding the text")
