"""Fitting dead letters to what their destination takes: the limit it states or taught by refusals,
and the letter of a record too large for any letter, kept without its payload."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson

# Wire names of a letter whose payload was left out: `"payloadOmitted": true`, and under
# "omitted" the record's itemIdentifier, the condition it failed with, and the sizes involved.
PAYLOAD_OMITTED = "payloadOmitted"
OMITTED = "omitted"
# A letter without payload keeps its error, cut to this many characters of message and of stack
# trace: a handler may put the record itself in its exception, and the letter must stay small.
ERROR_KEEP_CHARS = 4096


def letter_bytes(letter: dict[str, Any]) -> int:
    """Bytes of the letter's JSON body, as every destination serializes it."""
    return len(orjson.dumps(letter))


def without_payload(
    letter: dict[str, Any],
    item_identifier: Any,
    *,
    condition: str,
    letter_bytes: int,
    limit_bytes: int | None,
) -> dict[str, Any]:
    """`letter` (of one record) with its payload left out and its error bounded.

    The batch-info section keeps the record's coordinates, so the record can still be found on
    its source (or its backups) while the letter fits any destination.
    """
    out = {k: v for k, v in letter.items() if k != "payload"}
    request = dict(letter.get("requestContext") or {})
    original = request.get("condition", condition)
    request["condition"] = condition
    out["requestContext"] = request
    error = letter.get("error")
    if isinstance(error, dict):
        out["error"] = _bounded(error)
    out[PAYLOAD_OMITTED] = True
    out[OMITTED] = {
        "itemIdentifier": item_identifier,
        "condition": original,
        "letterBytes": letter_bytes,
        "limitBytes": limit_bytes,
    }
    return out


def with_bounded_error(letter: dict[str, Any]) -> dict[str, Any] | None:
    """`letter` with its error cut to ERROR_KEEP_CHARS, or None when it has nothing to cut:
    tried before leaving out a payload, which the letter needs to be replayed."""
    error = letter.get("error")
    if not isinstance(error, dict) or error.get("truncated"):
        return None
    bounded = _bounded(error)
    return {**letter, "error": bounded} if bounded.get("truncated") else None


def _bounded(error: dict[str, Any]) -> dict[str, Any]:
    message = str(error.get("errorMessage", ""))
    trace = [str(line) for line in error.get("stackTrace") or []]
    kept: list[str] = []
    room = ERROR_KEEP_CHARS
    # The innermost frames (the end of the trace) say most about where it failed.
    for line in reversed(trace):
        if len(line) > room:
            break
        kept.insert(0, line)
        room -= len(line)
    out = dict(error)
    out["errorMessage"] = message[:ERROR_KEEP_CHARS]
    out["stackTrace"] = kept
    if len(message) > ERROR_KEEP_CHARS or len(kept) < len(trace):
        out["truncated"] = True
    return out


class LetterLimit:
    """The largest letter body a destination takes: what it states, lowered by what its
    refusals for size taught. None while nothing is known."""

    def __init__(self, stated: Callable[[], int | None] | None = None) -> None:
        self._stated = stated
        self._learned: int | None = None
        self._lock = threading.Lock()  # lanes of one mapping share their dead letters

    def bytes(self) -> int | None:
        stated = self._stated() if self._stated is not None else None
        known = [n for n in (stated, self._learned) if n is not None]
        return min(known) if known else None

    def refused(self, size_bytes: int, limit_bytes: int | None) -> None:
        """A letter of `size_bytes` was refused (the refusal naming `limit_bytes`, or None):
        no letter that large or larger fits."""
        bound = size_bytes - 1 if limit_bytes is None else min(size_bytes - 1, limit_bytes)
        with self._lock:
            self._learned = bound if self._learned is None else min(self._learned, bound)
