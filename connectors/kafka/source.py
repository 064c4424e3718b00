"""Kafka source on confluent-kafka: a member of the mapping's consumer group, with offset
checkpoints, pause/resume and Lambda's starting positions."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from connectors.kafka import config as cfg
from connectors.kafka.client import (
    CONNECT_TIMEOUT_S,
    DriverLog,
    Headers,
    KafkaFatalError,
    KafkaUnavailable,
    Throttled,
    log,
    reason_of,
)
from connectors.kafka.consumer import consumer_config, fresh_partitions, missing_topics
from connectors.kafka.shape import TIMESTAMP_TYPES, KafkaMeta, KafkaShape
from workers.engine.ports import AssignmentListener, Capabilities, SourceBase, undecodable
from workers.engine.records import Record
from workers.engine.shapes import RECORD_OVERHEAD_BYTES, encoded_size

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# librdkafka's default session timeout, used when client_config does not set one.
DEFAULT_SESSION_TIMEOUT_MS = 45_000
# A paused partition keeps being read into a hold of at most this many records (or bytes) before
# librdkafka is told to pause it: its pause drops everything already fetched for the partition
# and resuming costs a new fetch, which for short pauses (a lane that just took a batch) cut
# throughput several times over.
SOFT_PAUSE_RECORDS = 1000
SOFT_PAUSE_BYTES = 8 * 1024 * 1024

RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (KafkaException,)


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
        self.shape = KafkaShape(src.bootstrap_servers, src.event_source_arn)
        self._errors = Throttled(log, f"mapping {mapping.name}: kafka: ")
        strategy = str(src.client_config.get("partition.assignment.strategy", "cooperative-sticky"))
        self._cooperative = _cooperative(strategy)
        session_ms = float(src.client_config.get("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS))
        # A member left with no partitions counts as caught up only once a rebalance would have
        # handed it some: the cooperative protocol's two rounds each take up to a session.
        self._empty_settle_s = 3 * session_ms / 1000
        self.config: dict[str, Any] = {
            **consumer_config(
                src,
                group=self.group,
                client_id=f"esm-workers-{mapping.name}-{instance}",
                on_error=self._on_error,
                logger=DriverLog(self._errors),
            ),
            "on_commit": self._on_commit,
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
            self._last_error = reason_of(exc)
            consumer.poll(0)
            reason = self._last_error
            consumer.close()
            raise KafkaUnavailable(
                f"cannot reach bootstrap servers {self.servers}: {reason}"
            ) from None
        missing = missing_topics(metadata, self.topics)
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
            log.warning("mapping %s: closing the consumer: %s", self.mapping, reason_of(exc))

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
            fresh, since_ms = fresh_partitions(
                consumer,
                partitions,
                self.starting_position,
                self.starting_timestamp_ms,
                self.mapping,
            )
            # Some brokers answer offset lookups inexactly: Tansu resolves "latest" to the start
            # of the last record batch and every time to the earliest offset (docs/brokers.md).
            # Skipping records older than the start until the first newer one (or the end) gives
            # the same records as an exact lookup, and does nothing on a broker that answers
            # exactly.
            for tp in fresh:
                self._skip[self._unit(tp.topic, tp.partition)] = since_ms
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
        # The hot path. consume() hands out a partition's messages in runs, so what depends on
        # the partition alone (its unit, whether it is assigned, held or skipped) is settled
        # once per run, and each message costs its reads, its size and its Record.
        out: list[Record] = []
        append = out.append
        metas = self._metas
        positions = self._next
        topic = ""
        partition = -1  # no run yet
        unit = ""
        keep = hold = skipping = False
        meta: KafkaMeta | None = None
        meta_type = -1
        last = -1
        for m in messages:
            err = m.error()
            if err is not None:
                if last >= 0:
                    positions[unit] = last + 1
                    last = -1
                self._message_error(self._unit(m.topic() or "", m.partition() or 0), m, err)
                partition = -1  # the error may end a skip or a hold: look again
                continue
            if m.partition() != partition or m.topic() != topic:
                if last >= 0:
                    positions[unit] = last + 1
                    last = -1
                topic = m.topic() or ""
                partition = m.partition() or 0
                unit = self._units.get((topic, partition)) or self._unit(topic, partition)
                keep = unit in self._assigned  # else fetched before a revoke: the next owner's
                if keep:
                    self._eof.discard(unit)
                hold = unit in self._held
                skipping = unit in self._skip
                meta_type = -1
            if not keep:
                continue
            offset = m.offset() or 0
            last = offset
            ts_type, ts = m.timestamp()
            if skipping:
                if self._skip_older(unit, ts):
                    continue
                skipping = False
            try:
                if ts_type != meta_type:
                    meta = metas.get((topic, partition, ts_type))
                    if meta is None:
                        meta = metas[(topic, partition, ts_type)] = KafkaMeta(
                            topic, partition, TIMESTAMP_TYPES.get(ts_type, "NO_TIMESTAMP_TYPE")
                        )
                    meta_type = ts_type
                value = m.value() or b""  # a tombstone's null value is delivered as "" (base64 "")
                key = m.key()
                # The bytes the record adds to an event: base64 grows key and value by 4/3.
                size = (len(value) + 2) // 3 * 4 + RECORD_OVERHEAD_BYTES
                if key:
                    size += (len(key) + 2) // 3 * 4
                headers: Sequence[tuple[str, bytes]] = ()
                raw_headers = m.headers()
                if raw_headers:
                    headers = []
                    for name, data in cast(Headers, raw_headers):  # consumers get a list
                        data = data.encode() if isinstance(data, str) else data or b""
                        headers.append((name, data))
                        # Header bytes appear in the event as a JSON list of numbers.
                        size += len(name) + 4 * len(data) + 8
                # 0 is "unknown" to the engine (no record-age check), as Kafka's -1 means.
                if ts <= 0 or ts_type == TIMESTAMP_NOT_AVAILABLE:
                    ts = 0
                record = Record(unit, offset, value, key, ts, headers, 0, False, size, meta)
            except Exception as exc:  # no message may stop the partition: it becomes a letter
                record = self._undecodable(unit, topic, partition, offset, m, exc)
            if hold:
                self._hold(unit, record)
            else:
                append(record)
        if last >= 0:
            positions[unit] = last + 1
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
        """Record positions to commit: sent asynchronously by the next poll, or synchronously
        by a revoke (the engine calls this from inside `on_revoked`) and by `close`."""
        self._pending.update(positions)

    def _commit_pending(
        self, consumer: Consumer, units: Collection[str] | None, sync: bool
    ) -> None:
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
            self._errors.log(logging.WARNING, f"offset commit failed: {reason_of(exc)}")

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
                        self._errors.log(logging.WARNING, f"seek after resume: {reason_of(exc)}")

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
