"""`workers rewind` for Redis Streams: the consumer group's last-delivered id per stream (XGROUP
SETID), moved to the start of the stream, its last entry, or just before a time.

Pending entries (delivered, never acked): those after the new position are acked, since the
group reads them again from there and each is then handled once; those at or before it stay
pending and are recovered as usual (their consumer re-reads them when it starts, or another
claims them after `claim_idle_s`), so a rewind never drops work that was handed out.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from connectors.redis import config as cfg
from connectors.redis.client import chunks, group_info, redis_client, source_streams
from connectors.redis.shape import timestamp_start_id
from workers.engine.redact import redact_url
from workers.engine.rewind import Move, RewindRefused, RewindTarget

if TYPE_CHECKING:
    import redis

    from workers.app.config import EventSourceMapping

# A running consumer is never quiet longer than its longest blocking read (source.MAX_BLOCK_MS,
# 5 s) or than claim_idle_s / 3 with every stream paused (it touches its entries then): one that
# has been quiet this long, or claim_idle_s when longer, counts as stopped.
RUNNING_WITHIN_MIN_S = 10.0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRewinder:
    """The mapping's consumer group on each of its streams.

    Running rule: a consumer of the group that talked to Redis (XREADGROUP, XCLAIM,
    XAUTOCLAIM) within the last `claim_idle_s` seconds, and at least 10, counts as running:
    the same quiet time after which the source takes a consumer's entries as abandoned. A
    stopped `workers run` deletes its consumer from the group when it holds no pending entry.
    """

    def __init__(self, mapping: EventSourceMapping) -> None:
        src = mapping.source
        if not isinstance(src, cfg.RedisSource):
            raise TypeError(f"mapping {mapping.name}: not a redis source ({src.type})")
        self.streams = source_streams(src)
        self.group = src.consumer_group or mapping.name
        self.group_label = f"consumer group {self.group!r} at {redact_url(src.url)}"
        self.running_within_s = max(src.claim_idle_s, RUNNING_WITHIN_MIN_S)
        self.running_rule = (
            "Redis: a consumer of the group talked to Redis within the last"
            f" {self.running_within_s:g} s (claim_idle_s, at least {RUNNING_WITHIN_MIN_S:g});"
            " `workers run` deletes its consumer when it stops with nothing pending"
        )
        self._client: redis.Redis = redis_client(src.url)

    def running_consumers(self) -> list[str]:
        out = []
        for stream in self.streams:
            try:
                consumers: Any = self._client.xinfo_consumers(stream, self.group)
            except ResponseError:
                continue  # no such stream or group: nobody reads it
            for consumer in consumers:
                idle_ms = int(consumer.get("idle", 0))
                if idle_ms < self.running_within_s * 1000:
                    out.append(
                        f"consumer {_text(consumer['name'])} on stream {stream} (last seen"
                        f" {idle_ms / 1000:.1f} s ago, {consumer.get('pending', 0)} pending)"
                    )
        return out

    def plan(self, to: RewindTarget) -> list[Move]:
        return [self._plan_stream(stream, to) for stream in self.streams]

    def _plan_stream(self, stream: str, to: RewindTarget) -> Move:
        client = self._client
        kind: Any = client.type(stream)
        if kind not in (b"none", b"stream"):
            raise RewindRefused(f"key {stream} is a {_text(kind)}, not a stream")
        info = group_info(client.xinfo_groups(stream), self.group) if kind == b"stream" else None
        if to == "earliest":
            new = "0-0"
        elif to == "latest":
            new = "0-0"
            if kind == b"stream":
                stream_info: Any = client.xinfo_stream(stream)
                new = _text(stream_info["last-generated-id"])
        else:
            new = timestamp_start_id(to)
        notes = []
        if not isinstance(to, str):
            notes.append(f"entries from {_iso(to)} on are read")
        if info is None:
            notes.append("the group is created there (it has none on this stream yet)")
            return Move(stream, "none", new, "; ".join(notes))
        again = len(self._pending_after(stream, new))
        kept = int(info["pending"]) - again
        if again:
            notes.append(f"{again} pending entries after it are acked and read again from it")
        if kept:
            notes.append(f"{kept} pending entries before it stay pending, to be recovered")
        return Move(stream, _text(info["last-delivered-id"]), new, "; ".join(notes))

    def _pending_after(self, stream: str, after: str) -> list[Any]:
        """Ids of the group's pending entries after `after`, oldest first."""
        ids: list[Any] = []
        start = f"({after}"
        while True:
            page: Any = self._client.xpending_range(stream, self.group, start, "+", 1000)
            ids += [entry["message_id"] for entry in page]
            if len(page) < 1000:
                return ids
            start = f"({_text(ids[-1])}"

    def apply(self, moves: Sequence[Move]) -> None:
        for move in moves:
            stream = move.unit
            pipe = self._client.pipeline(transaction=True)
            if move.current == "none":
                pipe.xgroup_create(stream, self.group, id=move.new, mkstream=True)
            else:
                pipe.xgroup_setid(stream, self.group, move.new)
                for ids in chunks(self._pending_after(stream, move.new)):
                    pipe.xack(stream, self.group, *ids)
            pipe.execute()

    def close(self) -> None:
        self._client.close()
