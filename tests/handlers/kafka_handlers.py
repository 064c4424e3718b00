"""Handlers for the Kafka integration tests; they report what they saw through files.

KAFKA_OUT: file that gets one line per handled record, "partition offset key value" (key "-"
when null). KAFKA_POISON: comma-separated values that make an invocation fail. KAFKA_SLEEP_S:
seconds to sleep per invocation.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Any


def _append(env: str, text: str) -> None:
    # One write per call with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ[env], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def record_lines(event: dict[str, Any], context: Any) -> None:
    """Appends a line per record to $KAFKA_OUT; fails the batch if it holds a poison value."""
    lines: list[str] = []
    values: set[str] = set()
    for part in event["records"].values():
        for r in part:
            key = base64.b64decode(r["key"]).decode() if "key" in r else "-"
            value = base64.b64decode(r["value"]).decode()
            values.add(value)
            lines.append(f"{r['topic']}-{r['partition']} {r['offset']} {key} {value}\n")
    sleep_s = float(os.environ.get("KAFKA_SLEEP_S", "0"))
    if sleep_s:
        time.sleep(sleep_s)
    poison = set(filter(None, os.environ.get("KAFKA_POISON", "").split(",")))
    bad = poison & values
    if bad:
        raise ValueError(f"poison: {sorted(bad)}")
    if lines:
        _append("KAFKA_OUT", "".join(lines))
