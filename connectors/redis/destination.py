"""Dead letters written to a Redis stream, acked with their source entries in one script when
the source is the same server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError, ResponseError

from connectors.redis import config as cfg
from connectors.redis.client import log, redis_client, server_of
from connectors.redis.shape import RedisMeta
from workers.engine.letters import CONDITION_LABEL, ERROR_TYPE_LABEL, MAPPING_LABEL, letter_labels
from workers.engine.ports import LetterTooLarge
from workers.engine.records import Record
from workers.engine.redact import redact_url

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# How long the destination trusts the proto-max-bulk-len it read (or its failure to read it).
LIMIT_READ_EVERY_S = 300.0
# What a server says (before closing the connection) of a field over proto-max-bulk-len.
_BULK_REFUSAL = "invalid bulk length"

# XADD the letter, then XACK its source entries: one script runs whole or stops at its first
# error, so a refused XADD (wrong key type, OOM) acks nothing. MULTI/EXEC would run the XACK
# anyway. A failed XACK (pcall) does not undo the stored letter; the source acks again.
# KEYS: the letter stream, then the source streams. ARGV: MAXLEN or "", the group, the number
# of field/value arguments, those arguments, then per source stream its count and its ids.
_DELIVER = """
local args = {'XADD', KEYS[1]}
if ARGV[1] ~= '' then
  args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[1]
end
args[#args + 1] = '*'
local n = tonumber(ARGV[3])
for i = 4, 3 + n do args[#args + 1] = ARGV[i] end
local id = redis.call(unpack(args))
local failed = {}
local at = 4 + n
for k = 2, #KEYS do
  local count = tonumber(ARGV[at]); at = at + 1
  for first = at, at + count - 1, 1000 do
    local last = math.min(first + 999, at + count - 1)
    local reply = redis.pcall('XACK', KEYS[k], ARGV[2], unpack(ARGV, first, last))
    if type(reply) == 'table' and reply.err then failed[#failed + 1] = reply.err end
  end
  at = at + count
end
return {id, failed}
"""


class RedisDestination:
    """Dead letters XADDed to a stream: the letter as JSON in `letter`, plus `mapping`,
    `condition` and `errorType` fields to filter on without parsing it.

    When the source is Redis on the same server and database, the XADD and the XACK of the
    letter's source entries run in one script, so a crash between them can neither lose the
    entries nor write their letter twice, and a refused XADD acks nothing. Durability is the
    server's: with appendfsync always the letter is on disk once XADD returns.
    """

    def __init__(self, dst: cfg.RedisDestination, mapping: EventSourceMapping) -> None:
        self.stream = dst.stream
        self.maxlen = dst.maxlen
        self.mapping = mapping.name
        self._client = redis_client(dst.url)
        self._deliver = self._client.register_script(_DELIVER)
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
        try:
            if not acks:
                self._client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                return
            args: list[Any] = ["" if self.maxlen is None else self.maxlen, group or ""]
            args.append(2 * len(fields))
            for name, value in fields.items():
                args += [name, value]
            for ids in acks.values():
                args.append(len(ids))
                args += ids
            reply: Any = self._deliver(keys=[self.stream, *acks], args=args)
        except ResponseError as exc:
            if _BULK_REFUSAL in str(exc):
                raise LetterTooLarge(f"stream {self.stream}: {exc}", self._bulk_limit) from None
            raise
        for error in reply[1]:
            log.warning(
                "mapping %s: acking dead-lettered entries failed: %s",
                self.mapping,
                error.decode("utf-8", "replace") if isinstance(error, bytes) else error,
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
