"""Kafka on confluent-kafka: a consumer-group source with offset checkpoints, pause/resume and
Lambda's starting positions, an idempotent producer for dead letters, and for `workers dlq` a
reader of dead-letter topics with resumable progress and a producer putting records back."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    AdminClient,
    NewTopic,
)

from connectors.kafka import config as cfg
from connectors.kafka.limits import RecordLimit, is_size_error, record_bytes
from connectors.kafka.shape import TIMESTAMP_TYPES, KafkaMeta, KafkaShape, kafka_item
from workers.engine.letters import REPLAY_HEADER, parse_letter
from workers.engine.lettersize import PAYLOAD_OMITTED
from workers.engine.ports import (
    AssignmentListener,
    Capabilities,
    ConnectorConfigError,
    LetterTooLarge,
    SourceBase,
    StoredLetter,
    undecodable,
)
from workers.engine.records import Record
from workers.engine.redact import describe, redact_text
from workers.engine.shapes import encoded_size

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

log = logging.getLogger("connectors.kafka")

# How long start-up waits for the cluster's metadata before reporting it unreachable; the
# engine then retries `open()` with backoff.
CONNECT_TIMEOUT_S = 5.0
# Bound on broker round trips made inside rebalance callbacks (committed offsets, offset lookup
# by time): the callback runs on the poll thread, which must keep polling.
CALLBACK_TIMEOUT_S = 10.0
# Repeated driver errors (librdkafka retries a down broker many times a second) are logged once
# per this interval, with a count of the ones held back.
LOG_EVERY_S = 30.0
# Dead letters not confirmed in this time fail, and the engine retries them with backoff; kept
# well below librdkafka's 300 s default so that a stuck producer never holds up a drain.
DEFAULT_MESSAGE_TIMEOUT_MS = 10_000
# librdkafka's default session timeout, used when client_config does not set one.
DEFAULT_SESSION_TIMEOUT_MS = 45_000
# How long a fetch waits at the broker for new data (librdkafka's default is 500 ms). A resumed
# partition joins the next fetch only, so a long wait makes every resume stall the partition.
DEFAULT_FETCH_WAIT_MAX_MS = 100
# librdkafka backs the fetcher off for fetch.queue.backoff.ms (1 s by default) whenever its local
# queue is full; a poller draining fast then waits idle for that second (measured: 1.7x the
# throughput at 10 ms, bench/results/stages-thread.md).
DEFAULT_FETCH_QUEUE_BACKOFF_MS = 10
# A paused partition keeps being read into a hold of at most this many records (or bytes) before
# librdkafka is told to pause it: its pause drops everything already fetched for the partition
# and resuming costs a new fetch, which for short pauses (a lane that just took a batch) cut
# throughput several times over.
SOFT_PAUSE_RECORDS = 1000
SOFT_PAUSE_BYTES = 8 * 1024 * 1024

_Headers = list[tuple[str, str | bytes | None]]

RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (KafkaException,)


class KafkaUnavailable(KafkaException):
    """The cluster cannot be reached, or a topic is missing; retried with backoff."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "Kafka unavailable"


class KafkaFatalError(RuntimeError):
    """librdkafka reported a fatal error: this client is unusable and the poller must restart."""


class KafkaDeliveryError(RuntimeError):
    """A dead letter was not confirmed by the cluster."""


class KafkaRecordTooLarge(KafkaDeliveryError):
    """The producer or the broker refused a record for its size; the same record never fits."""


def _reason(exc: BaseException) -> str:
    """The readable part of a confluent-kafka exception (its KafkaError's text), never empty,
    passwords masked."""
    first = exc.args[0] if exc.args else None
    if isinstance(first, KafkaError) and first.str():
        return redact_text(first.str())
    return describe(exc)


class _Throttled:
    """Logs each kind of message at most once per `LOG_EVERY_S`, counting the ones held back.

    librdkafka reports a refused connection on every reconnect attempt (many per second when
    the port is closed); without this a broker outage floods the log.
    """

    _DIGITS = re.compile(r"\d+")

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        self.logger = logger
        self.prefix = prefix
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, message: str) -> None:
        # Numbers (timings, offsets, counts) vary between otherwise identical messages.
        key = self._DIGITS.sub("#", message)[:200]
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < LOG_EVERY_S:
                self._last[key] = (last, held + 1)
                return
            self._last[key] = (now, 0)
        suffix = f" (and {held} similar since the last time)" if held else ""
        self.logger.log(level, "%s%s%s", self.prefix, message, suffix)


class _DriverLog:
    """librdkafka's log lines, sent to Python logging through `_Throttled`.

    confluent-kafka calls `.log(level, "%s [%s] %s", facility, client, text)`.
    """

    def __init__(self, throttled: _Throttled) -> None:
        self.throttled = throttled

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if args and args[0] == "FAIL":
            return  # a failed connection, which the error callback reports as well
        self.throttled.log(level, fmt % args if args else fmt)


def _split_unit(unit: str) -> tuple[str, int]:
    topic, _, partition = unit.rpartition("-")
    return topic, int(partition)


def _cooperative(strategy: str) -> bool:
    """librdkafka uses the cooperative protocol only if every strategy is cooperative."""
    return all(s.strip() == "cooperative-sticky" for s in strategy.split(","))


