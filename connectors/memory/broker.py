"""An in-memory broker that honours the connector contract; it runs every engine test.

Three kinds of source: a partitioned log with consumer-group offsets (Kafka's semantics: ordered,
offset checkpoints, pause/resume), the same log read with per-record acks and pending entries
(Redis Streams' semantics, `connectors.memory.stream`) and a queue with acks and redelivery of
unacked messages when a consumer goes away (RabbitMQ's semantics, with quorum queues' delivery
counts).
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.shape import KafkaMeta, KafkaShape
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape
from workers.engine.clock import SYSTEM_CLOCK, Clock
from workers.engine.ports import AssignmentListener, Capabilities, SourceBase
from workers.engine.records import Record
from workers.engine.shapes import encoded_size


class MemoryBrokerError(ConnectionError):
    """The memory broker is 'down' (tests simulate outages with it)."""


@dataclass(slots=True)
class StoredRecord:
    value: bytes
    key: bytes | None
    timestamp_ms: int
    headers: list[tuple[str, bytes]]


@dataclass(slots=True)
class QueuedMessage:
    seq: int
    value: bytes
    timestamp_ms: int
    headers: list[tuple[str, bytes]]
    deliveries: int = 0


@dataclass
class MemoryBroker:
    """Topics (partitioned logs), queues, committed offsets; shared by sources and tests."""

    clock: Clock = SYSTEM_CLOCK
    topics: dict[str, list[list[StoredRecord]]] = field(default_factory=dict)
    committed: dict[tuple[str, str], int] = field(default_factory=dict)  # (group, "t-p") -> next
    # Acked reading (connectors.memory.stream): the next position a group has not delivered yet,
    # and its pending entries (delivered, not acked) with their delivery counts, per unit.
    delivered: dict[tuple[str, str], int] = field(default_factory=dict)
    pending: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    queues: dict[str, deque[QueuedMessage]] = field(default_factory=dict)
    unacked: dict[str, dict[int, QueuedMessage]] = field(default_factory=dict)
    down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0

    def create_topic(self, name: str, partitions: int = 1) -> bool:
        """Creates the topic unless it exists; returns whether it did."""
        with self.lock:
            if name in self.topics:
                return False
            self.topics[name] = [[] for _ in range(partitions)]
            return True

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> tuple[int, int]:
        """Append to a partition (by key hash unless given); returns (partition, offset)."""
        with self.lock:
            parts = self.topics.setdefault(topic, [[]])
            if partition is None:
                partition = zlib.crc32(key) % len(parts) if key is not None else 0
            ts = self.clock.wall_ms() if timestamp_ms is None else timestamp_ms
            parts[partition].append(StoredRecord(value, key, ts, list(headers)))
            return partition, len(parts[partition]) - 1

    def end_offsets(self, topic: str) -> dict[str, int]:
        with self.lock:
            return {f"{topic}-{p}": len(log) for p, log in enumerate(self.topics[topic])}

    def committed_offsets(self, group: str, topic: str) -> dict[str, int]:
        with self.lock:
            return {
                unit: pos
                for (g, unit), pos in self.committed.items()
                if g == group and unit.rsplit("-", 1)[0] == topic
            }

    def publish(
        self,
        queue: str,
        value: bytes,
        *,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        with self.lock:
            self._seq += 1
            ts = self.clock.wall_ms() if timestamp_ms is None else timestamp_ms
            self.queues.setdefault(queue, deque()).append(
                QueuedMessage(self._seq, value, ts, list(headers))
            )

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(ready, unacked) message counts."""
        with self.lock:
            return len(self.queues.get(queue, ())), len(self.unacked.get(queue, {}))


class MemoryLogSource(SourceBase):
    """A consumer-group member of one topic that owns every partition (Kafka-like)."""

    capabilities = Capabilities(ordered=True, checkpoint="offset", pausable=True)
    retryable_errors: tuple[type[BaseException], ...] = (MemoryBrokerError,)

    def __init__(self, broker: MemoryBroker, topic: str, group: str) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.shape = KafkaShape("memory")
        self._positions: dict[int, int] = {}
        self._paused: set[str] = set()
        self._wakeup = threading.Event()
        self.commits = 0

    def open(self, listener: AssignmentListener) -> None:
        self._check()
        with self.broker.lock:
            parts = self.broker.topics.setdefault(self.topic, [[]])
            self._positions = {
                p: self.broker.committed.get((self.group, f"{self.topic}-{p}"), 0)
                for p in range(len(parts))
            }
        listener.on_assigned(self.assignment())

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self._check()
        out: list[Record] = []
        with self.broker.lock:
            parts = self.broker.topics[self.topic]
            for p, pos in self._positions.items():
                unit = f"{self.topic}-{p}"
                if unit in self._paused:
                    continue
                log = parts[p]
                while pos < len(log) and len(out) < max_records:
                    s = log[pos]
                    out.append(
                        Record(
                            source=unit,
                            position=pos,
                            value=s.value,
                            key=s.key,
                            timestamp_ms=s.timestamp_ms,
                            headers=s.headers,
                            size=encoded_size(s.value, s.key),
                            meta=KafkaMeta(self.topic, p),
                        )
                    )
                    pos += 1
                self._positions[p] = pos
        if not out:
            self.broker.clock.wait(self._wakeup, timeout_s)
        return out

    def commit(self, positions: Mapping[str, int]) -> None:
        self._check()
        with self.broker.lock:
            for unit, pos in positions.items():
                key = (self.group, unit)
                if pos < self.broker.committed.get(key, 0):
                    raise AssertionError(f"offset for {unit} committed backwards to {pos}")
                self.broker.committed[key] = pos
            self.commits += 1

    def pause(self, units: Collection[str]) -> None:
        self._paused |= set(units)

    def resume(self, units: Collection[str]) -> None:
        self._paused -= set(units)

    def assignment(self) -> frozenset[str]:
        return frozenset(f"{self.topic}-{p}" for p in self._positions)

    def caught_up(self) -> bool:
        with self.broker.lock:
            parts = self.broker.topics[self.topic]
            return all(self._positions.get(p, 0) >= len(log) for p, log in enumerate(parts))

    def lag(self) -> Mapping[str, int]:
        with self.broker.lock:
            parts = self.broker.topics[self.topic]
            return {
                f"{self.topic}-{p}": len(log) - self._positions.get(p, 0)
                for p, log in enumerate(parts)
            }

    def _check(self) -> None:
        if self.broker.down:
            raise MemoryBrokerError("memory broker is down")


