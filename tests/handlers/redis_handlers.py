"""Handlers for the Redis Streams integration tests: record each handled entry, fail on poison.

`REDIS_TEST_LOG` names the file each successful invocation appends its entries to, one
`<tag> <stream> <id>` line each; `REDIS_TEST_TAG` tells runs apart and `REDIS_TEST_SLEEP_S`
slows every invocation down. An entry with the field `poison` set to `1` fails its batch.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Any


def _items(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for items in event["records"].values() for item in items]


def log_ids(event: dict[str, Any], context: Any) -> None:
    items = _items(event)
    for item in items:
        if base64.b64decode(item["fields"].get("poison", "")) == b"1":
            raise ValueError(f"poison entry {item['stream']} {item['id']}")
    delay = float(os.environ.get("REDIS_TEST_SLEEP_S") or 0)
    if delay:
        time.sleep(delay)
    tag = os.environ.get("REDIS_TEST_TAG", "-")
    lines = "".join(f"{tag} {item['stream']} {item['id']}\n" for item in items)
    # One write with O_APPEND: lines of concurrent environments never interleave.
    fd = os.open(os.environ["REDIS_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def noop(event: dict[str, Any], context: Any) -> None:
    return None
