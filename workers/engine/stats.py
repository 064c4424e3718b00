"""Per-mapping counters: what `--summary-json` reports and the metrics are fed from."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


@dataclass
class MappingStats:
    polled: int = 0
    filtered_out: int = 0
    invoked: int = 0  # records handed to the handler, counting re-invocations
    invocations: int = 0
    succeeded: int = 0
    retried: int = 0  # invocations that were retries of records already tried
    bisected: int = 0  # batch splits
    dead_lettered: int = 0
    dropped: int = 0  # exhausted records with no destination configured
    # Records handed back to a broker with `broker_retries`, to be delivered again after a
    # retry's backoff, or (exhausted, no destination) for the broker's own dead-letter policy.
    released: int = 0
    # Dead-lettered without their payload: too large for the destination even alone.
    payload_omitted: int = 0
    failed_invocations: int = 0
    # Invocations whose handler raised workers.Throttled (they pause the mapping).
    throttled: int = 0
    # Enabled, Disabling or Disabled (Lambda's names), and the throttle breaker's state
    # (workers.engine.valve), as the poller's loop last saw them.
    state: str = "Enabled"
    throttle: dict[str, Any] = field(default_factory=lambda: {"state": "closed"})
    # Deliveries the on-failure destination refused (each attempt), and its state as the
    # dead letters last saw it (workers.engine.refusals).
    destination_refusals: int = 0
    destination: dict[str, Any] = field(default_factory=lambda: {"state": "ok"})
    checkpoints: dict[str, Any] = field(default_factory=dict)
    # Refreshed by the poller's loop: what it owns and how far behind each unit is.
    assigned: list[str] = field(default_factory=list)
    lag: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0  # batches running
    # Units whose position has not moved for stalled_after_s with work waiting, and why
    # (workers.engine.stalls).
    stalled: dict[str, Any] = field(default_factory=dict)
    # The last failed invocation: error type and message, when, and the first record.
    last_error: dict[str, Any] | None = None
    # Invocation durations: counts per upper bound of DURATION_BUCKETS_S, plus their sum.
    duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS_S))
    duration_sum_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def observe_duration(self, seconds: float) -> None:
        index = bisect.bisect_left(DURATION_BUCKETS_S, seconds)
        with self._lock:
            if index < len(self.duration_counts):
                self.duration_counts[index] += 1
            self.duration_sum_s += seconds

    def checkpointed(self, positions: Mapping[str, Any]) -> None:
        """Record the last checkpoint of each unit in `positions`."""
        with self._lock:
            self.checkpoints.update(positions)

    def set_position(self, assigned: list[str], lag: dict[str, int], in_flight: int = 0) -> None:
        with self._lock:
            self.assigned = assigned
            self.lag = lag
            self.in_flight = in_flight

    def set_stalled(self, stalled: dict[str, Any]) -> None:
        with self._lock:
            self.stalled = stalled

    def set_last_error(self, error: dict[str, Any]) -> None:
        with self._lock:
            self.last_error = error

    def set_control(self, state: str, throttle: dict[str, Any]) -> None:
        with self._lock:
            self.state = state
            self.throttle = throttle

    def set_destination(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.destination = state

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
            data["checkpoints"] = dict(self.checkpoints)
            data["lag"] = dict(self.lag)
            data["destination"] = dict(self.destination)
            data["stalled"] = dict(self.stalled)
            data["throttle"] = dict(self.throttle)
            data["duration_counts"] = list(self.duration_counts)
        return data