class KafkaSource(SourceBase):
    """One member of the mapping's consumer group.

    Offsets are committed only for records the engine settled; the group's committed offset
    decides where a partition resumes, and `starting_position` applies only to partitions the
    group never committed, as on Lambda
    (https://docs.aws.amazon.com/lambda/latest/dg/kafka-starting-positions.html).
    """

    capabilities = Capabilities(ordered=True, checkpoint="offset", pausable=True)
    retryable_errors = RETRYABLE_ERRORS

    def __init__(self, mapping: EventSourceMapping, instance: int = 0) -> None:
        src = mapping.source
        if not isinstance(src, cfg.KafkaSource):
            raise TypeError(f"mapping {mapping.name}: not a Kafka source")
        self.mapping = mapping.name
        self.topics = list(src.topics)
        self.group = src.consumer_group_id or mapping.name
        self.servers = src.bootstrap_servers
        self.starting_position = src.starting_position
        self.starting_timestamp_ms = src.starting_position_timestamp_ms
        self.shape = KafkaShape(src.bootstrap_servers)
        self._errors = _Throttled(log, f"mapping {mapping.name}: kafka: ")
        strategy = str(src.client_config.get("partition.assignment.strategy", "cooperative-sticky"))
        self._cooperative = _cooperative(strategy)
        session_ms = float(src.client_config.get("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS))
        # A member left with no partitions counts as caught up only once a rebalance would have
        # handed it some: the cooperative protocol's two rounds each take up to a session.
        self._empty_settle_s = 3 * session_ms / 1000
        self.config: dict[str, Any] = {
            "bootstrap.servers": src.bootstrap_servers,
            "group.id": self.group,
            "client.id": f"esm-workers-{mapping.name}-{instance}",
            "partition.assignment.strategy": "cooperative-sticky",
            "fetch.wait.max.ms": DEFAULT_FETCH_WAIT_MAX_MS,
            "fetch.queue.backoff.ms": DEFAULT_FETCH_QUEUE_BACKOFF_MS,
            **src.client_config,
            # Owned by the runtime (config validation rejects them in client_config): offsets
            # are committed by hand once records settle, and end-of-partition events tell when
            # a partition is caught up. AT_TIMESTAMP falls back to the earliest offset where no
            # offset matches the time.
            "auto.offset.reset": "latest" if src.starting_position == "LATEST" else "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            "logger": _DriverLog(self._errors),
        }
        self._consumer: Consumer | None = None
        self._listener: AssignmentListener | None = None
        self._fatal: KafkaError | None = None
        self._last_error = ""
        # Loop-thread state, keyed by unit ("topic-partition").
        self._assigned: dict[str, TopicPartition] = {}
        self._eof: set[str] = set()
        self._next: dict[str, int] = {}
        self._end: dict[str, int] = {}
        self._metas: dict[tuple[str, int, int], KafkaMeta] = {}
        self._units: dict[tuple[str, int], str] = {}
        # Units started by LATEST or AT_TIMESTAMP: records older than the timestamp are skipped
        # until the first one at or after it, or the end of the partition (see _skip_older).
        self._skip: dict[str, int] = {}
        self._skipped: dict[str, int] = {}
        self._joined = False
        self._empty_since: float | None = None
        # Records to hand out before consuming more: a record taken while serving callbacks
        # (poll with max_records 0), and the hold of a partition that was resumed.
        self._ready: list[Record] = []
        # Paused units: their records held back, and those librdkafka itself pauses.
        self._held: dict[str, list[Record]] = {}
        self._held_bytes: dict[str, int] = {}
        self._hard_paused: set[str] = set()
        # Positions the engine asked to commit, issued by the loop thread (see `commit`).
        self._pending: dict[str, int] = {}
        self._pending_lock = threading.Lock()

    # --- connection ------------------------------------------------------------------------------

    def _new_consumer(self, config: dict[str, Any]) -> Consumer:
        return Consumer(config)

    def open(self, listener: AssignmentListener) -> None:
        self._listener = listener
        self._reset_state()
        consumer = self._new_consumer(dict(self.config))
        try:
            metadata = consumer.list_topics(timeout=CONNECT_TIMEOUT_S)
        except KafkaException as exc:
            # Serve the error callback once: it names the real cause (refused, DNS, TLS, SASL).
            self._last_error = _reason(exc)
            consumer.poll(0)
            reason = self._last_error
            consumer.close()
            raise KafkaUnavailable(
                f"cannot reach bootstrap servers {self.servers}: {reason}"
            ) from None
        missing = [
            t
            for t in self.topics
            if not t.startswith("^")  # a regex subscription matches whatever exists
            and (t not in metadata.topics or metadata.topics[t].error is not None)
        ]
        if missing:
            consumer.close()
            raise KafkaUnavailable(
                f"topic(s) {', '.join(missing)} not found at {self.servers}"
                " (esm-workers does not create source topics)"
            )
        consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._consumer = consumer
        log.info(
            "mapping %s: connected to %s; joining group %r for %s",
            self.mapping,
            self.servers,
            self.group,
            ", ".join(self.topics),
        )

    def _reset_state(self) -> None:
        self._assigned.clear()
        self._eof.clear()
        self._next.clear()
        self._end.clear()
        self._skip.clear()
        self._ready.clear()
        self._held.clear()
        self._held_bytes.clear()
        self._hard_paused.clear()
        self._joined = False
        self._empty_since = None
        self._fatal = None
        self._last_error = ""
        with self._pending_lock:
            self._pending.clear()

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            self._commit_pending(consumer, None, sync=True)
            # Leaves the group; librdkafka first calls on_revoke, which commits what settled.
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("mapping %s: closing the consumer: %s", self.mapping, _reason(exc))

    # --- driver callbacks (served on the loop thread, inside consume/poll) -----------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            self._last_error = err.str()  # the cause, not the summary "1/1 brokers are down"
        if err.fatal():
            self._fatal = err
            log.error("mapping %s: kafka: fatal error: %s", self.mapping, err.str())
            return
        self._errors.log(logging.WARNING, err.str())

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [tp for tp in partitions if tp.error is not None]
        if err is None and not failed:
            return
        # A commit for partitions moved to another member fails; the next owner resumes from the
        # last commit that succeeded and may see a few records again (at-least-once).
        what = (
            err.str()
            if err is not None
            else "; ".join(
                f"{tp.topic}-{tp.partition}: {tp.error.str()}" for tp in failed if tp.error
            )
        )
        self._errors.log(logging.WARNING, f"offset commit failed: {what}")

    def _unit(self, topic: str, partition: int) -> str:
        unit = self._units.get((topic, partition))
        if unit is None:
            unit = self._units[(topic, partition)] = f"{topic}-{partition}"
        return unit

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = True
        units = [self._unit(tp.topic, tp.partition) for tp in partitions]
        if self.starting_position != "TRIM_HORIZON" and partitions:
            self._apply_starting_position(consumer, partitions)
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        for unit, tp in zip(units, partitions, strict=True):
            self._assigned[unit] = TopicPartition(tp.topic, tp.partition)
            self._eof.discard(unit)
            self._next.pop(unit, None)
        self._empty_since = None if self._assigned else time.monotonic()
        if self._listener is not None and units:
            self._listener.on_assigned(units)

    def _apply_starting_position(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> None:
        """LATEST / AT_TIMESTAMP for partitions the group has no committed offset for."""
        try:
            committed = consumer.committed(partitions, timeout=CALLBACK_TIMEOUT_S)
        except KafkaException as exc:
            # librdkafka resumes from the committed offset by itself; without knowing whether
            # there is one, leave the partitions to it rather than risk skipping records.
            log.warning(
                "mapping %s: could not read committed offsets (%s); %s applies only where"
                " librdkafka finds none",
                self.mapping,
                _reason(exc),
                self.starting_position,
            )
            return
        fresh = [tp for tp in committed if tp.offset < 0]
        if not fresh:
            return
        if self.starting_position == "LATEST":
            since = int(time.time() * 1000)
        else:
            assert self.starting_timestamp_ms is not None
            since = self.starting_timestamp_ms
            self._seek_by_time(consumer, partitions, fresh, since)
        # Some brokers answer offset lookups inexactly: Tansu resolves "latest" to the start of
        # the last record batch and every time to the earliest offset (docs/brokers.md). Skipping
        # records older than the start until the first newer one (or the end) gives the same
        # records as an exact lookup, and does nothing on a broker that answers exactly.
        for tp in fresh:
            self._skip[self._unit(tp.topic, tp.partition)] = since

    def _seek_by_time(
        self,
        consumer: Consumer,
        partitions: list[TopicPartition],
        fresh: list[TopicPartition],
        since_ms: int,
    ) -> None:
        query = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in fresh]
        try:
            found = consumer.offsets_for_times(query, timeout=CALLBACK_TIMEOUT_S)
        except KafkaException as exc:
            log.warning(
                "mapping %s: offset lookup by time failed (%s); reading from the earliest offset"
                " and skipping older records",
                self.mapping,
                _reason(exc),
            )
            return
        # -1: no record at or after the time, so start at the end (Kafka's ListOffsets).
        offsets = {
            (tp.topic, tp.partition): tp.offset if tp.offset >= 0 else OFFSET_END for tp in found
        }
        for tp in partitions:
            offset = offsets.get((tp.topic, tp.partition))
            if offset is not None:
                tp.offset = offset

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        units = [self._unit(tp.topic, tp.partition) for tp in partitions]
        try:
            if self._listener is not None and units:
                # Returns once in-flight batches of these partitions settled (their positions
                # are then in `_pending`), or the drain budget passed.
                self._listener.on_revoked(units)
        finally:
            # Still a member, so a synchronous commit lands before the partitions move: the
            # next owner starts right after the last settled record.
            self._commit_pending(consumer, units, sync=True)
            self._forget(units)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        units = [self._unit(tp.topic, tp.partition) for tp in partitions]
        log.warning(
            "mapping %s: lost %s (session expired or broker restarted); another member may be"
            " reading them already",
            self.mapping,
            ", ".join(sorted(units)),
        )
        try:
            if self._listener is not None and units:
                self._listener.on_revoked(units)
        finally:
            # No commit: the partitions belong to someone else, whose commits must not be undone.
            with self._pending_lock:
                for unit in units:
                    self._pending.pop(unit, None)
            self._forget(units)

    def _forget(self, units: Collection[str]) -> None:
        for unit in units:
            self._assigned.pop(unit, None)
            self._eof.discard(unit)
            self._next.pop(unit, None)
            self._end.pop(unit, None)
            self._skip.pop(unit, None)
            self._held.pop(unit, None)
            self._held_bytes.pop(unit, None)
            self._hard_paused.discard(unit)
        gone = set(units)
        self._ready = [r for r in self._ready if r.source not in gone]
        if not self._assigned:
            self._empty_since = time.monotonic()

    # --- polling ---------------------------------------------------------------------------------

    def _require(self) -> Consumer:
        if self._fatal is not None:
            raise KafkaFatalError(f"kafka consumer failed: {self._fatal.str()}")
        if self._consumer is None:
            raise RuntimeError(f"mapping {self.mapping}: Kafka source is not open")
        return self._consumer

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        consumer = self._require()
        self._commit_pending(consumer, None, sync=False)
        if max_records <= 0:
            # confluent-kafka's consume(0) returns at once without serving callbacks, so take
            # at most one record to serve them and hand it out on the next call.
            if self._ready:
                time.sleep(timeout_s)
            else:
                self._ready = self._records_from(consumer.consume(1, timeout_s))
            self._require()
            return []
        records = self._ready[:max_records]
        del self._ready[:max_records]
        if len(records) < max_records:
            # consume(n, t) waits until n messages or t: take what is there now, and wait only
            # for a first record when there is none, so a trickle is not held back a full poll.
            got = consumer.consume(max_records - len(records), 0)
            if not got and not records:
                got = consumer.consume(1, timeout_s)
                if got and max_records > 1:
                    got += consumer.consume(max_records - 1, 0)
            records += self._records_from(got)
        self._require()  # a fatal error reported while consuming
        return records

    def _records_from(self, messages: list[Message]) -> list[Record]:
        # The hot path: one pass per fetched message, with lookups hoisted out of the loop.
        out: list[Record] = []
        assigned = self._assigned
        skip = self._skip
        metas = self._metas
        held = self._held
        units = self._units
        positions = self._next
        eof_discard = self._eof.discard
        item = kafka_item
        for m in messages:
            topic = m.topic() or ""
            partition = m.partition() or 0
            unit = units.get((topic, partition)) or self._unit(topic, partition)
            err = m.error()
            if err is not None:
                self._message_error(unit, m, err)
                continue
            if unit not in assigned:
                continue  # fetched before a revoke; the next owner reads it
            offset = m.offset() or 0
            eof_discard(unit)
            positions[unit] = offset + 1
            ts_type, ts = m.timestamp()
            if skip and unit in skip and self._skip_older(unit, ts):
                continue
            try:
                meta = metas.get((topic, partition, ts_type))
                if meta is None:
                    meta = metas[(topic, partition, ts_type)] = KafkaMeta(
                        topic, partition, TIMESTAMP_TYPES.get(ts_type, "NO_TIMESTAMP_TYPE")
                    )
                value = m.value() or b""  # a tombstone's null value is delivered as "" (base64 "")
                key = m.key()
                headers: Sequence[tuple[str, bytes]] = ()
                extra = 0
                raw_headers = m.headers()
                if raw_headers:
                    headers = []
                    for name, data in cast(_Headers, raw_headers):  # consumers get a list
                        data = data.encode() if isinstance(data, str) else data or b""
                        headers.append((name, data))
                        # Header bytes appear in the event as a JSON list of numbers.
                        extra += len(name) + 4 * len(data) + 8
                # 0 is "unknown" to the engine (no record-age check), as Kafka's -1 means.
                ts = ts if ts > 0 and ts_type != TIMESTAMP_NOT_AVAILABLE else 0
                record = Record(
                    unit,
                    offset,
                    value,
                    key,
                    ts,
                    headers,
                    0,
                    False,
                    encoded_size(value, key, extra),
                    meta,
                    item(topic, partition, offset, ts, meta.timestamp_type, key, value, headers),
                )
            except Exception as exc:  # no message may stop the partition: it becomes a letter
                record = self._undecodable(unit, topic, partition, offset, m, exc)
            if held and unit in held:
                self._hold(unit, record)
            else:
                out.append(record)
        return out

    def _undecodable(
        self, unit: str, topic: str, partition: int, offset: int, m: Message, exc: Exception
    ) -> Record:
        log.error(
            "mapping %s: %s@%d cannot be read (%s: %s); it goes to the on-failure destination",
            self.mapping,
            unit,
            offset,
            type(exc).__name__,
            exc,
        )
        value = m.value() or b""
        return undecodable(
            unit,
            offset,
            value,
            exc,
            key=m.key(),
            size=encoded_size(value, m.key()),
            meta=KafkaMeta(topic, partition, "NO_TIMESTAMP_TYPE"),
        )

    def _skip_older(self, unit: str, ts: int) -> bool:
        """True for a record before the starting timestamp on a partition still being skipped."""
        if ts >= self._skip[unit]:
            self._stop_skipping(unit)
            return False
        self._skipped[unit] = self._skipped.get(unit, 0) + 1
        return True

    def _stop_skipping(self, unit: str) -> None:
        del self._skip[unit]
        skipped = self._skipped.pop(unit, 0)
        if skipped:
            log.info(
                "mapping %s: %s: skipped %d record(s) from before the starting position %s",
                self.mapping,
                unit,
                skipped,
                self.starting_position,
            )

    def _message_error(self, unit: str, message: Message, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            end = message.offset() or 0
            self._end[unit] = end
            self._next[unit] = max(self._next.get(unit, 0), end)
            if unit in self._assigned:
                self._eof.add(unit)
            if unit in self._skip:
                self._stop_skipping(unit)
            return
        if err.fatal():
            self._fatal = err
            return
        self._errors.log(logging.WARNING, f"{unit}: {err.str()}")

    # --- checkpoints -----------------------------------------------------------------------------

    def commit(self, positions: Mapping[str, int]) -> None:
        """Record positions to commit; the loop thread sends them on its next poll.

        Called from worker threads. confluent-kafka serialises calls into one consumer across
        threads (a commit waits for a running consume() to return), and the revoke callback runs
        inside consume() while it waits for those same workers, so workers never call the
        consumer themselves.
        """
        with self._pending_lock:
            self._pending.update(positions)

    def _commit_pending(
        self, consumer: Consumer, units: Collection[str] | None, sync: bool
    ) -> None:
        with self._pending_lock:
            if units is None:
                taken, self._pending = self._pending, {}
            else:
                taken = {u: self._pending.pop(u) for u in units if u in self._pending}
        if not taken:
            return
        offsets = [TopicPartition(*_split_unit(unit), position) for unit, position in taken.items()]
        try:
            if sync:
                result = consumer.commit(offsets=offsets, asynchronous=False)
                failed = [tp for tp in result or [] if tp.error is not None]
                if failed:
                    self._on_commit(None, failed)
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            # Not fatal: the records after the last successful commit are delivered again.
            self._errors.log(logging.WARNING, f"offset commit failed: {_reason(exc)}")

    # --- flow control and state ------------------------------------------------------------------

    def _partitions(self, units: Collection[str]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition)
            for unit in units
            if (tp := self._assigned.get(unit)) is not None
        ]

    def pause(self, units: Collection[str]) -> None:
        """Hold the units' records back; librdkafka pauses a unit once its hold is full."""
        fresh = {u for u in units if u in self._assigned and u not in self._held}
        if not fresh:
            return
        for unit in fresh:
            self._held[unit] = []
            self._held_bytes[unit] = 0
        if any(r.source in fresh for r in self._ready):
            ready, self._ready = self._ready, []
            for r in ready:
                if r.source in fresh:
                    self._hold(r.source, r)
                else:
                    self._ready.append(r)

    def _hold(self, unit: str, record: Record) -> None:
        self._held[unit].append(record)
        self._held_bytes[unit] += len(record.value)
        full = (
            len(self._held[unit]) >= SOFT_PAUSE_RECORDS
            or self._held_bytes[unit] >= SOFT_PAUSE_BYTES
        )
        if full and unit not in self._hard_paused:
            # librdkafka resumes after the last record consume() returned, so the held records
            # are not fetched again.
            self._hard_paused.add(unit)
            self._require().pause(self._partitions([unit]))

    def resume(self, units: Collection[str]) -> None:
        hard = [u for u in units if u in self._hard_paused]
        for unit in units:
            # Ahead of anything consumed later, so the unit's records stay in order.
            self._ready.extend(self._held.pop(unit, ()))
            self._held_bytes.pop(unit, None)
        if hard:
            self._hard_paused.difference_update(hard)
            consumer = self._require()
            partitions = self._partitions(hard)
            consumer.resume(partitions)
            # After resume() librdkafka left the partition unfetched for 0.7-0.8 s (measured,
            # bench/README.md); a seek to the next position starts its fetch at once.
            for tp in partitions:
                position = self._next.get(self._unit(tp.topic, tp.partition))
                if position is not None:
                    try:
                        consumer.seek(TopicPartition(tp.topic, tp.partition, position))
                    except KafkaException as exc:
                        self._errors.log(logging.WARNING, f"seek after resume: {_reason(exc)}")

    def assignment(self) -> frozenset[str]:
        return frozenset(self._assigned)

    def caught_up(self) -> bool:
        if self._consumer is None or not self._joined or self._ready:
            return False
        if any(self._held.values()):
            return False
        if not self._assigned:
            # More members than partitions: idle once the group has had time to settle.
            since = self._empty_since
            return since is not None and time.monotonic() - since >= self._empty_settle_s
        return self._eof.issuperset(self._assigned)

    def lag(self) -> Mapping[str, int]:
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[str, int] = {}
        for unit, tp in self._assigned.items():
            position = self._next.get(unit)
            if position is None:
                continue
            # The high watermark of the last fetch; ListOffsets is wrong on some brokers
            # (docs/brokers.md), and the end-of-partition offset is exact when newer.
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            high = max(high, self._end.get(unit, -1))
            if high >= 0:
                out[unit] = max(0, high - position) + len(self._held.get(unit, ()))
        return out


# --- dead letters --------------------------------------------------------------------------------

# The header naming the mapping a dead letter belongs to (a topic may hold several mappings').
MAPPING_HEADER = "esm-mapping"
# Room `max_letter_bytes` leaves for a letter's headers (mapping, condition, error type, source
# topic, partition and offset) and its framing; `deliver` checks the exact size.
LETTER_ENVELOPE_BYTES = 1024

# Consumer-only properties a destination inherits with the source's client_config; a producer
# warns about each of them, so they are left out.
_CONSUMER_ONLY = re.compile(
    r"^(session\.timeout\.ms|heartbeat\.interval\.ms|max\.poll\.interval\.ms"
    r"|partition\.assignment\.strategy|group\..*|isolation\.level|auto\.commit\.interval\.ms"
    r"|check\.crcs|enable\.partition\.eof|fetch\..*|queued\..*|coordinator\.query\.interval\.ms)$"
)
# Producer errors after which a new producer is needed: an idempotent producer whose id the
# broker forgot (e.g. after a restart) otherwise keeps failing (docs/brokers.md).
_RESET_CODES = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._FATAL,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.INVALID_PRODUCER_EPOCH,
}


class _ConfirmedProducer:
    """A producer whose `send` returns once the cluster confirmed every message, or raises.

    A message not confirmed in time is purged, so that it is not produced later next to the
    caller's retry, and the producer is replaced, as it is after errors that leave it unusable.
    """

    def __init__(self, config: dict[str, Any], what: str) -> None:
        self.config = config
        self.what = what
        timeout_ms = config.get("delivery.timeout.ms", config.get("message.timeout.ms", 300_000))
        # librdkafka reports a definite failure after message.timeout.ms; wait a little longer.
        self.timeout_s = float(timeout_ms) / 1000 + 5.0
        self._lock = threading.Lock()
        self._producer: Producer | None = None

    def producer(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = Producer(dict(self.config))
            return self._producer

    def send(self, messages: Sequence[dict[str, Any]], where: str) -> None:
        """Produce `messages` (keyword arguments of `Producer.produce`), in order."""
        outcome: list[KafkaError | None] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            outcome.append(err)

        # One send at a time: a failed producer is replaced here without racing another thread.
        with self._lock:
            producer = self._producer
            if producer is None:
                producer = self._producer = Producer(dict(self.config))
            try:
                for message in messages:
                    producer.produce(**message, on_delivery=on_delivery)
            except (KafkaException, BufferError) as exc:
                self._discard(producer)
                first = exc.args[0] if exc.args else None
                too_large = isinstance(first, KafkaError) and is_size_error(first)
                raise (KafkaRecordTooLarge if too_large else KafkaDeliveryError)(
                    f"{self.what} not accepted for {where}: {_reason(exc)}"
                ) from None
            producer.flush(self.timeout_s)
            if len(outcome) < len(messages):
                self._discard(producer)
                raise KafkaDeliveryError(
                    f"{self.what} not confirmed by {where} within {self.timeout_s:.0f}s"
                )
            errors = [err for err in outcome if err is not None]
            if errors:
                if any(err.fatal() or err.code() in _RESET_CODES for err in errors):
                    self._producer = None
                too_large = any(is_size_error(err) for err in errors)
                raise (KafkaRecordTooLarge if too_large else KafkaDeliveryError)(
                    f"{self.what} refused by {where}: {errors[0].str()}"
                )

    def _discard(self, producer: Producer) -> None:
        producer.purge(in_queue=True, in_flight=True)
        producer.poll(0)
        self._producer = None

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(5.0)


class KafkaDestination:
    """Produces each dead letter as one JSON record and returns once the cluster confirmed it.

    `enable.idempotence` and `acks=all` by default (client_config can override them), so a
    confirmed letter is on every in-sync replica and retries do not duplicate it.
    """

    def __init__(self, dst: cfg.KafkaDestination, mapping: EventSourceMapping) -> None:
        if dst.bootstrap_servers is None:
            raise ValueError(
                f"mapping {mapping.name}: the Kafka destination has no bootstrap_servers"
            )
        self.topic = dst.topic
        self.servers = dst.bootstrap_servers
        self.mapping = mapping.name
        self._errors = _Throttled(log, f"mapping {mapping.name}: dead-letter producer: ")
        self.config: dict[str, Any] = {
            "bootstrap.servers": dst.bootstrap_servers,
            "client.id": f"esm-workers-{mapping.name}-dlq",
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
            **{k: v for k, v in dst.client_config.items() if not _CONSUMER_ONLY.match(k)},
            "error_cb": self._on_error,
            "logger": _DriverLog(self._errors),
        }
        # Dead letters are rare: one at a time.
        self._sender = _ConfirmedProducer(self.config, "dead letter")
        self.timeout_s = self._sender.timeout_s
        self._limit = RecordLimit(self.config, self.topic, self._admin_config)

    def _admin_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if not _PRODUCER_ONLY.match(k)}

    def max_letter_bytes(self) -> int | None:
        """The topic's limit less room for the headers (a key as large again is checked when
        the letter is delivered)."""
        return max(0, self._limit.bytes() - LETTER_ENVELOPE_BYTES)

    def _on_error(self, err: KafkaError) -> None:
        self._errors.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        body = orjson.dumps(letter)
        request = letter.get("requestContext") or {}
        error = letter.get("error") or {}
        headers: _Headers = [
            (MAPPING_HEADER, self.mapping.encode()),
            ("esm-condition", str(request.get("condition", "")).encode()),
            ("esm-error-type", str(error.get("errorType", "")).encode()),
        ]
        key: bytes | None = None
        if records:
            first = records[0]
            key = first.key
            meta = first.meta
            topic, partition = (
                (meta.topic, meta.partition) if isinstance(meta, KafkaMeta) else (first.source, 0)
            )
            headers += [
                ("esm-source-topic", topic.encode()),
                ("esm-source-partition", str(partition).encode()),
                ("esm-source-offset", str(first.position).encode()),
            ]
        size = record_bytes(body, key, headers)
        limit = self._limit.bytes()
        if size > limit and key is not None and letter.get(PAYLOAD_OMITTED):
            # The key only spreads letters over partitions: a letter without payload that its
            # record's key alone makes too large goes without it.
            key = None
            size = record_bytes(body, key, headers)
        where = f"topic {self.topic!r} at {self.servers}"
        if size > limit:
            # librdkafka would refuse it too (message.max.bytes), or a broker enforcing the
            # topic's max.message.bytes: sending it cannot succeed.
            raise LetterTooLarge(
                f"a letter of {size} bytes is over the limit of {limit} bytes for {where}",
                limit - (size - len(body)),
            )
        message = {"topic": self.topic, "value": body, "key": key, "headers": headers}
        try:
            self._sender.send([message], where)
        except KafkaRecordTooLarge as exc:
            limit = self._limit.refused(size)
            raise LetterTooLarge(str(exc), limit - (size - len(body))) from None

    def close(self) -> None:
        self._sender.close()


# --- reading dead letters back, replaying onto the source (workers dlq) -------------------------

# A mapping's replay progress: this consumer group's committed offsets on the dead-letter topic.
REPLAY_GROUP_SUFFIX = "-dlq-replay"
# Letters replayed beyond a group's committed offset (past a letter a filter skipped): one small
# compacted topic per cluster, created by the first replay that needs it (see
# KafkaDeadLetterStore).
REPLAY_STATE_TOPIC = "_esm-dlq-replay-state"
# Reading the topic fails when the cluster sends nothing for this long.
READ_TIMEOUT_S = 30.0
READ_BATCH = 500
READ_WAIT_S = 0.1
READ_FETCH_WAIT_MS = 10
# Records held per partition while partitions are merged oldest first; a partition that runs
# ahead of the others is paused until they catch up.
MERGE_HOLD_RECORDS = 500
# Producer-only properties a destination's client_config may hold; the consumer reading the
# letters back would warn about each of them.
_PRODUCER_ONLY = re.compile(
    r"^(acks|request\.required\.acks|enable\.idempotence|enable\.gapless\.guarantee|linger\.ms"
    r"|queue\.buffering\..*|batch\.(size|num\.messages)|compression\.(type|codec|level)"
    r"|message\.timeout\.ms|delivery\.timeout\.ms|request\.timeout\.ms|retries"
    r"|message\.send\.max\.retries|partitioner|sticky\.partitioning\.linger\.ms"
    r"|transactional\.id|transaction\.timeout\.ms)$"
)


@dataclass(slots=True)
class _Progress:
    """Replay progress on one partition of the dead-letter topic, for one `pending()`."""

    end: int  # the partition's end when `pending()` was called
    committed: int | None  # the group's committed offset; None: never committed
    passed: int  # every record before this offset was offered or passed over
    done: set[int]  # offsets replayed beyond the committed one
    offered: set[int] = field(default_factory=set)  # offered and not (yet) marked done
    saved: bool = False  # the state topic holds a record for this partition


class KafkaDeadLetterStore:
    """Reads a dead-letter topic back for `workers dlq`; replay progress is the consumer group
    `<mapping>-dlq-replay` on that topic, so an interrupted replay resumes where it stopped.

    `pending()` only reads: the group's committed offsets (without joining the group), the replay
    state below, and the topic through `assign()`. It takes the end of every partition when
    called, by reading to the end of the partition (some brokers answer ListOffsets inexactly,
    docs/brokers.md), and yields the records from the committed offset (the beginning when there
    is none) up to that end: oldest first by record time across partitions, in offset order
    within one. Letters a replay writes back later wait for the next replay. Records of other
    mappings (`esm-mapping` header or `mapping` field) are passed over silently; records that
    are no dead letter, with a warning.

    `done()` commits, synchronously and per partition, the offset after the longest run of
    records replayed or passed over: a letter offered but not replayed (skipped by `--error-type`
    or `--since`, or not reached before `--limit` or a signal) holds the commit back, so that it
    is offered again. Letters replayed beyond the committed offset are remembered, before the
    commit, in the compacted topic `_esm-dlq-replay-state` (key `<group>/<topic>/<partition>`,
    value their offsets and the committed offset they apply from) and passed over by every later
    `pending()`; the record is ignored once the group's offsets are deleted or reset below it,
    and deleted when the commit passes them all. (Kafka keeps such data in a commit's metadata
    string, but not every Kafka-protocol broker does: Tansu drops it, docs/brokers.md.) Where the
    state cannot be written (no right to create the topic, say), a warning says that those
    letters may be offered again. A crash repeats at most the letter being replayed.

    Two replays of one mapping must not run at the same time.
    """

    def __init__(self, dst: cfg.KafkaDestination, mapping: EventSourceMapping) -> None:
        if dst.bootstrap_servers is None:
            raise ValueError(
                f"mapping {mapping.name}: the Kafka destination has no bootstrap_servers"
            )
        self.topic = dst.topic
        self.servers = dst.bootstrap_servers
        self.mapping = mapping.name
        self.group = f"{mapping.name}{REPLAY_GROUP_SUFFIX}"
        self._owner = mapping.name.encode()
        self._where = f"dead-letter topic {self.topic!r} at {self.servers}"
        self._errors = _Throttled(log, f"mapping {mapping.name}: dead-letter topic: ")
        self._last_error = ""
        client = {
            "bootstrap.servers": dst.bootstrap_servers,
            "client.id": f"esm-workers-{mapping.name}-dlq-replay",
            "error_cb": self._on_error,
            "logger": _DriverLog(self._errors),
        }
        self.config: dict[str, Any] = {
            **client,
            # The end of a partition is known only from an empty fetch, which the broker holds
            # this long waiting for data: librdkafka's 500 ms would be paid on every read.
            "fetch.wait.max.ms": READ_FETCH_WAIT_MS,
            **{k: v for k, v in dst.client_config.items() if not _PRODUCER_ONLY.match(k)},
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
        producer_config = {
            k: v for k, v in dst.client_config.items() if not _CONSUMER_ONLY.match(k)
        }
        self.state_config: dict[str, Any] = {
            **client,
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
            **producer_config,
            "acks": "all",
        }
        self.admin_config: dict[str, Any] = {
            **client,
            **{k: v for k, v in producer_config.items() if not _PRODUCER_ONLY.match(k)},
        }
        self._consumer: Consumer | None = None
        self._state: _ConfirmedProducer | None = None
        self._state_failed = False
        self._progress: dict[int, _Progress] = {}
        # Replayed by this process: passed over by a later `pending()` whatever the state says.
        self._done_ids: set[str] = set()
        self._done_offsets: dict[int, set[int]] = {}

    def _on_error(self, err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            self._last_error = err.str()
        self._errors.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())

    def _require(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(dict(self.config))
        return self._consumer

    def _unreachable(self, what: str, exc: KafkaException) -> KafkaUnavailable:
        reason = self._last_error or _reason(exc)
        return KafkaUnavailable(f"{self._where}: cannot {what}: {reason}")

    # --- reading -------------------------------------------------------------------------------

    def pending(self) -> Iterator[StoredLetter]:
        consumer = self._require()
        # Everything is taken now, not at the first next(): "as the topic stands when called".
        partitions = self._partitions_of(consumer, self.topic)
        if partitions is None:
            log.info("mapping %s: %s does not exist: no dead letters", self.mapping, self._where)
            return iter(())
        try:
            found = consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], timeout=READ_TIMEOUT_S
            )
        except KafkaException as exc:
            raise self._unreachable(f"read the offsets of group {self.group!r}", exc) from None
        failed = [f"partition {tp.partition}: {tp.error.str()}" for tp in found if tp.error]
        if failed:
            raise KafkaUnavailable(
                f"{self._where}: cannot read the offsets of group {self.group!r}: "
                + "; ".join(failed)
            )
        committed = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        bounds = self._bounds(consumer, self.topic, partitions)
        saved = self._read_state(consumer)
        self._progress = {}
        for p in partitions:
            low, end = bounds[p]
            at = committed.get(p)
            start = min(max(low, at if at is not None else low), end)
            done = {o for o in self._done_offsets.get(p, ()) if o >= start}
            state = saved.get(p)
            # Applies only from the committed offset it was written with: deleting the group or
            # resetting its offsets below that offers those letters again.
            if state is not None and at is not None and state[0] <= at:
                done.update(o for o in state[1] if o >= start)
            self._progress[p] = _Progress(end, at, start, done, saved=state is not None)
        return self._letters(consumer, self._progress)

    def _partitions_of(self, consumer: Consumer, topic: str) -> list[int] | None:
        """The topic's partitions, or None when it does not exist."""
        try:
            metadata = consumer.list_topics(topic, timeout=CONNECT_TIMEOUT_S)
        except KafkaException as exc:
            raise self._unreachable("fetch metadata", exc) from None
        found = metadata.topics.get(topic)
        if found is None or (
            found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            return None
        if found.error is not None:
            raise KafkaUnavailable(f"{self._where}: topic {topic!r}: {found.error.str()}")
        return sorted(found.partitions)

    def _bounds(
        self, consumer: Consumer, topic: str, partitions: list[int]
    ) -> dict[int, tuple[int, int]]:
        """(low watermark, end) of each partition, the end read from the last record batch."""
        lows: dict[int, int] = {}
        starts = []
        for p in partitions:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=READ_TIMEOUT_S
                )
            except KafkaException as exc:
                raise self._unreachable("read the topic's offsets", exc) from None
            lows[p] = low
            if high > low:
                # The listed end may be the start of the last batch plus one (docs/brokers.md).
                starts.append(TopicPartition(topic, p, max(low, high - 1)))
        ends = self._read_to_end(consumer, starts)
        return {p: (lows[p], ends.get(p, lows[p])) for p in partitions}

    def _read_to_end(
        self,
        consumer: Consumer,
        starts: list[TopicPartition],
        on_record: Callable[[Message], None] | None = None,
    ) -> dict[int, int]:
        """Reads the partitions from `starts` to their end-of-partition events; returns the
        ends. `on_record` gets every record before its partition's end."""
        if not starts:
            return {}
        consumer.assign(starts)
        ends: dict[int, int] = {}
        waiting = {tp.partition for tp in starts}
        heard = time.monotonic()
        while waiting:
            messages = consumer.consume(READ_BATCH, READ_WAIT_S)
            heard = self._check_heard(messages, heard)
            for m in messages:
                p = m.partition() or 0
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if p in waiting:
                            ends[p] = m.offset() or 0
                            waiting.discard(p)
                    else:
                        self._read_error(p, err)
                elif p in waiting and on_record is not None:
                    on_record(m)
        consumer.unassign()
        return ends

    def _check_heard(self, messages: list[Message], heard: float) -> float:
        now = time.monotonic()
        if messages:
            return now
        if now - heard > READ_TIMEOUT_S:
            reason = f": {self._last_error}" if self._last_error else ""
            raise KafkaUnavailable(
                f"{self._where}: nothing received for {READ_TIMEOUT_S:.0f}s{reason}"
            )
        return heard

    def _read_error(self, partition: int, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaFatalError(f"{self._where}: {err.str()}")
        self._errors.log(logging.WARNING, f"partition {partition}: {err.str()}")

    def _letters(
        self, consumer: Consumer, progress: dict[int, _Progress]
    ) -> Iterator[StoredLetter]:
        """The letters up to each partition's end, merged oldest first across partitions."""
        topic = self.topic
        reading = {p for p, pr in progress.items() if pr.passed < pr.end}
        if not reading:
            return
        held: dict[int, deque[Message]] = {p: deque() for p in reading}
        paused: set[int] = set()
        seen: set[str] = set()
        consumer.assign([TopicPartition(topic, p, progress[p].passed) for p in sorted(reading)])
        heard = time.monotonic()

        def stop_reading(p: int) -> None:
            reading.discard(p)
            if p not in paused:
                paused.add(p)  # what was appended since `pending()` is not read
                consumer.pause([TopicPartition(topic, p)])

        while reading or any(held.values()):
            if any(not held[p] for p in reading):
                messages = consumer.consume(READ_BATCH, READ_WAIT_S)
                heard = self._check_heard(messages, heard)
                for m in messages:
                    p = m.partition() or 0
                    if p not in reading:
                        continue
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            stop_reading(p)
                        else:
                            self._read_error(p, err)
                        continue
                    offset = m.offset() or 0
                    if offset >= progress[p].end:
                        stop_reading(p)
                        continue
                    held[p].append(m)
                    if offset + 1 >= progress[p].end:
                        stop_reading(p)
                    elif len(held[p]) >= MERGE_HOLD_RECORDS and p not in paused:
                        paused.add(p)
                        consumer.pause([TopicPartition(topic, p)])
                continue
            # Every partition still being read has a record held: the oldest goes first.
            p = min((q for q in held if held[q]), key=lambda q: (held[q][0].timestamp()[1], q))
            m = held[p].popleft()
            if p in reading and p in paused and len(held[p]) <= MERGE_HOLD_RECORDS // 2:
                paused.discard(p)
                consumer.resume([TopicPartition(topic, p)])
            stored = self._stored(p, m, progress[p], seen)
            if stored is not None:
                yield stored

    def _stored(
        self, partition: int, m: Message, progress: _Progress, seen: set[str]
    ) -> StoredLetter | None:
        offset = m.offset() or 0
        progress.passed = offset + 1
        if offset in progress.done:
            return None
        for name, data in cast(_Headers, m.headers() or []):
            if name == MAPPING_HEADER and data is not None:
                owner = data.encode() if isinstance(data, str) else data
                if owner != self._owner:
                    return None  # another mapping's letter on a shared topic
        letter, problem = parse_letter(m.value())
        if letter is None:
            log.warning(
                "mapping %s: %s: record %d@%d skipped, not a dead letter: %s",
                self.mapping,
                self._where,
                partition,
                offset,
                problem,
            )
            return None
        if letter.get("mapping", self.mapping) != self.mapping:
            return None
        letter_id: str = letter["requestContext"]["requestId"]
        if letter_id in self._done_ids or letter_id in seen:
            # A letter written twice (its delivery retried after a lost confirmation).
            return None
        seen.add(letter_id)
        progress.offered.add(offset)
        return StoredLetter(letter_id, letter, handle=(partition, offset))

    # --- progress ------------------------------------------------------------------------------

    def done(self, stored: StoredLetter) -> None:
        handle = stored.handle
        progress = (
            self._progress.get(handle[0])
            if isinstance(handle, tuple) and len(handle) == 2
            else None
        )
        if progress is None:
            raise ValueError(f"letter {stored.id} was not offered by {self._where}")
        partition, offset = handle
        if offset not in progress.offered:
            return  # marked already
        progress.offered.discard(offset)
        self._done_ids.add(stored.id)
        self._done_offsets.setdefault(partition, set()).add(offset)
        # The commit may pass everything up to the first letter still offered, or else up to
        # the last record looked at.
        target = min(progress.offered) if progress.offered else progress.passed
        progress.done = {o for o in progress.done if o >= target}
        if offset >= target:
            progress.done.add(offset)
            # Saved before the commit and applying from the offset committed before it, so a
            # crash between the two loses nothing.
            since = progress.committed if progress.committed is not None else target
            self._save(partition, progress, since)
        if progress.committed is None or target > progress.committed:
            self._commit(partition, target)
            progress.committed = target
        if progress.saved and not progress.done:
            self._save(partition, progress, target)  # nothing beyond the commit: delete it

    def _commit(self, partition: int, offset: int) -> None:
        consumer = self._require()
        try:
            result = consumer.commit(
                offsets=[TopicPartition(self.topic, partition, offset)], asynchronous=False
            )
        except KafkaException as exc:
            raise self._unreachable(f"save replay progress (group {self.group!r})", exc) from None
        failed = [tp for tp in result or [] if tp.error is not None]
        if failed and failed[0].error is not None:
            raise KafkaUnavailable(
                f"{self._where}: cannot save replay progress (group {self.group!r}):"
                f" {failed[0].error.str()}"
            )

    def _state_key(self, partition: int) -> bytes:
        return f"{self.group}/{self.topic}/{partition}".encode()

    def _read_state(self, consumer: Consumer) -> dict[int, tuple[int, set[int]]]:
        """This group's saved state per partition: (committed offset it applies from, done)."""
        partitions = self._partitions_of(consumer, REPLAY_STATE_TOPIC)
        if partitions is None:
            return {}
        prefix = f"{self.group}/{self.topic}/".encode()
        found: dict[int, tuple[int, set[int]] | None] = {}

        def on_record(m: Message) -> None:
            key = m.key()
            if key is None or not key.startswith(prefix) or not key[len(prefix) :].isdigit():
                return
            found[int(key[len(prefix) :])] = _parse_state(m.value())

        starts = [TopicPartition(REPLAY_STATE_TOPIC, p, OFFSET_BEGINNING) for p in partitions]
        self._read_to_end(consumer, starts, on_record)
        return {p: state for p, state in found.items() if state is not None}

    def _save(self, partition: int, progress: _Progress, since: int) -> None:
        """Writes the offsets replayed beyond the commit (a tombstone when there are none)."""
        if self._state_failed:
            return
        value = None
        if progress.done:
            value = orjson.dumps(
                {
                    "group": self.group,
                    "topic": self.topic,
                    "partition": partition,
                    "since": since,
                    "done": _ranges(progress.done),
                }
            )
        message = {"topic": REPLAY_STATE_TOPIC, "key": self._state_key(partition), "value": value}
        try:
            if self._state is None:
                self._create_state_topic()
                self._state = _ConfirmedProducer(self.state_config, "replay state")
            self._state.send([message], f"topic {REPLAY_STATE_TOPIC!r} at {self.servers}")
        except (KafkaException, KafkaDeliveryError) as exc:
            self._state_failed = True
            log.warning(
                "mapping %s: %s: letters replayed past one that was not are not remembered"
                " (%s); a later replay may offer them again",
                self.mapping,
                self._where,
                _reason(exc),
            )
            return
        progress.saved = value is not None

    def _create_state_topic(self) -> None:
        admin = AdminClient(dict(self.admin_config))
        topic = NewTopic(
            REPLAY_STATE_TOPIC,
            num_partitions=1,
            replication_factor=-1,  # the cluster's default
            config={"cleanup.policy": "compact"},
        )
        futures = admin.create_topics(
            [topic], operation_timeout=READ_TIMEOUT_S, request_timeout=READ_TIMEOUT_S
        )
        try:
            futures[REPLAY_STATE_TOPIC].result(timeout=READ_TIMEOUT_S)
        except KafkaException as exc:
            first = exc.args[0] if exc.args else None
            if not (
                isinstance(first, KafkaError) and first.code() == KafkaError.TOPIC_ALREADY_EXISTS
            ):
                raise

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        state, self._state = self._state, None
        if state is not None:
            state.close()
        if consumer is not None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning(
                    "mapping %s: closing the %s reader: %s", self.mapping, self._where, _reason(exc)
                )


def _ranges(offsets: Collection[int]) -> list[list[int]]:
    """Sorted offsets as inclusive [first, last] runs: {1, 2, 3, 7} -> [[1, 3], [7, 7]]."""
    runs: list[list[int]] = []
    for o in sorted(offsets):
        if runs and runs[-1][1] == o - 1:
            runs[-1][1] = o
        else:
            runs.append([o, o])
    return runs


def _parse_state(raw: bytes | None) -> tuple[int, set[int]] | None:
    """A replay-state record: (committed offset it applies from, offsets done); None for a
    tombstone or a record this version cannot read."""
    if raw is None:
        return None
    try:
        state = orjson.loads(raw)
        since = int(state["since"])
        done = {o for first, last in state["done"] for o in range(int(first), int(last) + 1)}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return since, done


class KafkaSourcePublisher:
    """Produces replayed records back onto the source (`workers dlq replay --to source`).

    A record goes to the topic and partition it was read from, so records of one key stay in
    order within their partition, with its key and headers plus `esm-replay-count` (replacing an
    older one): the source hands it on as a header, so a record failing again is dead-lettered
    with its replay count. Where that partition no longer exists the key partitioner chooses;
    a record from a topic the mapping no longer reads, or from another broker's letter, goes to
    the mapping's first topic. Records get new timestamps: they are new deliveries, and
    `maximum_record_age_s` counts from the replay. `acks=all` and idempotence: confirmed records
    are on every in-sync replica, and retries neither duplicate nor reorder them.
    """

    def __init__(self, src: cfg.KafkaSource) -> None:
        self.topics = list(dict.fromkeys(src.topics))
        self.servers = src.bootstrap_servers
        self._errors = _Throttled(log, f"replay producer to {src.bootstrap_servers}: ")
        self.config: dict[str, Any] = {
            "bootstrap.servers": src.bootstrap_servers,
            "client.id": "esm-workers-replay",
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
            **{k: v for k, v in src.client_config.items() if not _CONSUMER_ONLY.match(k)},
            "enable.idempotence": True,
            "acks": "all",
            "error_cb": self._on_error,
            "logger": _DriverLog(self._errors),
        }
        self._sender = _ConfirmedProducer(self.config, "replayed records")
        self._partitions: dict[str, int] = {}
        self._warned: set[str] = set()

    def _on_error(self, err: KafkaError) -> None:
        self._errors.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        if not records:
            return
        count = str(replay_count).encode()
        messages = []
        for record in records:
            topic, partition = self._target(record)
            headers = [(n, v) for n, v in record.headers if n != REPLAY_HEADER]
            headers.append((REPLAY_HEADER, count))
            message: dict[str, Any] = {
                "topic": topic,
                "value": record.value,
                "key": record.key,
                "headers": headers,
            }
            if partition is not None:
                message["partition"] = partition
            messages.append(message)
        self._sender.send(messages, f"the source at {self.servers}")

    def _target(self, record: Record) -> tuple[str, int | None]:
        """The topic and partition for a record; None: the key partitioner chooses."""
        meta = record.meta
        if isinstance(meta, KafkaMeta) and self._reads(meta.topic):
            topic, partition = meta.topic, meta.partition
            if partition < self._partition_count(topic):
                return topic, partition
            self._warn_once(
                f"{topic}-{partition}",
                f"partition {partition} of {topic} no longer exists; the key partitioner"
                " chooses for its records",
            )
            return topic, None
        literal = [t for t in self.topics if not t.startswith("^")]
        if not literal:
            raise ConnectorConfigError(
                f"record {record.source}@{record.position}: the mapping reads no topic by name"
                " to replay it onto"
            )
        topic = literal[0]
        self._partition_count(topic)  # fails readably when it does not exist
        origin = meta.topic if isinstance(meta, KafkaMeta) else record.source
        self._warn_once(
            origin,
            f"{origin} is not a source of the mapping; replaying its records onto {topic}",
        )
        return topic, None

    def _reads(self, topic: str) -> bool:
        return any(re.match(t, topic) if t.startswith("^") else t == topic for t in self.topics)

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            try:
                metadata = self._sender.producer().list_topics(topic, timeout=CONNECT_TIMEOUT_S)
            except KafkaException as exc:
                raise KafkaUnavailable(
                    f"cannot reach bootstrap servers {self.servers}: {_reason(exc)}"
                ) from None
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                reason = found.error.str() if found is not None and found.error else "missing"
                raise ConnectorConfigError(f"topic {topic!r} not found at {self.servers}: {reason}")
            count = self._partitions[topic] = len(found.partitions)
        return count

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("replay to %s: %s", self.servers, message)

    def close(self) -> None:
        self._sender.close()


# --- validate --connect --------------------------------------------------------------------------


def probe_kafka(src: cfg.KafkaSource) -> None:
    """Fetch the cluster's metadata and check that every topic exists; raises readably."""
    errors: list[str] = []
    consumer = Consumer(
        {
            "bootstrap.servers": src.bootstrap_servers,
            "group.id": src.consumer_group_id or "esm-workers-validate",
            **src.client_config,
            "error_cb": lambda err: errors.append(err.str()),
            "logger": _DriverLog(_Throttled(logging.getLogger("connectors.kafka.probe"), "")),
        }
    )
    try:
        try:
            metadata = consumer.list_topics(timeout=CONNECT_TIMEOUT_S)
        except KafkaException as exc:
            consumer.poll(0)
            reason = errors[-1] if errors else _reason(exc)
            raise KafkaUnavailable(
                f"cannot reach bootstrap servers {src.bootstrap_servers}: {reason}"
            ) from None
        missing = [
            t
            for t in src.topics
            if not t.startswith("^")
            and (t not in metadata.topics or metadata.topics[t].error is not None)
        ]
        if missing:
            raise KafkaUnavailable(
                f"topic(s) {', '.join(missing)} not found at {src.bootstrap_servers}"
            )
    finally:
        consumer.close()
