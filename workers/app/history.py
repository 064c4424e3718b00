"""What `/status` and the status page say of each mapping: its pollers' reports put together, and
the last minutes of throughput and lag, sampled in the supervisor so that a page opened now shows
them at once."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

# One sample every SAMPLE_EVERY_S for HISTORY_S: the status page's charts.
SAMPLE_EVERY_S = 2.0
HISTORY_S = 600.0
# Records that are done with: handled, filtered out or dead-lettered (or dropped).
DONE_COUNTERS = ("succeeded", "filtered_out", "dead_lettered", "dropped")

# What the supervisor reports of each poller: (mapping, instance, alive, its stats).
Snapshot = tuple[str, int, bool, dict[str, Any]]


def mappings_of(snaps: Sequence[Snapshot]) -> dict[str, dict[str, Any]]:
    """Per mapping, its pollers' reports put together.

    Lag is counted once per unit (every consumer of a queue reports the queue's depth, and a
    partition moving between pollers is briefly reported by both); stalled units are those of
    live pollers (a dead poller's last report says nothing of now).
    """
    out: dict[str, dict[str, Any]] = {}
    lags: dict[str, dict[str, int]] = {}
    for mapping, _instance, alive, snap in snaps:
        entry = out.setdefault(
            mapping,
            {
                "pollers": 0,
                "alive": 0,
                "lag": 0,
                "in_flight": 0,
                "stalled_units": [],
                "last_error": None,
                "destination": "none",
                **dict.fromkeys(DONE_COUNTERS, 0),
            },
        )
        entry["pollers"] += 1
        entry["alive"] += int(alive)
        for name in DONE_COUNTERS:
            entry[name] += snap.get(name, 0)
        unit_lags = lags.setdefault(mapping, {})
        for unit, n in snap.get("lag", {}).items():
            unit_lags[unit] = max(n, unit_lags.get(unit, 0))
        if alive:
            entry["in_flight"] += snap.get("in_flight", 0)
            entry["stalled_units"] = sorted({*entry["stalled_units"], *snap.get("stalled", {})})
        error = snap.get("last_error")
        if error and (entry["last_error"] is None or error["at"] > entry["last_error"]["at"]):
            entry["last_error"] = error
        state = snap.get("destination", {}).get("state", "none")
        # The worst of its pollers' views: refusing, else ok, else none configured.
        if state == "refusing" or (state == "ok" and entry["destination"] == "none"):
            entry["destination"] = state
    for mapping, unit_lags in lags.items():
        out[mapping]["lag"] = sum(unit_lags.values())
    return out


class History:
    """Samples of each mapping (records done per second, lag, batches in flight), the last
    `HISTORY_S` of them. Thread-safe."""

    def __init__(
        self,
        snapshots: Callable[[], Sequence[Snapshot]],
        *,
        every_s: float = SAMPLE_EVERY_S,
        keep_s: float = HISTORY_S,
    ) -> None:
        self.snapshots = snapshots
        self.every_s = every_s
        self._keep = max(2, int(keep_s / every_s))
        self._lock = threading.Lock()
        self._series: dict[str, deque[tuple[int, float | None, int, int]]] = {}
        self._last: dict[str, tuple[int, int]] = {}  # mapping -> (at ms, records done)

    def sample(self, at_ms: int | None = None) -> None:
        at_ms = time.time_ns() // 1_000_000 if at_ms is None else at_ms
        mappings = mappings_of(self.snapshots())
        with self._lock:
            for mapping, entry in mappings.items():
                done = sum(entry[name] for name in DONE_COUNTERS)
                rate: float | None = None
                last = self._last.get(mapping)
                if last is not None and at_ms > last[0]:
                    # A restarted poller counts from zero again: no negative rates.
                    rate = max(0.0, (done - last[1]) * 1000 / (at_ms - last[0]))
                self._last[mapping] = (at_ms, done)
                series = self._series.setdefault(mapping, deque(maxlen=self._keep))
                series.append((at_ms, rate, entry["lag"], entry["in_flight"]))

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            series = {m: list(s) for m, s in self._series.items()}
        return {
            "every_s": self.every_s,
            "mappings": {
                mapping: {
                    "at": [s[0] for s in samples],
                    "records_per_s": [None if s[1] is None else round(s[1], 2) for s in samples],
                    "lag": [s[2] for s in samples],
                    "in_flight": [s[3] for s in samples],
                }
                for mapping, samples in series.items()
            },
        }

    def start(self) -> threading.Event:
        """Sample every `every_s` in a daemon thread until the returned event is set."""
        stop = threading.Event()

        def run() -> None:
            while True:
                self.sample()
                if stop.wait(self.every_s):
                    return

        threading.Thread(target=run, name="history", daemon=True).start()
        return stop
