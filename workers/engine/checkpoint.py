"""Settling: how records that are done become commits or acks, on the poller's loop thread.

Batches settle on worker threads, in any order (parallelization_factor > 1, bisect halves). They
put their records on the `SettleQueue`; the loop thread, the only thread that talks to the
source's driver, takes them off and turns them into checkpoints:

- offset sources: `CheckpointTracker` commits only the contiguous prefix of settled records, since
  an offset is safe to commit only when every record before it has settled;
- ack sources: `AckTable` holds every record delivered and not yet acked, so each is acked once;
  a source with `broker_retries` may instead be handed a record back (`Source.release`), once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

from workers.engine.records import Record


class SettleQueue:
    """Records settled on any thread, waiting for the loop thread to checkpoint them.

    `put` may be called from any thread; `take` only from the loop thread. `wake`, when given,
    is called after a put: a source that blocks in its driver returns from `poll` early.
    """

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._items: deque[Sequence[Record]] = deque()  # append and popleft are atomic
        # Records to hand back to the broker, and after how long it delivers them again.
        self._released: deque[tuple[Sequence[Record], float]] = deque()
        self._wake = wake

    def put(self, records: Sequence[Record]) -> None:
        was_empty = self.empty()
        self._items.append(records)
        if was_empty and self._wake is not None:
            # Once per batch of puts: the loop takes them all when it wakes.
            self._wake()

    def release(self, records: Sequence[Record], delay_s: float) -> None:
        """Records that did not settle, for the broker to deliver again after `delay_s`."""
        was_empty = self.empty()
        self._released.append((records, delay_s))
        if was_empty and self._wake is not None:
            self._wake()

    def take_released(self) -> list[tuple[Sequence[Record], float]]:
        """Every release since the last call, in the order they were made."""
        out = []
        released = self._released
        while released:
            out.append(released.popleft())
        return out

    def take(self) -> list[Record]:
        """Every record settled since the last call, in the order they were put."""
        out: list[Record] = []
        items = self._items
        while items:
            out.extend(items.popleft())
        return out

    def empty(self) -> bool:
        return not self._items and not self._released


class AckTable:
    """Records of an ack source delivered and not yet acked: each is acked at most once.

    By identity, not by position: a RabbitMQ delivery tag starts again on a new channel, so a
    redelivered message can carry the tag of one still in flight from the old channel.
    Not thread-safe: the poller's loop thread owns it.
    """

    def __init__(self) -> None:
        self._held: set[Record] = set()

    def hold(self, records: Iterable[Record]) -> None:
        self._held.update(records)

    def release(self, records: Iterable[Record]) -> list[Record]:
        """The records not released before, now released: the ones to ack."""
        held = self._held
        out = [r for r in records if r in held]
        held.difference_update(out)
        return out

    def unsettled(self) -> dict[str, int]:
        """Records delivered and not yet acked, per unit."""
        counts: dict[str, int] = {}
        for r in self._held:
            counts[r.source] = counts.get(r.source, 0) + 1
        return counts

    def forget(self, units: Iterable[str]) -> None:
        """Drop records of units that were revoked (another consumer owns them now)."""
        gone = set(units)
        self._held = {r for r in self._held if r.source not in gone}


class _Unit:
    __slots__ = ("committed", "done", "outstanding")

    def __init__(self) -> None:
        self.outstanding: deque[int] = deque()
        self.done: set[int] = set()
        # The next position to read after a restart, as last handed out by `advance`.
        self.committed: int | None = None


class CheckpointTracker:
    """Tracks positions polled but not yet settled, per source unit.

    Positions must be registered in increasing order per unit (the order a broker delivers).
    Not thread-safe: the poller's loop thread owns it.
    """

    def __init__(self) -> None:
        self._units: dict[str, _Unit] = {}
        self._dirty: set[str] = set()
        self._next: dict[str, int] = {}

    def track(self, unit: str, position: int) -> bool:
        """Register a polled position; False for one at or below the last registered one."""
        return bool(self.track_run(unit, [position]))

    def track_run(self, unit: str, positions: list[int]) -> list[int]:
        """`track` for increasing positions of one unit; returns those not seen before."""
        u = self._units.get(unit)
        if u is None:
            u = self._units[unit] = _Unit()
        else:
            last = self._next[unit]
            if positions and positions[0] < last:
                positions = [p for p in positions if p >= last]
        if positions:
            u.outstanding.extend(positions)
            self._next[unit] = positions[-1] + 1
        return positions

    def knows(self, unit: str) -> bool:
        return unit in self._units

    def settle(self, unit: str, positions: Iterable[int]) -> None:
        u = self._units[unit]
        u.done.update(positions)
        while u.outstanding and u.outstanding[0] in u.done:
            u.done.discard(u.outstanding.popleft())
        self._dirty.add(unit)

    def safe_position(self, unit: str) -> int | None:
        """The next position to read after a restart, or None if nothing was ever settled."""
        u = self._units.get(unit)
        if u is None:
            return None
        if u.outstanding:
            return u.outstanding[0]
        return self._next.get(unit)

    def unsettled(self) -> dict[str, int]:
        """Positions polled and not yet committable, per unit."""
        return {unit: len(u.outstanding) for unit, u in self._units.items() if u.outstanding}

    def advance(self) -> dict[str, int]:
        """Positions that moved since the last call: what to commit now."""
        moved: dict[str, int] = {}
        for unit in self._dirty:
            u = self._units[unit]
            pos = self.safe_position(unit)
            if pos is not None and pos != u.committed:
                u.committed = pos
                moved[unit] = pos
        self._dirty.clear()
        return moved

    def forget(self, units: Iterable[str]) -> None:
        """Drop state for units that were revoked (another consumer owns them now)."""
        for unit in units:
            self._units.pop(unit, None)
            self._next.pop(unit, None)
            self._dirty.discard(unit)
