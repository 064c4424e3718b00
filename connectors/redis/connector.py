"""Redis Streams on redis-py: a consumer-group source that recovers pending entries (its own on
start, dead consumers' by XAUTOCLAIM), a stream destination that can ack atomically, and what
`workers dlq` needs to read that destination back and replay onto the source streams."""

from __future__ import annotations

import binascii
import logging
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.redis import config as cfg
from connectors.redis.shape import (
    RedisMeta,
    RedisShape,
    field_name,
    format_stream_id,
    parse_stream_id,
    redis_item,
)
from workers.engine.letters import REPLAY_HEADER, parse_letter
from workers.engine.ports import (
    AssignmentListener,
    Capabilities,
    LetterTooLarge,
    SourceBase,
    StoredLetter,
    undecodable,
)
from workers.engine.records import Record
from workers.engine.redact import describe, redact_url
from workers.engine.shapes import RECORD_OVERHEAD_BYTES

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

log = logging.getLogger("connectors.redis")

RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)

# A blocking XREADGROUP must return before the socket times out: redis-py does not stretch the
# socket timeout for BLOCK, so the block is capped well below it.
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
MAX_BLOCK_MS = 5000
# Longest wait of a poll that may read nothing (every stream paused, or max_records 0).
PAUSED_WAIT_S = 0.005
# How long a "nothing left to read" answer from the server is trusted by `caught_up()`.
DRAINED_TTL_S = 0.5
# Ids per XACK / XCLAIM command, so one command never carries an unbounded argument list.
CHUNK = 1000
# Bytes the "fields" object adds per field in the event, beyond its name and base64 value.
_FIELD_BYTES = 8
# The entry field a replay to the source adds (as the replay header of Kafka and RabbitMQ).
_REPLAY_FIELD = REPLAY_HEADER.encode()


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


def _timestamp_start_id(ms: int) -> str:
    # The group's last-delivered id is exclusive: start just below the first id of `ms` so an
    # entry stamped exactly at the timestamp is read (as Kafka's offsets_for_times would).
    return format_stream_id((ms << 64) - 1) if ms > 0 else "0-0"


