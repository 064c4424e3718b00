"""`workers dlq replay --to source` for Redis: replayed records XADDed back onto the source
streams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connectors.redis import config as cfg
from connectors.redis.client import REPLAY_FIELD_BYTES, redis_client, source_streams
from connectors.redis.shape import RedisMeta
from workers.engine.records import Record
from workers.engine.redact import redact_url
from workers.engine.routing import ReplayRoutes


class RedisSourcePublisher:
    """XADDs replayed records back onto the source streams, with their original fields plus
    `esm-replay-count`, which the source hands on as the replay header (so a record failing again
    is dead-lettered with its replay count) and the handler sees as a field.

    A record goes back to the stream it came from when the mapping still reads it, else to the
    mapping's first stream; so does a record of another broker's letter, as `value` (and its key
    as the partition key field, when one is configured). The records of one call are sent in one
    MULTI/EXEC; the entries get new ids, so the handler sees them after what is already there.
    """

    def __init__(self, src: cfg.RedisSource) -> None:
        self.streams = source_streams(src)
        self.key_field = src.partition_key_field
        self._where = f"redis {redact_url(src.url)}"
        self._client = redis_client(src.url)
        self._routes = ReplayRoutes(self._where, self.streams.__contains__, self.streams)

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        if not records:
            return
        pipe = self._client.pipeline(transaction=True)
        for record in records:
            stream, fields = self._entry(record)
            fields[REPLAY_FIELD_BYTES] = str(replay_count).encode()
            pipe.xadd(stream, fields)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                raise reply

    def _entry(self, record: Record) -> tuple[str, dict[Any, Any]]:
        meta = record.meta
        if not isinstance(meta, RedisMeta):
            fields: dict[Any, Any] = {}
            if self.key_field is not None and record.key is not None:
                fields[self.key_field.encode()] = record.key
            fields[b"value"] = record.value
            return self._routes.target(None, record), fields
        stream = self._routes.target(meta.stream, record)
        fields = meta.raw_fields()
        fields.pop(REPLAY_FIELD_BYTES, None)
        return stream, fields

    def close(self) -> None:
        self._client.close()
