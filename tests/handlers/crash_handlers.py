"""Handlers for the crash tests: record whole events, kill the poller, break the engine.

CRASH_EVENTS: file that gets each successful invocation's event, one JSON line each.
CRASH_POISON: a payload value (Kafka `value`, RabbitMQ `data`, Redis field `n`) on which
`exit_on_poison` ends the whole process with `os._exit` (under `isolation: thread` that is the
poller itself). CRASH_MARKER: a file `break_engine_once` creates on its first call, when it
breaks the poller's settle path so that the batch fails in the engine, not in the handler.
"""

from __future__ import annotations

import base64
import gc
import os
from typing import Any

import orjson


def _append(path: str, data: bytes) -> None:
    # One write per call with O_APPEND: lines from concurrent invocations never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _payloads(event: dict[str, Any]) -> list[bytes]:
    if "rmqMessagesByQueue" in event:
        items = [m for q in event["rmqMessagesByQueue"].values() for m in q]
        return [base64.b64decode(m["data"]) for m in items]
    items = [r for part in event["records"].values() for r in part]
    if items and "fields" in items[0]:
        return [base64.b64decode(r["fields"].get("n", "")) for r in items]
    return [base64.b64decode(r["value"]) for r in items]


def record_events(event: dict[str, Any], context: Any) -> None:
    _append(os.environ["CRASH_EVENTS"], orjson.dumps(event) + b"\n")


def exit_on_poison(event: dict[str, Any], context: Any) -> None:
    """Kills the process (no exception, no cleanup) when the batch holds the poison payload."""
    if os.environ["CRASH_POISON"].encode() in _payloads(event):
        os._exit(7)
    record_events(event, context)


def break_engine_once(event: dict[str, Any], context: Any) -> None:
    """On the first call only: make the poller's settling raise, as a bug in the engine would."""
    marker = os.environ["CRASH_MARKER"]
    if not os.path.exists(marker):
        _append(marker, b"broken\n")
        from workers.engine.poller import Poller

        def broken(records: Any) -> None:
            raise RuntimeError("injected: settling failed")

        gc.unfreeze()  # the poller process froze what it built at start, the Poller with it
        for obj in gc.get_objects():
            if isinstance(obj, Poller):
                obj.runner.settle = broken
    record_events(event, context)


def busy(event: dict[str, Any], context: Any) -> None:
    """Says it started (CRASH_EVENTS), then stays busy for a minute."""
    record_events(event, context)
    import time

    time.sleep(60)
