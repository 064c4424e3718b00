"""An in-memory broker that honours the connector contract; it runs every engine test.

Three kinds of source: a partitioned log with consumer-group offsets (Kafka's semantics: ordered,
offset checkpoints, pause/resume), the same log read with per-record acks and pending entries
(Redis Streams' semantics, `connectors.memory.stream`) and a queue with acks and redelivery of
unacked messages when a consumer goes away (RabbitMQ's semantics, with quorum queues' delivery
counts), optionally taking messages back to deliver them again after a delay (SQS's visibility
timeout; with `fifo`, SQS FIFO's message groups).
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
    key: bytes | None = None


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
    # Messages taken back (`MemoryQueueSource.release`), with when they are delivered again.
    delayed: dict[str, list[tuple[float, QueuedMessage]]] = field(default_factory=dict)
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
        key: bytes | None = None,
    ) -> None:
        with self.lock:
            self._seq += 1
            ts = self.clock.wall_ms() if timestamp_ms is None else timestamp_ms
            self.queues.setdefault(queue, deque()).append(
                QueuedMessage(self._seq, value, ts, list(headers), key=key)
            )

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(ready, unacked) message counts; messages taken back to deliver later count as
        unacked, as SQS counts them in flight."""
        with self.lock:
            later = len(self.delayed.get(queue, ()))
            return len(self.queues.get(queue, ())), len(self.unacked.get(queue, {})) + later


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
    """A consumer of one queue with manual acks (RabbitMQ-like, quorum delivery counts).

    With `broker_retries`, SQS-like: `release` takes messages back to deliver them again after a
    delay. With `fifo` too, messages of one key (a message group) are delivered in order, none
    while an earlier one of its key is held by a consumer or waiting out its delay.
    """

    capabilities = Capabilities(ordered=False, checkpoint="ack")
    retryable_errors: tuple[type[BaseException], ...] = (MemoryBrokerError,)

    def __init__(
        self, broker: MemoryBroker, queue: str, *, broker_retries: bool = False, fifo: bool = False
    ) -> None:
        self.broker = broker
        self.queue = queue
        if broker_retries or fifo:
            self.capabilities = Capabilities(
                ordered=fifo, checkpoint="ack", broker_retries=broker_retries
            )
        self.fifo = fifo
        self.shape = RabbitShape("memory")
        self._tag = 0
        self._mine: dict[int, QueuedMessage] = {}  # delivery tag -> message
        self._wakeup = threading.Event()
        self.acked: list[int] = []  # message seqs, in ack order
        self.released: list[tuple[int, float]] = []  # (message seq, delay), in release order

    def open(self, listener: AssignmentListener) -> None:
        if self.broker.down:
            raise MemoryBrokerError("memory broker is down")
        listener.on_assigned([self.queue])

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        out: list[Record] = []
        with self.broker.lock:
            self._return_due()
            ready = self.broker.queues.setdefault(self.queue, deque())
            unacked = self.broker.unacked.setdefault(self.queue, {})
            if self.fifo:
                ready = self._deliverable(ready, unacked)
            while ready and len(out) < max_records:
                msg = ready.popleft()
                self._tag += 1
                self._mine[self._tag] = msg
                unacked[msg.seq] = msg
                out.append(self._record(msg, self._tag))
                msg.deliveries += 1
            if self.fifo:
                self._put_back(ready)
        if not out:
            self.broker.clock.wait(self._wakeup, timeout_s)
        return out

    def _return_due(self) -> None:
        """Messages whose delay has passed go back to the queue, in their original order."""
        delayed = self.broker.delayed.get(self.queue)
        if not delayed:
            return
        now = self.broker.clock.monotonic()
        due = [m for at, m in delayed if at <= now]
        if due:
            delayed[:] = [(at, m) for at, m in delayed if at > now]
            ready = self.broker.queues.setdefault(self.queue, deque())
            ready.extend(due)
            self.broker.queues[self.queue] = deque(sorted(ready, key=lambda m: m.seq))

    def _deliverable(
        self, ready: deque[QueuedMessage], unacked: dict[int, QueuedMessage]
    ) -> deque[QueuedMessage]:
        """FIFO: takes out of `ready` the messages of keys nothing earlier holds up."""
        blocked = {m.key for m in unacked.values()}
        blocked |= {m.key for _, m in self.broker.delayed.get(self.queue, ())}
        out: deque[QueuedMessage] = deque()
        kept: deque[QueuedMessage] = deque()
        for msg in ready:
            if msg.key in blocked:
                kept.append(msg)
            else:
                out.append(msg)
        self.broker.queues[self.queue] = kept
        return out

    def _put_back(self, rest: deque[QueuedMessage]) -> None:
        ready = self.broker.queues[self.queue]
        ready.extend(rest)
        self.broker.queues[self.queue] = deque(sorted(ready, key=lambda m: m.seq))

    def _record(self, msg: QueuedMessage, tag: int) -> Record:
        props: dict[str, Any] = {"deliveryMode": 2, "bodySize": len(msg.value)}
        if msg.deliveries:
            props["headers"] = {"x-delivery-count": msg.deliveries}
        return Record(
            source=self.queue,
            position=tag,
            value=msg.value,
            key=msg.key,
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

    def release(self, records: Sequence[Record], delay_s: float) -> None:
        if not self.capabilities.broker_retries:
            super().release(records, delay_s)
        with self.broker.lock:
            unacked = self.broker.unacked[self.queue]
            delayed = self.broker.delayed.setdefault(self.queue, [])
            at = self.broker.clock.monotonic() + delay_s
            for r in records:
                msg = self._mine.pop(r.position, None)
                if msg is None:
                    raise AssertionError(f"delivery tag {r.position} released twice or unknown")
                del unacked[msg.seq]
                delayed.append((at, msg))
                self.released.append((msg.seq, delay_s))

    def assignment(self) -> frozenset[str]:
        return frozenset([self.queue])

    def caught_up(self) -> bool:
        with self.broker.lock:
            return not self.broker.queues.get(self.queue) and not self.broker.delayed.get(
                self.queue
            )

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
