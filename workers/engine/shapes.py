"""What every event shape shares: the size estimate of a record and how filters see a payload.

The shapes themselves, one per connector, live in `connectors/<broker>/shape.py`.
"""

from __future__ import annotations

from typing import Any

import orjson

# Bytes of JSON punctuation and coordinates each record adds to an event, besides its payload.
RECORD_OVERHEAD_BYTES = 160


def encoded_size(value: bytes, key: bytes | None = None, extra: int = 0) -> int:
    """Approximate bytes a record adds to an event: base64 grows its payload by 4/3."""
    raw = len(value) + (len(key) if key else 0)
    return (raw + 2) // 3 * 4 + RECORD_OVERHEAD_BYTES + extra


def decoded(data: bytes) -> Any:
    """What filter patterns see of a payload: its JSON if it is JSON, else its text."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


def int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            return int(value)
        except ValueError:  # digits int() does not read, such as "²"
            return None
    return None
