"""Dead letters written to a Redis stream, acked with their source entries in one transaction
when the source is the same server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError, ResponseError

from connectors.redis import config as cfg
from connectors.redis.client import chunks, log, redis_client, server_of
from connectors.redis.shape import RedisMeta
from workers.engine.letters import CONDITION_LABEL, ERROR_TYPE_LABEL, MAPPING_LABEL, letter_labels
from workers.engine.ports import LetterTooLarge
from workers.engine.records import Record
from workers.engine.redact import describe, redact_url

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# How long the destination trusts the proto-max-bulk-len it read (or its failure to read it).
LIMIT_READ_EVERY_S = 300.0
# What a server says (before closing the connection) of a field over proto-max-bulk-len.
_BULK_REFUSAL = "invalid bulk length"


class RedisDestination:
    """Dead letters XADDed to a stream: the letter as JSON in `letter`, plus `mapping`,
    `condition` and `errorType` fields to filter on without parsing it.

    When the source is Redis on the same server and database, the XADD and the XACK of the
    letter's source entries run in one MULTI/EXEC, so a crash between them can neither lose the
    entries nor write their letter twice. Durability is the server's: with appendfsync always
    the letter is on disk once XADD returns.
    """

    def __init__(self, dst: cfg.RedisDestination, mapping: EventSourceMapping) -> None:
        self.stream = dst.stream
        self.maxlen = dst.maxlen
        self.mapping = mapping.name
        self._client = redis_client(dst.url)
        self._bulk_limit: int | None = None
        self._bulk_read_at: float | None = None
        src = mapping.source
        same = isinstance(src, cfg.RedisSource) and server_of(src.url) == server_of(dst.url)
        self._ack_group = src.consumer_group if isinstance(src, cfg.RedisSource) and same else None
        log.info(
            "mapping %s: dead letters to redis %s stream %s%s",
            self.mapping,
            redact_url(dst.url),
            self.stream,
            " (acked with the source entries in one transaction)" if self._ack_group else "",
        )

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        labels = letter_labels(letter, self.mapping)
        fields: dict[Any, Any] = {
            "letter": orjson.dumps(letter),
            # The labels under this stream's own field names.
            "mapping": labels[MAPPING_LABEL],
            "condition": labels[CONDITION_LABEL],
            "errorType": labels[ERROR_TYPE_LABEL],
        }
        group = self._ack_group
        acks: dict[str, list[str]] = {}
        if group is not None:
            for r in records:
                if isinstance(r.meta, RedisMeta):
                    acks.setdefault(r.meta.stream, []).append(r.meta.entry_id)
        pipe = self._client.pipeline(transaction=bool(acks))
        pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        for stream, ids in acks.items():
            for chunk in chunks(ids):
                pipe.xack(stream, group or "", *chunk)
        # Inside MULTI a failing command does not undo the others: only the XADD's failure means
        # the letter is not stored. A failed XACK is left to the source's own ack.
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            if isinstance(replies[0], ResponseError) and _BULK_REFUSAL in str(replies[0]):
                raise LetterTooLarge(
                    f"stream {self.stream}: {replies[0]}", self._bulk_limit
                ) from None
            raise replies[0]
        for reply in replies[1:]:
            if isinstance(reply, Exception):
                log.warning(
                    "mapping %s: acking dead-lettered entries failed: %s",
                    self.mapping,
                    describe(reply),
                )

    def max_letter_bytes(self) -> int | None:
        """The server's proto-max-bulk-len (512 MB by default), the largest field it takes.

        A larger field makes the server drop the connection, which inside MULTI reaches the
        client as a reset connection rather than a refusal: so the limit is read beforehand.
        None where CONFIG is not allowed (managed servers)."""
        now = time.monotonic()
        if self._bulk_read_at is None or now - self._bulk_read_at >= LIMIT_READ_EVERY_S:
            self._bulk_read_at = now
            try:
                reply = self._client.config_get("proto-max-bulk-len")
                value = next(iter(reply.values()), None) if isinstance(reply, dict) else None
                self._bulk_limit = int(value) if value is not None else None
            except (RedisError, ValueError, TypeError) as exc:
                log.info(
                    "mapping %s: proto-max-bulk-len not readable (%s); dead letters are sized"
                    " by the server's refusals",
                    self.mapping,
                    exc,
                )
                self._bulk_limit = None
        return self._bulk_limit

    def close(self) -> None:
        self._client.close()