class RedisSource(SourceBase):
    """One consumer of a consumer group reading one or more streams (XREADGROUP).

    Record.source is the stream and Record.position its entry id as one sortable int. Record.key
    is the `partition_key_field` value when configured, and Record.value the entry's one other
    field (as a Kafka record has a key and a value), or, for entries with more fields, a JSON
    object of all of them with values decoded as UTF-8. Only filters and tests look at the value:
    the handler gets the fields themselves, in the `redis:streams` event.

    Pending entries are recovered three ways: on start (and after a reconnect) the consumer
    re-reads its own pending entries (XREADGROUP id 0) before new ones; every claim_idle_s / 2 it
    claims entries idle longer than claim_idle_s on any consumer (XAUTOCLAIM); and every
    claim_idle_s / 3 it resets the idle time of the entries it still holds (XCLAIM JUSTID), so a
    live consumer's slow batches are not claimed by others. Delivery counts (XPENDING) become
    Record.attempts, so retries survive restarts.
    https://redis.io/docs/latest/develop/data-types/streams/#recovering-from-permanent-failures
    """

    capabilities = Capabilities(ordered=True, checkpoint="ack", pausable=True)
    retryable_errors = RETRYABLE_ERRORS

    def __init__(self, mapping: EventSourceMapping, instance: int) -> None:
        src = mapping.source
        if not isinstance(src, cfg.RedisSource):
            raise TypeError(f"mapping {mapping.name}: not a redis source ({src.type})")
        self.mapping = mapping.name
        self.url = src.url
        self.streams = list(dict.fromkeys(src.streams))
        self.group = src.consumer_group or mapping.name
        self.consumer = src.consumer_name + (f"-{instance}" if instance > 0 else "")
        self.shape = RedisShape(server_label(src.url))
        self._start_id = {
            "TRIM_HORIZON": "0-0",
            "LATEST": "$",
            "AT_TIMESTAMP": _timestamp_start_id(src.starting_position_timestamp_ms or 0),
        }[src.starting_position]
        self._claim_idle_ms = max(1, round(src.claim_idle_s * 1000))
        self._claim_every_s = src.claim_idle_s / 2
        self._touch_every_s = src.claim_idle_s / 3
        self._key_field = src.partition_key_field.encode() if src.partition_key_field else None
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()  # guards _in_flight and _unacked (ack() runs on workers)
        # Entries handed to the engine and not yet acked: stream -> id -> when last delivered or
        # touched (monotonic). Reads skip them, so a re-read never hands out a duplicate.
        self._in_flight: dict[str, dict[str, float]] = {s: {} for s in self.streams}
        # Settled entries whose XACK failed (connection lost); the loop retries them.
        self._unacked: dict[str, set[str]] = {}
        # Streams whose own pending entries are still being re-read, and the cursor of each.
        self._history: dict[str, str] = {}
        self._claim_cursor: dict[str, str] = {}
        self._next_claim = 0.0
        self._next_touch = 0.0
        self._last_seen: dict[str, str] = {}
        self._paused: set[str] = set()
        self._reset = True  # (re)check the groups and re-read own pending entries next poll
        self._drained_at = float("-inf")
        self._drained = False
        self._names: dict[bytes, str] = {}
        self._rotate = 0
        self._wakeup = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self, listener: AssignmentListener) -> None:
        if self._client is None:
            self._client = redis_client(self.url)
            log.info(
                "mapping %s: redis %s streams %s, group %s, consumer %s",
                self.mapping,
                redact_url(self.url),
                self.streams,
                self.group,
                self.consumer,
            )
        self._ensure_groups()
        self._reset = False
        self._history = dict.fromkeys(self.streams, "0-0")
        listener.on_assigned(self.streams)

    def close(self) -> None:
        client, self._client = self._client, None
        self._wakeup.set()
        if client is None:
            return
        try:
            self._flush_unacked(client)
        except RedisError as exc:
            left = sum(len(ids) for ids in self._unacked.values())
            log.warning(
                "mapping %s: %d settled entries could not be acked (%s); they will be delivered"
                " again",
                self.mapping,
                left,
                describe(exc),
            )
        client.close()

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError("RedisSource used before open() or after close()")
        return self._client

    def _ensure_groups(self) -> None:
        """XGROUP CREATE ... MKSTREAM for every stream; an existing group (BUSYGROUP) is kept."""
        pipe = self._redis().pipeline(transaction=False)
        starts = {s: self._group_start(s) for s in self.streams}
        for stream, start in starts.items():
            pipe.xgroup_create(stream, self.group, id=start, mkstream=True)
        for stream, result in zip(self.streams, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, ResponseError) and str(result).startswith("BUSYGROUP"):
                continue
            # An ACL user may be denied XGROUP CREATE where operators create the groups.
            if isinstance(result, ResponseError) and self._group_exists(stream):
                continue
            if isinstance(result, Exception):
                raise result
            log.info(
                "mapping %s: created consumer group %s on stream %s at %s",
                self.mapping,
                self.group,
                stream,
                starts[stream],
            )

    def _group_exists(self, stream: str) -> bool:
        try:
            groups: Any = self._redis().xinfo_groups(stream)
        except ResponseError:
            return False
        return any(g["name"] == self.group.encode() for g in groups)

    def _group_start(self, stream: str) -> str:
        # A group that vanished (a restart without persistence) is recreated after the last entry
        # this consumer read, so later entries, even ones written before the recreation, are
        # read and earlier ones are not replayed; with nothing read yet, the starting position.
        return self._last_seen.get(stream, self._start_id)

    # --- polling ---------------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        try:
            return self._poll(max_records, timeout_s)
        except RETRYABLE_ERRORS:
            self._reset = True
            raise

    def _poll(self, max_records: int, timeout_s: float) -> list[Record]:
        client = self._redis()
        if self._reset:
            # After a lost connection the server may have restarted: groups may be gone, and
            # entries acked just before may be pending again, so re-read our own.
            self._ensure_groups()
            self._history = dict.fromkeys(self.streams, "0-0")
            self._reset = False
        if self._unacked:
            self._flush_unacked(client)
        now = time.monotonic()
        if now >= self._next_touch:
            self._touch(client, now)
        active = [s for s in self.streams if s not in self._paused]
        if max_records <= 0 or not active:
            # Nothing may be read; the engine resumes streams only between polls, as its lanes
            # drain, so a paused poll returns soon rather than sleeping the whole timeout.
            self._wakeup.wait(min(timeout_s, PAUSED_WAIT_S))
            return []
        try:
            out: list[Record] = []
            if now >= self._next_claim:
                out = self._claim(client, active, max_records, now)
            history = [s for s in active if s in self._history]
            if history and len(out) < max_records:
                out += self._read_history(client, history, max_records - len(out), now)
            if out:
                out.sort(key=lambda r: (r.source, r.position))
            else:
                fresh = [s for s in active if s not in self._history]
                if fresh:
                    out = self._read_new(client, fresh, max_records, timeout_s)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            # https://redis.io/docs/latest/commands/xreadgroup/ : the key or the group is gone.
            log.warning(
                "mapping %s: %s; recreating the consumer group", self.mapping, describe(exc)
            )
            self._reset = True
            return []
        if out:
            self._drained_at = float("-inf")
        return out

    def _spread(self, streams: list[str], budget: int) -> tuple[list[str], int]:
        """The streams to read and COUNT per stream so that one read returns at most `budget`.

        XREADGROUP's COUNT applies to each stream; with fewer records wanted than streams, a
        rotating subset is read so that every stream gets its turn.
        """
        if budget >= len(streams):
            return streams, budget // len(streams)
        self._rotate = (self._rotate + 1) % len(streams)
        rotated = streams[self._rotate :] + streams[: self._rotate]
        return rotated[:budget], 1

    def _read_new(
        self, client: redis.Redis, streams: list[str], budget: int, timeout_s: float
    ) -> list[Record]:
        streams, count = self._spread(streams, budget)
        # BLOCK 0 would wait forever: a non-positive timeout does not block at all.
        block = min(MAX_BLOCK_MS, max(1, int(timeout_s * 1000))) if timeout_s > 0 else None
        reply: Any = client.xreadgroup(
            self.group, self.consumer, dict.fromkeys(streams, ">"), count=count, block=block
        )
        now = time.monotonic()
        out: list[Record] = []
        for raw_stream, entries in reply or ():
            out += self._records(raw_stream.decode(), entries, now)
        return out

    def _read_history(
        self, client: redis.Redis, streams: list[str], budget: int, now: float
    ) -> list[Record]:
        """Our own pending entries, oldest first, from each stream's cursor (no BLOCK)."""
        streams, count = self._spread(streams, budget)
        reply: Any = client.xreadgroup(
            self.group, self.consumer, {s: self._history[s] for s in streams}, count=count
        )
        got = {raw.decode(): entries for raw, entries in reply or ()}
        live: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        for stream in streams:
            entries = got.get(stream) or []
            if len(entries) < count:
                del self._history[stream]
            else:
                self._history[stream] = entries[-1][0].decode()
            if entries:
                live[stream] = self._drop_deleted(client, stream, entries)
        return self._with_counts(client, live, now)

    def _claim(
        self, client: redis.Redis, streams: list[str], budget: int, now: float
    ) -> list[Record]:
        """XAUTOCLAIM entries idle longer than claim_idle_s, resuming each stream's scan cursor.

        https://redis.io/docs/latest/commands/xautoclaim/ : since Redis 7 the reply's third
        element lists pending ids whose entries were deleted (trimmed); the server has already
        dropped them from the pending list, so they need no ack.
        """
        live: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        finished = True
        taken = 0
        for stream in streams:
            cursor = self._claim_cursor.get(stream, "0-0")
            done = False
            while taken < budget:
                reply: Any = client.xautoclaim(
                    stream,
                    self.group,
                    self.consumer,
                    self._claim_idle_ms,
                    start_id=cursor,
                    count=min(budget - taken, CHUNK),
                )
                cursor = reply[0].decode()
                entries = self._drop_deleted(client, stream, reply[1])
                deleted = reply[2] if len(reply) > 2 else []
                if deleted:
                    log.warning(
                        "mapping %s: %d pending entries of %s were trimmed before they were"
                        " processed; skipping them",
                        self.mapping,
                        len(deleted),
                        stream,
                    )
                if entries:
                    live.setdefault(stream, []).extend(entries)
                    taken += len(entries)
                if cursor == "0-0":
                    done = True
                    break
            self._claim_cursor[stream] = cursor
            finished = finished and done
        # A scan cut short by the budget resumes on the next poll rather than after the interval.
        self._next_claim = now + self._claim_every_s if finished else now
        if taken:
            log.info(
                "mapping %s: claimed %d entries idle for over %.1fs",
                self.mapping,
                taken,
                self._claim_idle_ms / 1000,
            )
        return self._with_counts(client, live, now)

    def _drop_deleted(
        self, client: redis.Redis, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries still in the stream; pending ids whose entry was trimmed are acked.

        A pending entry that was deleted comes back with no fields (XREADGROUP from a pending id,
        and XAUTOCLAIM before Redis 7): there is nothing to process, and no XADD has zero fields.
        """
        deleted = [entry_id for entry_id, fields in entries if not fields]
        if not deleted:
            return entries
        log.warning(
            "mapping %s: %d pending entries of %s were trimmed before they were processed;"
            " acking them",
            self.mapping,
            len(deleted),
            stream,
        )
        for chunk in _chunks(deleted):
            client.xack(stream, self.group, *chunk)
        return [e for e in entries if e[1]]

    def _with_counts(
        self,
        client: redis.Redis,
        live: Mapping[str, list[tuple[bytes, dict[bytes, bytes]]]],
        now: float,
    ) -> list[Record]:
        """Records of redelivered entries, with the delivery counts XPENDING reports."""
        live = {s: entries for s, entries in live.items() if entries}
        if not live:
            return []
        pipe = client.pipeline(transaction=False)
        for stream, entries in live.items():
            ids = sorted(entries, key=lambda e: _id_key(e[0]))
            # Our pending range between these ids may also hold entries we already have in
            # flight; ask for enough rows to cover them too.
            count = len(entries) + len(self._in_flight[stream])
            pipe.xpending_range(
                stream, self.group, ids[0][0], ids[-1][0], count, consumername=self.consumer
            )
        counts: dict[bytes, int] = {}
        for rows in pipe.execute():
            for row in rows:
                counts[row["message_id"]] = row["times_delivered"]
        out: list[Record] = []
        for stream, entries in live.items():
            out += self._records(stream, entries, now, counts)
        return out

    def _records(
        self,
        stream: str,
        entries: Iterable[tuple[bytes, dict[bytes, bytes]]],
        now: float,
        counts: Mapping[bytes, int] | None = None,
    ) -> list[Record]:
        """Engine records for `entries`, skipping any already in flight."""
        fresh: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        with self._lock:
            held = self._in_flight[stream]
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                if entry_id not in held:
                    held[entry_id] = now
                    fresh.append((entry_id, raw_id, fields))
        try:
            return self._convert(stream, fresh, counts)
        except Exception:
            pass
        # Some entry cannot be converted: one at a time, and that one becomes a letter, so that
        # no entry stops its stream.
        out: list[Record] = []
        for entry in fresh:
            try:
                out += self._convert(stream, [entry], counts)
            except Exception as exc:
                out.append(self._undecodable(stream, entry[0], entry[2], exc))
        return out

    def _convert(
        self,
        stream: str,
        fresh: list[tuple[str, bytes, dict[bytes, bytes]]],
        counts: Mapping[bytes, int] | None,
    ) -> list[Record]:
        """Engine records for entries not in flight before, with their event items."""
        out: list[Record] = []
        append = out.append
        names = self._names
        key_field = self._key_field
        b2a = binascii.b2a_base64
        newest = -1
        for entry_id, raw_id, fields in fresh:
            ms_text, _, seq_text = entry_id.partition("-")
            ms = int(ms_text)
            position = (ms << 64) | int(seq_text)
            if position > newest:
                newest = position
            # One pass over the fields: their names as text, the event's base64 values, and the
            # bytes they add to the event.
            named: dict[str, bytes] = {}
            encoded: dict[str, str] = {}
            size = RECORD_OVERHEAD_BYTES
            value = b""
            for raw_name, data in fields.items():
                name = names.get(raw_name) or self._name_of(raw_name)
                named[name] = data
                encoded[name] = text = b2a(data, newline=False).decode()
                size += len(raw_name) + len(text) + _FIELD_BYTES
                if raw_name != key_field:
                    value = data
            key = None if key_field is None else fields.get(key_field)
            headers: Sequence[tuple[str, bytes]] = ()
            # The common cases are done: one field holding the payload, or the partition key
            # field and one payload field (the value the loop kept).
            if len(fields) == 1:
                value = data
            elif key is None or len(fields) != 2 or _REPLAY_FIELD in fields:
                body = fields
                replays = fields.get(_REPLAY_FIELD)
                if replays is not None:
                    # A replayed entry (`workers dlq replay --to source`): the count is a header
                    # for the engine and stays a field for the handler, but the value is what it
                    # was before the replay, so filter patterns match it as they did then.
                    headers = [(REPLAY_HEADER, replays)]
                    body = {k: v for k, v in fields.items() if k != _REPLAY_FIELD}
                if len(body) == 1:
                    value = next(iter(body.values()))
                elif len(body) == 2 and key is not None:
                    value = next(v for k, v in body.items() if k != key_field)
                else:
                    value = orjson.dumps(
                        {self._name_of(k): v.decode("utf-8", "replace") for k, v in body.items()}
                    )
            attempts = 0 if counts is None else max(0, counts.get(raw_id, 1) - 1)
            append(
                Record(
                    stream,
                    position,
                    value,
                    key,
                    ms,
                    headers,
                    attempts,
                    attempts > 0,
                    size,
                    RedisMeta(stream, entry_id, named),
                    redis_item(stream, entry_id, ms, encoded),
                )
            )
        if out:
            last = self._last_seen.get(stream)
            if last is None or newest > parse_stream_id(last):
                self._last_seen[stream] = format_stream_id(newest)
        return out

    def _undecodable(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes], exc: Exception
    ) -> Record:
        log.error(
            "mapping %s: %s %s cannot be read (%s: %s); it goes to the on-failure destination",
            self.mapping,
            stream,
            entry_id,
            type(exc).__name__,
            exc,
        )
        # Its fields as they came, names and values in base64: nothing about them is assumed.
        b64 = binascii.b2a_base64
        raw = orjson.dumps(
            {
                b64(k, newline=False).decode(): b64(v, newline=False).decode()
                for k, v in fields.items()
            }
        )
        return undecodable(
            stream,
            parse_stream_id(entry_id),
            raw,
            exc,
            size=RECORD_OVERHEAD_BYTES + len(raw),
            meta=RedisMeta(stream, entry_id, {}),
        )

    def _name_of(self, raw_name: bytes) -> str:
        """A field name as the event shows it (`field_name`); names repeat across entries, so
        the ones seen are kept."""
        name = self._names.get(raw_name)
        if name is None:
            if len(self._names) > 4096:
                self._names.clear()
            name = self._names[raw_name] = field_name(raw_name)
        return name

    def _touch(self, client: redis.Redis, now: float) -> None:
        """Reset the idle time of entries we have held for a while, so others do not claim them.

        XCLAIM with JUSTID does not count a delivery. MIN-IDLE-TIME is set just below how long
        we have held each entry: an entry another consumer claimed from us since (its idle time
        restarted then, at least claim_idle_s after ours) is below it and stays theirs.
        https://redis.io/docs/latest/commands/xclaim/
        """
        self._next_touch = now + self._touch_every_s
        cutoff = now - self._touch_every_s
        margin_s = self._touch_every_s / 2
        due: dict[tuple[str, float], list[str]] = {}
        with self._lock:
            for stream, held in self._in_flight.items():
                for entry_id, since in held.items():
                    if since <= cutoff:
                        due.setdefault((stream, since), []).append(entry_id)
        if not due:
            return
        pipe = client.pipeline(transaction=False)
        for (stream, since), ids in due.items():
            min_idle_ms = max(0, int((now - since - margin_s) * 1000))
            for chunk in _chunks(ids):
                pipe.xclaim(
                    stream, self.group, self.consumer, min_idle_ms, list(chunk), justid=True
                )
        pipe.execute(raise_on_error=False)
        with self._lock:
            for (stream, _), ids in due.items():
                held = self._in_flight[stream]
                for entry_id in ids:
                    if entry_id in held:
                        held[entry_id] = now

    # --- checkpointing ---------------------------------------------------------------------------

    def ack(self, records: Sequence[Record]) -> None:
        """XACK, one pipelined round trip; on a lost connection the loop retries the acks."""
        by_stream: dict[str, list[str]] = {}
        for r in records:
            meta: RedisMeta = r.meta
            by_stream.setdefault(meta.stream, []).append(meta.entry_id)
        client = self._client
        try:
            if client is None:
                raise RedisConnectionError("source closed")
            self._xack(client, by_stream)
        except RETRYABLE_ERRORS as exc:
            with self._lock:
                for stream, ids in by_stream.items():
                    self._unacked.setdefault(stream, set()).update(ids)
            log.warning(
                "mapping %s: acking %d entries failed (%s); retrying after reconnecting",
                self.mapping,
                len(records),
                describe(exc),
            )
            return
        self._forget(by_stream)

    def _xack(self, client: redis.Redis, by_stream: Mapping[str, Collection[str]]) -> None:
        commands = [(s, chunk) for s, ids in by_stream.items() for chunk in _chunks(list(ids))]
        if len(commands) == 1:
            # One command needs no pipeline's bookkeeping: the common case, one stream's batch.
            client.xack(commands[0][0], self.group, *commands[0][1])
            return
        pipe = client.pipeline(transaction=False)
        for stream, chunk in commands:
            pipe.xack(stream, self.group, *chunk)
        pipe.execute()

    def _forget(self, by_stream: Mapping[str, Collection[str]]) -> None:
        with self._lock:
            for stream, ids in by_stream.items():
                held = self._in_flight.get(stream)
                if held is not None:
                    for entry_id in ids:
                        held.pop(entry_id, None)

    def _flush_unacked(self, client: redis.Redis) -> None:
        with self._lock:
            pending = {s: set(ids) for s, ids in self._unacked.items() if ids}
        if not pending:
            return
        self._xack(client, pending)
        with self._lock:
            for stream, ids in pending.items():
                left = self._unacked.get(stream, set()) - ids
                if left:
                    self._unacked[stream] = left
                else:
                    self._unacked.pop(stream, None)
        self._forget(pending)
        log.info(
            "mapping %s: acked %d entries held back by a lost connection",
            self.mapping,
            sum(len(ids) for ids in pending.values()),
        )

    # --- flow control and state ------------------------------------------------------------------

    def pause(self, units: Collection[str]) -> None:
        self._paused |= set(units) & set(self.streams)

    def resume(self, units: Collection[str]) -> None:
        self._paused -= set(units)
        self._drained_at = float("-inf")

    def assignment(self) -> frozenset[str]:
        return frozenset(self.streams) if self._client is not None else frozenset()

    def caught_up(self) -> bool:
        """Own pending entries re-read, acks flushed, and the server has nothing more for us.

        "Nothing more": each stream's last entry is at or before the group's last-delivered id,
        and no consumer but us holds pending entries (a dead consumer's are still to be claimed;
        ours are at most those the engine holds).
        """
        if self._client is None or self._reset or self._history or self._paused:
            return False
        with self._lock:
            if self._unacked:
                return False
        now = time.monotonic()
        if now - self._drained_at >= DRAINED_TTL_S:
            try:
                self._drained = self._drained_on_server(self._client)
            except RedisError:
                self._drained = False
            self._drained_at = now
        return self._drained

    def _drained_on_server(self, client: redis.Redis) -> bool:
        pipe = client.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, self.group)
            pipe.xrevrange(stream, count=1)
        replies = pipe.execute()
        me = self.consumer.encode()
        group = self.group.encode()
        for i, stream in enumerate(self.streams):
            groups, summary, last = replies[3 * i : 3 * i + 3]
            info = next((g for g in groups if g["name"] == group), None)
            if info is None:
                return False
            if last and _id_key(last[0][0]) > _id_key(info["last-delivered-id"]):
                return False
            with self._lock:
                held = len(self._in_flight[stream])
            for consumer in summary.get("consumers") or ():
                pending = int(consumer["pending"])
                if (consumer["name"] != me and pending) or pending > held:
                    return False
        return True

    def lag(self) -> Mapping[str, int]:
        """Entries not yet delivered to the group, per stream (XINFO GROUPS `lag`, Redis 7+)."""
        client = self._client
        if client is None:
            return {}
        pipe = client.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xinfo_groups(stream)
        try:
            replies = pipe.execute(raise_on_error=False)
        except RedisError:
            return {}
        group = self.group.encode()
        out: dict[str, int] = {}
        for stream, groups in zip(self.streams, replies, strict=True):
            if isinstance(groups, Exception):
                continue
            for info in groups:
                lag = info.get("lag")
                if info.get("name") == group and isinstance(lag, int):
                    out[stream] = lag
        return out


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
        context = letter.get("requestContext") or {}
        error = letter.get("error") or {}
        fields: dict[Any, Any] = {
            "letter": orjson.dumps(letter),
            "mapping": self.mapping,
            "condition": str(context.get("condition", "")),
            "errorType": str(error.get("errorType", "")),
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
            for chunk in _chunks(ids):
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


# Marks one dead letter replayed, atomically (see RedisDeadLetterStore). Entries after the group's
# last-delivered id up to the letter, at most ARGV[4] of them, are delivered to the group (into its
# pending entries list, where they stay offered), then the letter is acked once it is reached.
# Returns how many entries were delivered, or -1 when the stream is gone.
_DONE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
end
if last == nil then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')
  last = '0-0'
end
local limit = tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], '(' .. last, ARGV[3], 'COUNT', limit)
if #entries > 0 then
  redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', #entries, 'STREAMS', KEYS[1], '>')
end
if #entries < limit then redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) end
return #entries
"""
# Letters per XRANGE while listing or replaying: one letter carries a whole batch, up to megabytes.
LETTER_PAGE = 50
REPLAY_GROUP = "esm-replay"
REPLAY_CONSUMER = "replay"


class RedisDeadLetterStore:
    """Reads a dead-letter stream back for `workers dlq`; replay progress is the consumer group
    `esm-replay` on that stream, so an interrupted replay resumes where it stopped.

    A letter is replayed when its entry is at or before the group's last-delivered id and not in
    the group's pending entries list (PEL); every other entry is still to be replayed.

    `pending()` only reads (XINFO GROUPS, XPENDING, XRANGE), so listing, showing and dry runs
    change nothing, not even creating the group. It takes, when called, the group's
    last-delivered id and the stream's last entry id, then yields the group's pending entries
    (all at or before that last-delivered id) and then the entries after it up to that last entry,
    oldest first: letters a replay writes back later wait for the next replay.

    `done()` runs one script, atomic on the server: it creates the group at 0 if missing, delivers
    to the group every entry after its last-delivered id up to the letter (XREADGROUP, so letters
    skipped by `--error-type` or `--since`, or belonging to another mapping, land in the PEL and
    stay offered), and XACKs the letter. Entries past the letter are never touched. Since nothing
    is ever moved out of the "to replay" set except the one letter acked in the same script, a
    crash at any point loses nothing and repeats at most the letter being replayed.
    Large gaps are delivered in bounded steps, each itself a consistent state.

    The stream may be shared by several mappings: entries whose `mapping` field names another
    mapping are not offered. Entries that are no dead letter are skipped with a warning.
    Needs EVAL on the dead-letter stream (an ACL user must be allowed scripts).
    """

    def __init__(self, dst: cfg.RedisDestination, mapping: EventSourceMapping) -> None:
        self.stream = dst.stream
        self.mapping = mapping.name
        self.group = REPLAY_GROUP
        self.consumer = REPLAY_CONSUMER
        self._where = f"dead-letter stream {self.stream!r} at {redact_url(dst.url)}"
        self._client: redis.Redis | None = redis_client(dst.url)
        self._done = self._client.register_script(_DONE_SCRIPT)

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError(f"{self._where}: store used after close()")
        return self._client

    def pending(self) -> Iterator[StoredLetter]:
        client = self._redis()
        # The state is taken now, not at the first next(): "as the stream stands when called".
        newest: Any = client.xrevrange(self.stream, count=1)
        if not newest:
            kind: Any = client.type(self.stream)
            if kind not in (b"none", b"stream"):
                raise ValueError(f"{self._where}: the key is a {kind.decode()}, not a stream")
            return iter(())
        end = newest[0][0].decode()
        groups: Any = client.xinfo_groups(self.stream)
        info = next((g for g in groups if g["name"] == self.group.encode()), None)
        delivered = None if info is None else info["last-delivered-id"].decode()
        return self._letters(client, delivered, end)

    def _letters(
        self, client: redis.Redis, delivered: str | None, end: str
    ) -> Iterator[StoredLetter]:
        """Pending entries of the group (None: there is no group yet), then the entries after
        the last delivered one up to `end`; every pending one comes before those."""
        if delivered is not None:
            yield from self._pending_entries(client, delivered)
        cursor = f"({delivered or '0-0'}"
        while True:
            entries: Any = client.xrange(self.stream, cursor, end, count=LETTER_PAGE)
            for entry_id, fields in entries:
                stored = self._stored(entry_id.decode(), fields)
                if stored is not None:
                    yield stored
            if len(entries) < LETTER_PAGE:
                return
            cursor = f"({entries[-1][0].decode()}"

    def _pending_entries(self, client: redis.Redis, delivered: str) -> Iterator[StoredLetter]:
        """The group's pending entries up to `delivered`, in id order, read page by page."""
        low = "-"
        while True:
            rows: Any = client.xpending_range(self.stream, self.group, low, delivered, LETTER_PAGE)
            if not rows:
                return
            pipe = client.pipeline(transaction=False)
            for row in rows:
                pipe.xrange(self.stream, row["message_id"], row["message_id"], count=1)
            for row, found in zip(rows, pipe.execute(), strict=True):
                # An entry trimmed away since it was delivered leaves its id in the PEL alone.
                if found:
                    stored = self._stored(row["message_id"].decode(), found[0][1])
                    if stored is not None:
                        yield stored
            if len(rows) < LETTER_PAGE:
                return
            low = f"({rows[-1]['message_id'].decode()}"

    def _stored(self, entry_id: str, fields: dict[bytes, bytes]) -> StoredLetter | None:
        owner = fields.get(b"mapping")
        if owner is not None and owner.decode("utf-8", "replace") != self.mapping:
            return None  # another mapping's letter on a shared stream
        letter, problem = parse_letter(fields.get(b"letter"))
        if letter is None:
            log.warning(
                "mapping %s: %s: entry %s skipped, not a dead letter: %s",
                self.mapping,
                self._where,
                entry_id,
                problem,
            )
            return None
        if owner is None and letter.get("mapping", self.mapping) != self.mapping:
            return None
        return StoredLetter(letter["requestContext"]["requestId"], letter, handle=entry_id)

    def done(self, stored: StoredLetter) -> None:
        entry_id = stored.handle
        if not isinstance(entry_id, str):
            raise ValueError(f"letter {stored.id} was not read from {self._where}")
        client = self._redis()
        while True:
            delivered: Any = self._done(
                keys=[self.stream],
                args=[self.group, self.consumer, entry_id, LETTER_PAGE],
                client=client,
            )
            if delivered < 0:
                log.warning(
                    "mapping %s: %s is gone; letter %s cannot be marked replayed",
                    self.mapping,
                    self._where,
                    stored.id,
                )
                return
            if delivered < LETTER_PAGE:
                return

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


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
        self.streams = list(dict.fromkeys(src.streams))
        self.key_field = src.partition_key_field
        self._where = f"redis {redact_url(src.url)}"
        self._client = redis_client(src.url)
        self._warned: set[str] = set()

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        if not records:
            return
        pipe = self._client.pipeline(transaction=True)
        for record in records:
            stream, fields = self._entry(record)
            fields[_REPLAY_FIELD] = str(replay_count).encode()
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
            return self.streams[0], fields
        stream = meta.stream
        if stream not in self.streams:
            stream = self.streams[0]
            if meta.stream not in self._warned:
                self._warned.add(meta.stream)
                log.warning(
                    "%s: stream %s is no longer a source of the mapping; replaying its records"
                    " onto %s",
                    self._where,
                    meta.stream,
                    stream,
                )
        fields = meta.raw_fields()
        fields.pop(_REPLAY_FIELD, None)
        return stream, fields

    def close(self) -> None:
        self._client.close()


def probe_redis(src: cfg.RedisSource) -> None:
    """PING the server and log whether each stream and the consumer group exist."""
    client = redis_client(src.url)
    where = redact_url(src.url)
    try:
        client.ping()
        group = src.consumer_group.encode()
        for stream in src.streams:
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
            groups: Any = client.xinfo_groups(stream)
            info = next((g for g in groups if g["name"] == group), None)
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


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return (int(ms), int(seq or 0))


def _chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]
