"""Handlers for the Redis dead-letter replay tests; they report what they saw through a file.

RDLQ_OUT: file that gets one JSON line per handled entry: its stream, its `n` field and its
`esm-replay-count` field (null without one). An entry whose `fail` field is `value` raises
ValueError, and `key` KeyError, until the file RDLQ_FIXED exists; `forever` always fails.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any


def picky(event: dict[str, Any], context: Any) -> None:
    fixed = os.path.exists(os.environ["RDLQ_FIXED"])
    lines = []
    for stream, items in event["records"].items():
        for item in items:
            fields = {k: base64.b64decode(v).decode() for k, v in item["fields"].items()}
            fail = fields.get("fail")
            if fail == "forever" or (fail == "value" and not fixed):
                raise ValueError(f"cannot handle {fields['n']}")
            if fail == "key" and not fixed:
                raise KeyError(fields["n"])
            seen = {
                "stream": stream,
                "n": int(fields["n"]),
                "replay": fields.get("esm-replay-count"),
            }
            lines.append(json.dumps(seen) + "\n")
    # One write with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ["RDLQ_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)
