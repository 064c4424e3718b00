"""`workers validate --connect` for a Redis dead-letter stream: it exists and can be written, so a
mapping never starts with letters that nothing can store (they would stall their partition until
it is fixed)."""

from __future__ import annotations

from typing import Any

from connectors.redis import config as cfg
from workers.engine.probing import DestinationUnusable
from workers.engine.redact import redact_url


def probe_destination(dst: cfg.RedisDestination) -> str:
    import redis

    from connectors.redis.connector import redis_client

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
