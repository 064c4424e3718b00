"""Handlers for the SQS dead-letter replay tests; they report what they saw through a file.

SR_OUT: file that gets one JSON line per handled message: its body, the esm-replay-count message
attribute (null without one) and its `tenant` attribute. SR_POISON: comma-separated bodies that
fail until the file SR_FIXED exists.
"""

from __future__ import annotations

import json
import os
from typing import Any


def picky(event: dict[str, Any], context: Any) -> None:
    poison = set(filter(None, os.environ.get("SR_POISON", "").split(",")))
    fixed = os.path.exists(os.environ["SR_FIXED"])
    lines = []
    for record in event["Records"]:
        body = record["body"]
        if body in poison and not fixed:
            raise ValueError(f"cannot handle {body}")
        attributes = record["messageAttributes"]
        seen = {
            "value": body,
            "replay": (attributes.get("esm-replay-count") or {}).get("stringValue"),
            "tenant": (attributes.get("tenant") or {}).get("stringValue"),
        }
        lines.append(json.dumps(seen) + "\n")
    # One write with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ["SR_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)
