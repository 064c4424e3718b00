"""Kafka-shaped handlers for runtime tests: each record's value says how to misbehave.

Values handled normally are appended, one per line, to the file named by $HANDLED_FILE, so a
test can tell exactly which records were handled and how often. $STARTED_FILE, when set, gets a
line each time an invocation starts.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from typing import Any


def _values(event: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(r["value"]) for part in event["records"].values() for r in part]


def _append(env: str, lines: list[bytes]) -> None:
    path = os.environ.get(env)
    if path and lines:
        with open(path, "ab") as f:
            f.write(b"".join(line + b"\n" for line in lines))


def misbehave(event: dict[str, Any], context: Any) -> None:
    values = _values(event)
    _append("STARTED_FILE", [context.aws_request_id.encode()])
    for value in values:
        if value.startswith(b"sleep"):
            time.sleep(float(value.split(b":")[1]) if b":" in value else 3600)
        elif value == b"exit":
            os._exit(3)
        elif value == b"kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif value == b"alloc":
            block = bytearray(context.memory_limit_in_mb * 2 * 1024 * 1024)
            for offset in range(0, len(block), 4096):
                block[offset] = 1
        elif value == b"raise":
            raise ValueError("bad record")
    _append("HANDLED_FILE", values)


def slow_batch(event: dict[str, Any], context: Any) -> None:
    """Sleeps $SLOW_S on every invocation, after announcing it started."""
    _append("STARTED_FILE", [context.aws_request_id.encode()])
    time.sleep(float(os.environ.get("SLOW_S", "3")))
    _append("HANDLED_FILE", _values(event))


def picky(event: dict[str, Any], context: Any) -> None:
    """Fails records whose JSON id is in $POISON_IDS until the file $FIXED_FILE exists."""
    import json

    poison = {int(i) for i in os.environ.get("POISON_IDS", "").split(",") if i}
    fixed = os.path.exists(os.environ.get("FIXED_FILE", "/nonexistent"))
    values = _values(event)
    for value in values:
        if json.loads(value)["id"] in poison and not fixed:
            raise ValueError(f"cannot handle {value.decode()}")
    time.sleep(float(os.environ.get("SLOW_S", "0")))
    _append("HANDLED_FILE", values)