class MemoryQueueSource(SourceBase):
    """A consumer of one queue with manual acks (RabbitMQ-like, quorum delivery counts)."""

    capabilities = Capabilities(ordered=False, checkpoint="ack")
    retryable_errors: tuple[type[BaseException], ...] = (MemoryBrokerError,)

    def __init__(self, broker: MemoryBroker, queue: str) -> None:
        self.broker = broker
        self.queue = queue
        self.shape = RabbitShape("memory")
        self._tag = 0
        self._mine: dict[int, QueuedMessage] = {}  # delivery tag -> message
        self._wakeup = threading.Event()
        self.acked: list[int] = []  # message seqs, in ack order

    def open(self, listener: AssignmentListener) -> None:
        if self.broker.down:
            raise MemoryBrokerError("memory broker is down")
        listener.on_assigned([self.queue])

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        out: list[Record] = []
        with self.broker.lock:
            ready = self.broker.queues.setdefault(self.queue, deque())
            unacked = self.broker.unacked.setdefault(self.queue, {})
            while ready and len(out) < max_records:
                msg = ready.popleft()
                self._tag += 1
                self._mine[self._tag] = msg
                unacked[msg.seq] = msg
                out.append(self._record(msg, self._tag))
                msg.deliveries += 1
        if not out:
            self.broker.clock.wait(self._wakeup, timeout_s)
        return out

    def _record(self, msg: QueuedMessage, tag: int) -> Record:
        props: dict[str, Any] = {"deliveryMode": 2, "bodySize": len(msg.value)}
        if msg.deliveries:
            props["headers"] = {"x-delivery-count": msg.deliveries}
        return Record(
            source=self.queue,
            position=tag,
            value=msg.value,
            timestamp_ms=msg.timestamp_ms,
            headers=msg.headers,
            attempts=msg.deliveries,
            redelivered=msg.deliveries > 0,
            size=encoded_size(msg.value),
            meta=RabbitMeta(self.queue, "/", tag, props),
        )

    def ack(self, records: Sequence[Record]) -> None:
        with self.broker.lock:
            unacked = self.broker.unacked[self.queue]
            for r in records:
                msg = self._mine.pop(r.position, None)
                if msg is None:
                    raise AssertionError(f"delivery tag {r.position} acked twice or unknown")
                del unacked[msg.seq]
                self.acked.append(msg.seq)

    def assignment(self) -> frozenset[str]:
        return frozenset([self.queue])

    def caught_up(self) -> bool:
        with self.broker.lock:
            return not self.broker.queues.get(self.queue)

    def close(self) -> None:
        """Unacked messages go back to the front of the queue, as when a channel closes."""
        with self.broker.lock:
            unacked = self.broker.unacked.setdefault(self.queue, {})
            back = sorted(self._mine.values(), key=lambda m: m.seq)
            for msg in back:
                unacked.pop(msg.seq, None)
            self.broker.queues.setdefault(self.queue, deque()).extendleft(reversed(back))
            self._mine.clear()


class MemoryDestination:
    """Keeps dead-letter records in a list; can be told to refuse the next N deliveries."""

    def __init__(self, fail_next: int = 0) -> None:
        self.letters: list[dict[str, Any]] = []
        self.fail_next = fail_next
        self._lock = threading.Lock()

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise MemoryBrokerError("destination unavailable")
            self.letters.append(letter)

    def close(self) -> None:
        pass


_named: dict[str, MemoryBroker] = {}
_named_lock = threading.Lock()


def named_broker(name: str) -> MemoryBroker:
    """The process-wide broker called `name`: every source of a mapping naming it shares it, so
    a source opened again finds what an earlier one left (offsets, pending entries)."""
    with _named_lock:
        broker = _named.get(name)
        if broker is None:
            broker = _named[name] = MemoryBroker()
        return broker
