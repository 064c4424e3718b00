"""What the Redis source, destination, store and publisher share: the client, the errors worth
retrying, and how server URLs and entry ids compare."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.redis import config as cfg
from connectors.redis.shape import REPLAY_FIELD

log = logging.getLogger("connectors.redis")

RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)

# A blocking XREADGROUP must return before the socket times out: redis-py does not stretch the
# socket timeout for BLOCK, so the block is capped well below it (source.MAX_BLOCK_MS).
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
# Ids per XACK / XCLAIM command, so one command never carries an unbounded argument list.
CHUNK = 1000
# The entry field a replay to the source adds (as the replay header of Kafka and RabbitMQ).
REPLAY_FIELD_BYTES = REPLAY_FIELD.encode()


def redis_client(url: str) -> redis.Redis:
    """A client for `url` (redis://, rediss:// with TLS, unix://; ACL users in the userinfo).

    Bytes in, bytes out: entry values are opaque. Query parameters in the URL (socket_timeout,
    ssl_cert_reqs, ...) override the defaults here, as redis-py's `from_url` applies them last.
    """
    return redis.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S
    )


def server_of(url: str) -> tuple[str, str, int]:
    """(kind, address, db) of a Redis URL: what says whether two URLs reach the same keyspace."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    db_text = query.get("db", [""])[0]
    if parts.scheme == "unix":
        return ("unix", parts.path, int(db_text or 0))
    path_db = parts.path.strip("/")
    host = (parts.hostname or "localhost").lower()
    if host == "localhost":
        host = "127.0.0.1"
    return ("tcp", f"{host}:{parts.port or 6379}", int(path_db or db_text or 0))


def server_label(url: str) -> str:
    """host:port/db of a Redis URL, never its credentials (the event shape's `server`)."""
    kind, address, db = server_of(url)
    return f"unix://{address}/{db}" if kind == "unix" else f"{address}/{db}"


def source_streams(src: cfg.RedisSource) -> list[str]:
    """The streams a source reads, each once, in the order configured."""
    return list(dict.fromkeys(src.streams))


def group_info(groups: Any, group: str) -> Any:
    """The XINFO GROUPS entry of consumer group `group`, or None when the stream has none."""
    name = group.encode()
    return next((g for g in groups if g["name"] == name), None)


# Deletes a consumer from a group when it holds no pending entry, in one step: the entries of a
# deleted consumer could never be claimed again.
_LEAVE_SCRIPT = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


def leave_group(client: redis.Redis, streams: Sequence[str], group: str, consumer: str) -> None:
    """Delete `consumer` from `group` on each stream where it holds no pending entry, so that a
    stopped mapping leaves no consumer behind: `workers rewind` tells a running mapping by its
    consumers, and the names of replaced pods would pile up otherwise."""
    for stream in streams:
        try:
            client.eval(_LEAVE_SCRIPT, 1, stream, group, consumer)
        except RedisError as exc:
            # No group any more, an ACL user without EVAL, a lost connection: it stays listed.
            log.debug("consumer %s kept in group %s on %s: %s", consumer, group, stream, exc)


def id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return (int(ms), int(seq or 0))


def chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]
