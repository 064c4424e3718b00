"""`workers validate --connect` for Redis: what the source would read, and whether a dead-letter
stream can take letters (a mapping never starts with letters that nothing can store: they would
stall their partition until it is fixed)."""

from __future__ import annotations

from typing import Any

import redis

from connectors.redis import config as cfg
from connectors.redis.client import group_info, log, redis_client, source_streams
from workers.engine.probing import DestinationUnusable
from workers.engine.redact import redact_url


def probe_redis(src: cfg.RedisSource) -> None:
    """PING the server and log whether each stream and the consumer group exist."""
    client = redis_client(src.url)
    where = redact_url(src.url)
    try:
        client.ping()
        for stream in source_streams(src):
            kind: Any = client.type(stream)
            if kind == b"none":
                log.info(
                    "%s: stream %s does not exist yet; it is created with group %s at start",
                    where,
                    stream,
                    src.consumer_group,
                )
                continue
            if kind != b"stream":
                raise ValueError(f"{where}: key {stream} is a {kind.decode()}, not a stream")
            length: Any = client.xlen(stream)
            info = group_info(client.xinfo_groups(stream), src.consumer_group)
            if info is None:
                log.info(
                    "%s: stream %s has %d entries; group %s is created at start",
                    where,
                    stream,
                    length,
                    src.consumer_group,
                )
            else:
                log.info(
                    "%s: stream %s has %d entries; group %s has %d pending, lag %s",
                    where,
                    stream,
                    length,
                    src.consumer_group,
                    info["pending"],
                    info.get("lag"),
                )
    finally:
        client.close()


def probe_destination(dst: cfg.RedisDestination) -> str:
    where = redact_url(dst.url)
    client = redis_client(dst.url)
    try:
        # A replica answers reads but refuses XADD: letters need the primary.
        role: Any = client.info("replication").get("role")
        if role != "master":
            raise DestinationUnusable(f"{where} is a read-only {role}: letters cannot be added")
        kind: Any = client.type(dst.stream)
        if kind not in (b"none", b"stream"):
            raise DestinationUnusable(
                f"{where}: key {dst.stream!r} is a {kind.decode()}, not a stream"
            )
    except redis.RedisError as exc:
        raise DestinationUnusable(f"cannot use {where}: {exc}") from None
    finally:
        client.close()
    return f"stream {dst.stream!r} at {where} can take letters"
