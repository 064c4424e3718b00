"""Handlers the benchmark runs under `workers run`. Each appends one line per invocation to the
file named by $BENCH_OUT: `start end records` (wall clock), so throughput is measured from the
first invocation to the last, without process start-up or group join."""

from __future__ import annotations

import binascii
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson

_files: dict[str, int] = {}


def _write(line: str) -> None:
    path = os.environ["BENCH_OUT"]
    fd = _files.get(path)
    if fd is None:
        fd = _files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One O_APPEND write per invocation: lines from threads and processes never interleave.
    os.write(fd, line.encode())


def _groups(event: dict[str, Any]) -> Any:
    if "Records" in event:  # SQS and kombu: one list
        return (event["Records"],)
    groups = event.get("records")
    if groups is None:
        groups = event["rmqMessagesByQueue"]
    return groups.values()


def count(event: dict[str, Any]) -> int:
    return sum(len(items) for items in _groups(event))


def values(event: dict[str, Any]) -> Iterator[bytes]:
    """Every record's value, decoded from base64 where the event carries it so, for the four
    event shapes."""
    a2b = binascii.a2b_base64
    for items in _groups(event):
        for item in items:
            if "body" in item:  # SQS and kombu: the body as text (the bench's are JSON)
                yield item["body"].encode()
            elif "data" in item:  # RabbitMQ
                yield a2b(item["data"])
            elif "fields" in item:  # Redis Streams
                yield a2b(item["fields"]["v"])
            else:  # Kafka
                yield a2b(item["value"])


def noop(event: dict[str, Any], context: Any) -> None:
    started = time.time()
    n = count(event)
    _write(f"{started:.6f} {time.time():.6f} {n}\n")


def io_bound(event: dict[str, Any], context: Any) -> None:
    """Waits 2 ms per record, as a handler calling a slow downstream service would."""
    started = time.time()
    n = count(event)
    time.sleep(0.002 * n)
    _write(f"{started:.6f} {time.time():.6f} {n}\n")


def latency(event: dict[str, Any], context: Any) -> None:
    """Records, per record, the time from its producer's stamp to this invocation's start."""
    started = time.time()
    pairs = []
    n = 0
    for value in values(event):
        doc = orjson.loads(value)
        n += 1
        if not doc.get("warm"):
            stamp = doc["ts"]
            pairs.append(f"{stamp:.6f},{(started - stamp) * 1000:.3f}")
    _write(f"{started:.6f} {time.time():.6f} {n}\nL {' '.join(pairs)}\n")


def poison(event: dict[str, Any], context: Any) -> None:
    """Fails the whole batch when one of its records is marked poison."""
    started = time.time()
    n = 0
    bad = False
    for value in values(event):
        n += 1
        bad = bad or b'"poison":true' in value
    _write(f"{started:.6f} {time.time():.6f} {n}\n")
    if bad:
        raise ValueError("poison record in batch")
