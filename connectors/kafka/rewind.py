"""`workers rewind` for Kafka: the consumer group's committed offset per partition, moved to the
earliest offset, the end, or the first record at or after a time.

The broker's own lookups are checked by reading: some Kafka-protocol brokers answer
ListOffsets approximately (Tansu gives the earliest offset for any time, and the base offset of
the last record batch plus one for the end; docs/brokers.md), so the rewinder reads forward from
the broker's answer to the exact one. On Apache Kafka that reads at most one record a partition.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupState,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from connectors.kafka import config as cfg
from connectors.kafka.client import (
    CONNECT_TIMEOUT_S,
    DriverLog,
    KafkaUnavailable,
    Throttled,
    consumer_settings,
    producer_settings,
    reason_of,
)
from connectors.kafka.consumer import consumer_config, missing_topics
from workers.engine.rewind import Move, RewindRefused, RewindTarget

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

log = logging.getLogger("connectors.kafka.rewind")

# Broker round trips (metadata, committed offsets, lookups, the commit) wait at most this long.
REQUEST_TIMEOUT_S = 15.0
# Reading forward gives up when no record or end of partition arrives for this long.
READ_IDLE_TIMEOUT_S = 15.0
# Records older than the time read forward from the broker's answer, per partition, before the
# rewinder stops and keeps the offset reached (replaying some older records, skipping none).
SCAN_LIMIT_RECORDS = 100_000
# Group states in which no member is in the group: its offsets may be changed.
STOPPED_STATES = (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(slots=True)
class _Scan:
    """Reading one partition forward: to its end, or to the first record at or after `since_ms`."""

    tp: TopicPartition
    since_ms: int | None
    found: int | None = None
    older: int = 0  # records read that are older than since_ms
    at_end: bool = False  # found is the end of the partition, not a record
    capped: bool = False


class KafkaRewinder:
    """The mapping's consumer group, seen from outside it (the group is never joined).

    Running rule: the group counts as running while the broker reports it in any state other
    than Empty or Dead (a member is in it, or joining); a stopped `workers run` leaves the group
    when it closes. The broker itself also refuses offsets committed from outside a group that
    has members.
    """

    running_rule = (
        "Kafka: the consumer group has members (any group state but Empty or Dead);"
        " `workers run` leaves the group when it stops"
    )

    def __init__(self, mapping: EventSourceMapping) -> None:
        src = mapping.source
        if not isinstance(src, cfg.KafkaSource):
            raise TypeError(f"mapping {mapping.name}: not a Kafka source")
        self.mapping = mapping.name
        self.src = src
        self.group = src.consumer_group_id or mapping.name
        self.group_label = f"consumer group {self.group!r} at {src.bootstrap_servers}"
        self._errors: list[str] = []
        throttled = Throttled(log, f"mapping {mapping.name}: kafka: ")
        # Commits go to the mapping's group; records are read by assignment, which never joins
        # it, so this consumer is not a member that would hold the group's partitions.
        self._consumer = Consumer(
            {
                **consumer_config(
                    src,
                    group=self.group,
                    client_id=f"esm-workers-rewind-{mapping.name}",
                    on_error=lambda err: self._errors.append(err.str()),
                    logger=DriverLog(throttled),
                ),
                "fetch.wait.max.ms": 10,
            }
        )
        admin_settings = producer_settings(consumer_settings(src.client_config))
        admin_config: dict[str, Any] = {
            **{k: v for k, v in admin_settings.items() if not k.startswith("fetch.")},
            "bootstrap.servers": src.bootstrap_servers,
            "client.id": f"esm-workers-rewind-{mapping.name}",
            "logger": DriverLog(throttled),
        }
        self._admin = AdminClient(admin_config)

    # --- the group ---------------------------------------------------------------------------

    def running_consumers(self) -> list[str]:
        futures = self._admin.describe_consumer_groups(
            [self.group], request_timeout=REQUEST_TIMEOUT_S
        )
        try:
            description = futures[self.group].result(timeout=REQUEST_TIMEOUT_S)
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        members = [
            f"member {m.client_id or m.member_id} on {m.host}" for m in description.members or ()
        ]
        if description.state in STOPPED_STATES and not members:
            return []
        state = getattr(description.state, "name", str(description.state)).lower()
        # Some brokers (Tansu) report the state but no members: the state alone tells.
        return members or [f"the group is {state.replace('_', ' ')}"]

    def _partitions(self) -> list[TopicPartition]:
        try:
            metadata = self._consumer.list_topics(timeout=CONNECT_TIMEOUT_S)
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        missing = missing_topics(metadata, self.src.topics)
        if missing:
            raise RewindRefused(
                f"topic(s) {', '.join(missing)} not found at {self.src.bootstrap_servers}"
            )
        names = [
            name
            for name in sorted(metadata.topics)
            if any(
                name == t
                or (t.startswith("^") and re.search(t, name) and not name.startswith("__"))
                for t in self.src.topics
            )
        ]
        return [
            TopicPartition(name, p)
            for name in names
            for p in sorted(metadata.topics[name].partitions)
        ]

    # --- plan ---------------------------------------------------------------------------------

    def plan(self, to: RewindTarget) -> list[Move]:
        tps = self._partitions()
        try:
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in self._consumer.committed(tps, timeout=REQUEST_TIMEOUT_S)
            }
            marks = {
                (tp.topic, tp.partition): self._consumer.get_watermark_offsets(
                    tp, timeout=REQUEST_TIMEOUT_S, cached=False
                )
                for tp in tps
            }
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        if to == "earliest":
            new = {key: (low, "") for key, (low, _) in marks.items()}
        elif to == "latest":
            new = self._ends(tps, marks)
        else:
            new = self._at_time(tps, marks, to)
        moves = []
        for tp in tps:
            key = (tp.topic, tp.partition)
            current = committed.get(key, -1)
            offset, note = new[key]
            shown = str(current) if current is not None and current >= 0 else "none"
            moves.append(Move(f"{tp.topic}-{tp.partition}", shown, str(offset), note))
        return moves

    def _ends(
        self, tps: list[TopicPartition], marks: dict[tuple[str, int], tuple[int, int]]
    ) -> dict[tuple[str, int], tuple[int, str]]:
        """The end offset of each partition, read to the end of partition from just before the
        end the broker lists (which some brokers list too low)."""
        scans = [
            _Scan(TopicPartition(tp.topic, tp.partition, max(low, high - 1)), None)
            for tp in tps
            for low, high in [marks[(tp.topic, tp.partition)]]
        ]
        self._read(scans)
        out = {}
        for scan in scans:
            key = (scan.tp.topic, scan.tp.partition)
            listed = marks[key][1]
            assert scan.found is not None
            note = (
                ""
                if scan.found == listed
                else f"the broker listed the end as {listed}; reading found it at {scan.found}"
            )
            out[key] = (scan.found, note)
        return out

    def _at_time(
        self,
        tps: list[TopicPartition],
        marks: dict[tuple[str, int], tuple[int, int]],
        since_ms: int,
    ) -> dict[tuple[str, int], tuple[int, str]]:
        """The first offset whose record is at or after `since_ms`, as Kafka's ListOffsets by
        time defines it, checked by reading from the broker's answer."""
        try:
            found = self._consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, since_ms) for tp in tps],
                timeout=REQUEST_TIMEOUT_S,
            )
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        answers = {(tp.topic, tp.partition): tp.offset for tp in found}
        scans = []
        for tp in tps:
            key = (tp.topic, tp.partition)
            low, high = marks[key]
            answer = answers.get(key, -1)
            # -1: no record at or after the time; read from just before the listed end.
            start = answer if answer >= 0 else max(low, high - 1)
            scans.append(_Scan(TopicPartition(tp.topic, tp.partition, start), since_ms))
        self._read(scans)
        when = _iso(since_ms)
        out = {}
        for scan in scans:
            key = (scan.tp.topic, scan.tp.partition)
            answer = answers.get(key, -1)
            assert scan.found is not None
            if scan.capped:
                note = (
                    f"the broker's lookup by time answered {answer}; {scan.older} records"
                    f" after it are all older than {when} and reading stopped there: records"
                    f" from {scan.found} on are replayed, some of them older than {when}"
                )
            elif scan.at_end:
                note = f"no record at or after {when}: the end of the partition"
                if answer >= 0:
                    note += (
                        f" (the broker's lookup by time answered {answer}, an approximate"
                        f" lookup; found by reading {scan.older} record(s))"
                    )
            elif scan.older:
                note = (
                    f"the broker's lookup by time answered {answer}, whose record is older"
                    f" than {when} (an approximate lookup); the first record at or after it"
                    f" is at {scan.found}, found by reading {scan.older} record(s)"
                )
            else:
                note = ""
            out[key] = (scan.found, note)
        return out

    def _read(self, scans: list[_Scan]) -> None:
        """Read every scan's partition forward from its offset until it has its answer."""
        if not scans:
            return
        by_key = {(s.tp.topic, s.tp.partition): s for s in scans}
        consumer = self._consumer
        consumer.assign([s.tp for s in scans])
        try:
            waiting = len(scans)
            idle_since = time.monotonic()
            while waiting:
                messages = consumer.consume(num_messages=1000, timeout=0.2)
                if messages:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > READ_IDLE_TIMEOUT_S:
                    reason = self._errors[-1] if self._errors else "no answer"
                    raise KafkaUnavailable(
                        f"reading {self.src.bootstrap_servers} to find positions: {reason}"
                    )
                done = []
                for message in messages:
                    scan = by_key.get((message.topic() or "", message.partition() or 0))
                    if scan is None or scan.found is not None:
                        continue
                    offset = message.offset() or 0
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            raise KafkaException(error)
                        scan.found, scan.at_end = offset, True
                    elif scan.since_ms is not None:
                        kind, ms = message.timestamp()
                        if kind == TIMESTAMP_NOT_AVAILABLE or ms >= scan.since_ms:
                            scan.found = offset
                        elif scan.older >= SCAN_LIMIT_RECORDS:
                            scan.found, scan.capped = offset, True
                        else:
                            scan.older += 1
                    if scan.found is not None:
                        waiting -= 1
                        done.append(scan.tp)
                if done:
                    consumer.pause(done)
        finally:
            consumer.unassign()

    # --- apply --------------------------------------------------------------------------------

    def apply(self, moves: Sequence[Move]) -> None:
        offsets = []
        for move in moves:
            topic, _, partition = move.unit.rpartition("-")
            offsets.append(TopicPartition(topic, int(partition), int(move.new)))
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            codes = (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION)
            if isinstance(error, KafkaError) and error.code() in codes:
                raise RewindRefused(
                    f"the broker refused the new offsets of {self.group_label}: a consumer"
                    f" joined the group meanwhile ({reason_of(exc)}); nothing was changed"
                ) from None
            raise self._unavailable(exc) from None
        failed = [tp for tp in result or () if tp.error is not None]
        if failed:
            listed = ", ".join(f"{tp.topic}-{tp.partition}: {tp.error}" for tp in failed)
            raise KafkaUnavailable(f"the broker refused some offsets ({listed})")

    def close(self) -> None:
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the rewind consumer: %s", reason_of(exc))

    def _unavailable(self, exc: KafkaException) -> KafkaUnavailable:
        reason = self._errors[-1] if self._errors else reason_of(exc)
        return KafkaUnavailable(f"cannot reach {self.src.bootstrap_servers}: {reason}")
