"""Per-unit checkpoint tracking: commit only the contiguous prefix of settled records.

Batches of one partition can complete out of order (parallelization_factor > 1, bisect halves);
an offset is safe to commit only when every record before it has settled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


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
