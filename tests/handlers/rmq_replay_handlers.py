"""Handlers for the RabbitMQ dead-letter replay tests; they report what they saw through a file.

RR_OUT: file that gets one JSON line per handled message: its value, the esm-replay-count header
(null without one), its messageId, contentType and `tenant` header. RR_POISON: comma-separated
values that fail until the file RR_FIXED exists. Values starting with "forever" always fail.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any


def _signed_bytes(value: Any) -> str | None:
    # String headers appear as Lambda shows them: {"bytes": [signed Java bytes]}.
    if isinstance(value, dict) and isinstance(value.get("bytes"), list):
        return bytes(b & 0xFF for b in value["bytes"]).decode()
    return None


def picky(event: dict[str, Any], context: Any) -> None:
    poison = set(filter(None, os.environ.get("RR_POISON", "").split(",")))
    fixed = os.path.exists(os.environ["RR_FIXED"])
    lines = []
    for messages in event["rmqMessagesByQueue"].values():
        for message in messages:
            value = base64.b64decode(message["data"]).decode()
            if value.startswith("forever") or (value in poison and not fixed):
                raise ValueError(f"cannot handle {value}")
            props = message["basicProperties"]
            headers = props.get("headers") or {}
            seen = {
                "value": value,
                "replay": headers.get("esm-replay-count"),
                "messageId": props.get("messageId"),
                "contentType": props.get("contentType"),
                "tenant": _signed_bytes(headers.get("tenant")),
            }
            lines.append(json.dumps(seen) + "\n")
    # One write with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ["RR_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)
