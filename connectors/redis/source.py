"""The Redis Streams source: one consumer of a consumer group, which recovers pending entries (its
own on start, dead consumers' by XAUTOCLAIM) and acks what the engine settles."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError, ResponseError

from connectors.redis import config as cfg
from connectors.redis.client import (
    CHUNK,
    RETRYABLE_ERRORS,
    chunks,
    group_info,
    id_key,
    leave_group,
    log,
    redis_client,
    server_label,
    source_streams,
)
from connectors.redis.entries import EntryConverter, RawEntry, as_sent, stream_replies
from connectors.redis.overlap import Acks, ReadAhead
from connectors.redis.shape import RedisMeta, RedisShape, timestamp_start_id
from workers.engine.ports import AssignmentListener, Capabilities, SourceBase
from workers.engine.records import Record
from workers.engine.redact import describe, redact_url

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

MAX_BLOCK_MS = 5000  # below client.SOCKET_TIMEOUT_S
# Longest wait of a poll that may read nothing (every stream paused, or max_records 0).
PAUSED_WAIT_S = 0.005
# How long a "nothing left to read" answer from the server is trusted by `caught_up()`.
DRAINED_TTL_S = 0.5


class RedisSource(SourceBase):
    """One consumer of a consumer group reading one or more streams (XREADGROUP).

    Record.source is the stream and Record.position its entry id as one sortable int. Record.key
    is the `partition_key_field` value when configured, and Record.value the entry's value as
    `shape.entry_value` defines it (see entries.py).

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
        self.streams = source_streams(src)
        self.group = src.consumer_group or mapping.name
        self.consumer = src.consumer_name + (f"-{instance}" if instance > 0 else "")
        self.shape = RedisShape(server_label(src.url))
        self._start_id = {
            "TRIM_HORIZON": "0-0",
            "LATEST": "$",
            "AT_TIMESTAMP": timestamp_start_id(src.starting_position_timestamp_ms or 0),
        }[src.starting_position]
        self._claim_idle_ms = max(1, round(src.claim_idle_s * 1000))
        self._claim_every_s = src.claim_idle_s / 2
        self._touch_every_s = src.claim_idle_s / 3
        self._entries = EntryConverter(self.mapping, src.partition_key_field)
        self._client: redis.Redis | None = None
        # All state is the loop thread's: the engine calls a source from that thread only.
        # Entries handed to the engine and not yet acked: stream -> id -> when last delivered or
        # touched (monotonic). Reads skip them, so a re-read never hands out a duplicate.
        self._in_flight: dict[str, dict[str, float]] = {s: {} for s in self.streams}
        # XACKs in flight, and those to send again after a lost connection.
        self._acks = Acks(self.mapping, self.group, self._in_flight)
        # The next XREADGROUP, sent while the records of the last one are made.
        self._ahead = ReadAhead(self.mapping, self.group, self.consumer, self._in_flight)
        # Streams whose own pending entries are still being re-read, and the cursor of each.
        self._history: dict[str, str] = {}
        self._claim_cursor: dict[str, str] = {}
        self._next_claim = 0.0
        self._next_touch = 0.0
        self._paused: set[str] = set()
        self._reset = True  # (re)check the groups and re-read own pending entries next poll
        self._drained_at = float("-inf")
        self._drained = False
        self._rotate = 0
        self._wakeup = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self, listener: AssignmentListener) -> None:
        if self._client is None:
            self._client = redis_client(self.url)
            # Entries as the server sends them, their fields one list of names and values in
            # turn: the converter reads them there (entries.py).
            self._client.set_response_callback("XREADGROUP", stream_replies)
            self._client.set_response_callback("XAUTOCLAIM", as_sent)
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
            self._acks.flush(client)
            self._ahead.give_back(client)
            leave_group(client, self.streams, self.group, self.consumer)
        except RedisError as exc:
            left = self._acks.left()
            log.warning(
                "mapping %s: %d settled entries could not be acked (%s); they will be delivered"
                " again",
                self.mapping,
                left,
                describe(exc),
            )
        self._acks.close()
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
        return group_info(groups, self.group) is not None

    def _group_start(self, stream: str) -> str:
        # A group that vanished (a restart without persistence) is recreated after the last entry
        # this consumer read, so later entries, even ones written before the recreation, are
        # read and earlier ones are not replayed; with nothing read yet, the starting position.
        return self._entries.last_seen.get(stream, self._start_id)

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
            self._ahead.drop()
            self._acks.lost()
            self._reset = False
        if self._acks.unacked:
            self._acks.flush(client)
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
        """New entries: those read ahead first, else one XREADGROUP (blocking up to the poll's
        timeout). A full reply, all of it wanted now, sends the next read ahead (overlap.py)
        before its records are made."""
        ahead = self._ahead
        if ahead.sent:
            count = ahead.count
            got = ahead.take()
            if not ahead.ready and ahead.more_waiting(got, count, streams, budget):
                ahead.send(client, *self._spread(streams, budget))
            ahead.ready += self._converted(got)
        if ahead.ready:
            out = ahead.hand_out(streams, budget)
            if out:
                return out
        streams, count = self._spread(streams, budget)
        # BLOCK 0 would wait forever: a non-positive timeout does not block at all.
        block = min(MAX_BLOCK_MS, max(1, int(timeout_s * 1000))) if timeout_s > 0 else None
        reply: Any = client.xreadgroup(
            self.group, self.consumer, dict.fromkeys(streams, ">"), count=count, block=block
        )
        if ahead.more_waiting(reply, count, streams, budget):
            ahead.send(client, streams, count)
        return self._converted(reply)

    def _converted(self, reply: Any) -> list[Record]:
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
        live: dict[str, list[RawEntry]] = {}
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
        live: dict[str, list[RawEntry]] = {}
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
        self, client: redis.Redis, stream: str, entries: list[RawEntry]
    ) -> list[RawEntry]:
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
        for chunk in chunks(deleted):
            client.xack(stream, self.group, *chunk)
        return [e for e in entries if e[1]]

    def _with_counts(
        self,
        client: redis.Redis,
        live: Mapping[str, list[RawEntry]],
        now: float,
    ) -> list[Record]:
        """Records of redelivered entries, with the delivery counts XPENDING reports."""
        live = {s: entries for s, entries in live.items() if entries}
        if not live:
            return []
        pipe = client.pipeline(transaction=False)
        for stream, entries in live.items():
            ids = sorted(entries, key=lambda e: id_key(e[0]))
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
        entries: Sequence[RawEntry],
        now: float,
        counts: Mapping[bytes, int] | None = None,
    ) -> list[Record]:
        """Engine records for `entries`, skipping any already in flight."""
        out: list[Record] = []
        held = self._in_flight[stream]
        convert = self._entries.convert
        try:
            convert(stream, entries, held, now, counts, out)
        except Exception:
            # Some entry cannot be converted: the rest one at a time, and that one becomes a
            # letter, so that no entry stops its stream.
            for entry in entries:
                try:
                    convert(stream, (entry,), held, now, counts, out)
                except Exception as exc:
                    entry_id = entry[0].decode()
                    held[entry_id] = now
                    out.append(self._entries.undecodable(stream, entry_id, entry[1], exc))
        return out

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
        for stream, held in self._in_flight.items():
            for entry_id, since in held.items():
                if since <= cutoff:
                    due.setdefault((stream, since), []).append(entry_id)
        if not due:
            return
        pipe = client.pipeline(transaction=False)
        for (stream, since), ids in due.items():
            min_idle_ms = max(0, int((now - since - margin_s) * 1000))
            for chunk in chunks(ids):
                pipe.xclaim(
                    stream, self.group, self.consumer, min_idle_ms, list(chunk), justid=True
                )
        pipe.execute(raise_on_error=False)
        for (stream, _), ids in due.items():
            held = self._in_flight[stream]
            for entry_id in ids:
                if entry_id in held:
                    held[entry_id] = now

    # --- checkpointing ---------------------------------------------------------------------------

    def ack(self, records: Sequence[Record]) -> None:
        """XACK, one write: the reply is read before the next XACK (overlap.Acks); on a lost
        connection the loop acks these entries again after reconnecting."""
        by_stream: dict[str, list[str]] = {}
        stream: str | None = None
        ids: list[str] = []
        for r in records:
            meta: RedisMeta = r.meta
            if meta.stream != stream:  # a batch is mostly one stream's: its list is kept
                stream = meta.stream
                ids = by_stream.setdefault(stream, [])
            ids.append(meta.entry_id)
        self._acks.send(self._client, by_stream)

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
        if self._ahead.holding:
            return False
        try:
            self._acks.confirm()
        except RETRYABLE_ERRORS:
            return False
        if self._acks.unacked:
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
        for i, stream in enumerate(self.streams):
            groups, summary, last = replies[3 * i : 3 * i + 3]
            info = group_info(groups, self.group)
            if info is None:
                return False
            if last and id_key(last[0][0]) > id_key(info["last-delivered-id"]):
                return False
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
