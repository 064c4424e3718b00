"""pika's field-table decoding made total: no header value can fail a whole frame.

pika 1.x decodes an AMQP timestamp field (`T`) with `datetime.fromtimestamp`, which raises past
year 9999, and a float or double field (`f`, `d`) with `int()`, which raises on NaN and
infinity. Either error escapes the frame decoder: pika drops the connection, the broker
redelivers the message to the next one, and the consumer reconnects forever without ever seeing
it. Here such a timestamp decodes to its raw integer seconds and such a number to the float
itself, so the message reaches the engine (and the handler or the destination) like any other.
Every other field decodes exactly as pika does it. `install()` runs once, when
`connectors.rabbitmq.connection` is imported.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika.data

_Decoder = Callable[[bytes, int], tuple[Any, int]]
_FLOATS = {b"f": (">f", 4), b"d": (">d", 8)}


def _total(original: _Decoder) -> _Decoder:
    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset : offset + 1]
        if kind == b"T":
            (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
            try:
                return datetime.fromtimestamp(seconds, UTC), offset + 9
            except (OverflowError, OSError, ValueError):
                return seconds, offset + 9
        if kind in _FLOATS:
            fmt, size = _FLOATS[kind]
            (number,) = struct.unpack_from(fmt, encoded, offset + 1)
            if not math.isfinite(number):
                return number, offset + 1 + size
        return original(encoded, offset)

    decode_value.esm_total = True  # type: ignore[attr-defined]
    return decode_value


def install() -> None:
    """Replace `pika.data.decode_value`; tables and arrays look it up by name, so they use it."""
    current: Any = pika.data.decode_value
    if getattr(current, "esm_total", False):
        return
    pika.data.decode_value = _total(current)
