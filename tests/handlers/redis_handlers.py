"""Handlers for the Redis Streams integration tests: record each handled entry, fail on poison.

`REDIS_TEST_LOG` names the file each successful invocation appends its entries to, one
`<tag> <stream> <id>` line each; `REDIS_TEST_TAG` tells runs apart and `REDIS_TEST_SLEEP_S`
slows every invocation down. An entry with the field `poison` set to `1` fails its batch.
"""

from __future__ import annotations

import base64
import json
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


def dump_fields_then_fail(event: dict[str, Any], context: Any) -> None:
    """Append each entry's fields, as the event has them and as `workers.events` reads them
    (names in hex), to `REDIS_TEST_LOG` as JSON lines, then fail the batch."""
    from workers.events import records

    lines = []
    items = _items(event)
    for item, record in zip(items, records(event), strict=True):
        read = {
            name.encode("utf-8", "surrogateescape").hex(): value.decode()
            for name, value in record.fields.items()
        }
        lines.append(json.dumps({"event": item["fields"], "read": read}) + "\n")
    with open(os.environ["REDIS_TEST_LOG"], "a") as f:
        f.write("".join(lines))
    raise ValueError("dead-letter every entry")


def throttled_then_log_ids(event: dict[str, Any], context: Any) -> None:
    """Raise `workers.Throttled` for the first `REDIS_TEST_THROTTLES` invocations (counted in
    the file `REDIS_TEST_THROTTLE_FILE`, across execution environments), then `log_ids`."""
    from workers import Throttled

    path = os.environ["REDIS_TEST_THROTTLE_FILE"]
    done = os.path.getsize(path) if os.path.exists(path) else 0
    if done < int(os.environ["REDIS_TEST_THROTTLES"]):
        with open(path, "a") as f:
            f.write("t")
        raise Throttled("the downstream answered 429")
    log_ids(event, context)
