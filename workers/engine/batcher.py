"""Batching decisions for one lane: when a batch is ready and which records it takes."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from workers.engine.records import Record

# Attribute reads in comprehensions and loops, not map(attrgetter): on CPython 3.11 a slot read in
# a loop is specialised and costs a quarter of attrgetter's generic lookup.


@dataclass(frozen=True, slots=True)
class BatchLimits:
    batch_size: int = 100
    maximum_batch_bytes: int = 6 * 1024 * 1024
    maximum_batching_window_s: float = 0.5


class LaneBuffer:
    """Records waiting for one lane, in arrival order."""

    __slots__ = ("first_at", "nbytes", "records")

    def __init__(self) -> None:
        # A list: batches leave from the front by slicing, which costs less than a record at a
        # time from a deque.
        self.records: list[Record] = []
        self.nbytes = 0
        self.first_at = 0.0  # when the oldest waiting record arrived (monotonic)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: Record, now: float) -> None:
        if not self.records:
            self.first_at = now
        self.records.append(record)
        self.nbytes += record.size

    def extend(self, records: list[Record], now: float) -> None:
        if not self.records:
            self.first_at = now
        self.records.extend(records)
        self.nbytes += sum([r.size for r in records])

    def ready_in(self, limits: BatchLimits, now: float) -> float | None:
        """Seconds until a batch should go (0: now), or None when nothing waits.

        A batch goes when it is full by count or bytes, or its oldest record waited the window.
        """
        if not self.records:
            return None
        if len(self.records) >= limits.batch_size or self.nbytes >= limits.maximum_batch_bytes:
            return 0.0
        return max(0.0, self.first_at + limits.maximum_batching_window_s - now)

    def take(self, limits: BatchLimits) -> list[Record]:
        """The next batch: up to batch_size records within the byte cap (always at least one)."""
        records = self.records
        n = min(len(records), limits.batch_size)
        if self.nbytes <= limits.maximum_batch_bytes:
            # Everything waiting fits the cap, so the first n do.
            batch = records[:n]
            size = self.nbytes if n == len(records) else sum([r.size for r in batch])
        else:
            size = 0
            taken = 0
            for r in records[:n]:
                if taken and size + r.size > limits.maximum_batch_bytes:
                    break
                size += r.size
                taken += 1
            batch = records[:taken]
        del records[: len(batch)]
        self.nbytes -= size
        # What stays behind keeps the oldest arrival time: it has waited at least that long.
        return batch

    def remove(self, keys: set[bytes | None]) -> list[Record]:
        """Take out, in order, the waiting records with one of these keys."""
        out = [r for r in self.records if r.key in keys]
        if out:
            self.records = [r for r in self.records if r.key not in keys]
            self.nbytes -= sum([r.size for r in out])
        return out

    def clear(self) -> list[Record]:
        dropped, self.records = self.records, []
        self.nbytes = 0
        return dropped


class Lane:
    """One lane of a poller: the records of a unit (and key slot) waiting, run one batch at a
    time; `stop` is its unit's."""

    __slots__ = ("buffer", "busy", "stop", "unit")

    def __init__(self, unit: str, stop: threading.Event) -> None:
        self.unit = unit
        self.buffer = LaneBuffer()
        self.busy = False
        self.stop = stop


def runs_by_unit(records: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """Records grouped into consecutive runs of one unit, in order."""
    if not records:
        return []
    units = [r.source for r in records]
    first = units[0]
    if units.count(first) == len(units):
        return [(first, list(records))]  # one unit, as in every batch and most polls
    runs: list[tuple[str, list[Record]]] = []
    unit: str | None = None
    run: list[Record] = []
    for r in records:
        if r.source != unit:
            unit, run = r.source, []
            runs.append((unit, run))
        run.append(r)
    return runs
