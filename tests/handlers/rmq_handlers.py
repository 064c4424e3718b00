"""Handlers for the RabbitMQ integration tests; they report what they saw through files.

RMQ_OUT: file that gets one line per handled record value. RMQ_POISON: comma-separated values
that make an invocation fail. RMQ_SLEEP_S: seconds to sleep per invocation. RMQ_INVOCATIONS:
file that gets one JSON line per invocation (attempt and values).
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any


def _values(event: dict[str, Any]) -> list[str]:
    return [
        base64.b64decode(message["data"]).decode()
        for messages in event["rmqMessagesByQueue"].values()
        for message in messages
    ]


def _append(env: str, text: str) -> None:
    # One write per call with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ[env], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def record_values(event: dict[str, Any], context: Any) -> None:
    """Appends each value to $RMQ_OUT; fails the batch if it holds a value from $RMQ_POISON."""
    values = _values(event)
    poison = set(filter(None, os.environ.get("RMQ_POISON", "").split(",")))
    sleep_s = float(os.environ.get("RMQ_SLEEP_S", "0"))
    if sleep_s:
        time.sleep(sleep_s)
    bad = poison.intersection(values)
    if bad:
        raise ValueError(f"poison: {sorted(bad)}")
    if values:
        _append("RMQ_OUT", "".join(f"{v}\n" for v in values))


def report_failures(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Reports values starting with "fail" in batchItemFailures on their first attempt."""
    items = [
        (message, base64.b64decode(message["data"]).decode())
        for messages in event["rmqMessagesByQueue"].values()
        for message in messages
    ]
    record = {"attempt": context.attempt, "values": [value for _, value in items]}
    _append("RMQ_INVOCATIONS", json.dumps(record) + "\n")
    queue = next(iter(event["rmqMessagesByQueue"])).split("::")[0]
    failed = [
        {"itemIdentifier": {"queue": queue, "deliveryTag": message["deliveryTag"]}}
        for message, value in items
        if value.startswith("fail") and context.attempt == 1
    ]
    return {"batchItemFailures": failed}
