"""Handlers for the Kafka dead-letter replay tests; they report what they saw through a file.

KDLQ_OUT: file that gets one JSON line per handled record: its topic, partition and offset, its
key, the `n` and `tenant` of its JSON value and header, and its `esm-replay-count` header (null
without one). A record whose value has `"fail": "value"` raises ValueError, and `"fail": "key"`
KeyError, until the file KDLQ_FIXED exists.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any


def picky(event: dict[str, Any], context: Any) -> None:
    fixed = os.path.exists(os.environ["KDLQ_FIXED"])
    lines = []
    for items in event["records"].values():
        for item in items:
            value = json.loads(base64.b64decode(item["value"]))
            headers = {
                name: bytes(data).decode() for h in item["headers"] for name, data in h.items()
            }
            fail = value.get("fail")
            if fail == "value" and not fixed:
                raise ValueError(f"cannot handle {value['n']}")
            if fail == "key" and not fixed:
                raise KeyError(value["n"])
            seen = {
                "topic": item["topic"],
                "partition": item["partition"],
                "offset": item["offset"],
                "key": base64.b64decode(item["key"]).decode() if item.get("key") else None,
                "n": value["n"],
                "tenant": headers.get("tenant"),
                "replay": headers.get("esm-replay-count"),
            }
            lines.append(json.dumps(seen) + "\n")
    # One write with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ["KDLQ_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)
