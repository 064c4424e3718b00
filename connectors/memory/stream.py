"""A memory source with Redis Streams' semantics: ordered per unit, per-record acks, pending
entries delivered again (own pending first) when the group's consumer comes back.

It reads the memory broker's partitioned topics; each partition is a stream. Runs the engine's
ordered-and-acked paths (what `connectors.redis` needs) without a server.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Mapping, Sequence

from connectors.memory.broker import MemoryBroker, MemoryBrokerError, StoredRecord
from connectors.redis.shape import RedisMeta, RedisShape, format_stream_id
from workers.engine.ports import AssignmentListener, Capabilities, SourceBase
from workers.engine.records import Record
from workers.engine.shapes import encoded_size


class MemoryStreamSource(SourceBase):
    """The one consumer of a group on every partition (stream) of a topic, with acks."""

    capabilities = Capabilities(ordered=True, checkpoint="ack", pausable=True)
    retryable_errors: tuple[type[BaseException], ...] = (MemoryBrokerError,)

    def __init__(self, broker: MemoryBroker, topic: str, group: str) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.shape = RedisShape("memory")
        self._units: list[str] = []
        # Pending entries delivered before this consumer opened, read again before new ones
        # (XREADGROUP with id 0 on start).
        self._history: dict[str, deque[int]] = {}
        self._paused: set[str] = set()
        self._wakeup = threading.Event()

    def open(self, listener: AssignmentListener) -> None:
        self._check()
        with self.broker.lock:
            parts = self.broker.topics.setdefault(self.topic, [[]])
            self._units = [f"{self.topic}-{p}" for p in range(len(parts))]
            self._history = {
                unit: deque(sorted(self.broker.pending.get((self.group, unit), {})))
                for unit in self._units
            }
        listener.on_assigned(self._units)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self._check()
        out: list[Record] = []
        with self.broker.lock:
            parts = self.broker.topics[self.topic]
            for p, unit in enumerate(self._units):
                if unit in self._paused:
                    continue
                log = parts[p]
                pending = self.broker.pending.setdefault((self.group, unit), {})
                history = self._history.setdefault(unit, deque())
                while history and len(out) < max_records:
                    position = history.popleft()
                    if position in pending:  # not acked since (a late ack of a batch)
                        out.append(self._deliver(unit, position, log, pending))
                cursor = self.broker.delivered.get((self.group, unit), 0)
                while not history and cursor < len(log) and len(out) < max_records:
                    out.append(self._deliver(unit, cursor, log, pending))
                    cursor += 1
                self.broker.delivered[(self.group, unit)] = cursor
        if not out:
            self.broker.clock.wait(self._wakeup, timeout_s)
        return out

    def _deliver(
        self, unit: str, position: int, log: list[StoredRecord], pending: dict[int, int]
    ) -> Record:
        stored = log[position]
        before = pending.get(position, 0)
        pending[position] = before + 1
        fields = {"value": stored.value}
        if stored.key is not None:
            fields["key"] = stored.key
        return Record(
            source=unit,
            position=position,
            value=stored.value,
            key=stored.key,
            timestamp_ms=stored.timestamp_ms,
            headers=stored.headers,
            attempts=before,
            redelivered=before > 0,
            size=encoded_size(stored.value, stored.key),
            meta=RedisMeta(unit, format_stream_id(position), fields),
        )

    def ack(self, records: Sequence[Record]) -> None:
        self._check()
        with self.broker.lock:
            for r in records:
                pending = self.broker.pending.get((self.group, r.source), {})
                if pending.pop(r.position, None) is None:
                    raise AssertionError(f"entry {r.source}@{r.position} acked twice or unknown")

    def pause(self, units: Collection[str]) -> None:
        self._paused |= set(units) & set(self._units)

    def resume(self, units: Collection[str]) -> None:
        self._paused -= set(units)

    def assignment(self) -> frozenset[str]:
        return frozenset(self._units)

    def caught_up(self) -> bool:
        """Nothing paused, own pending entries read again and every stream read to its end."""
        if self._paused or any(self._history.values()):
            return False
        return all(n == 0 for n in self.lag().values())

    def lag(self) -> Mapping[str, int]:
        with self.broker.lock:
            parts = self.broker.topics[self.topic]
            return {
                unit: len(parts[p]) - self.broker.delivered.get((self.group, unit), 0)
                for p, unit in enumerate(self._units)
            }

    def close(self) -> None:
        """Pending entries stay with the group, for the consumer's next open."""
        self._units = []
        self._history = {}
        self._paused = set()

    def _check(self) -> None:
        if self.broker.down:
            raise MemoryBrokerError("memory broker is down")
