"""Time as the engine sees it, injectable so policy can be tested without waiting."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall_ms(self) -> int:
        """Milliseconds since the epoch, comparable with broker timestamps."""
        ...

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Wait until `event` is set or `timeout_s` passed; True if the event was set."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(max(timeout_s, 0.0))


class FakeClock:
    """A clock that advances only when something waits on it: backoffs take no real time."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._lock = threading.Lock()
        self._now_s = 0.0
        self._start_ms = start_ms

    def monotonic(self) -> float:
        with self._lock:
            return self._now_s

    def wall_ms(self) -> int:
        with self._lock:
            return self._start_ms + int(self._now_s * 1000)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now_s += seconds

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        if event.is_set():
            return True
        self.advance(max(timeout_s, 0.0))
        # Yield so other threads can make progress, as a real wait would let them.
        time.sleep(0)
        return event.is_set()


SYSTEM_CLOCK = SystemClock()


def iso_ms(epoch_ms: int) -> str:
    """A clock's wall time (a present instant) as ISO-8601 in UTC with milliseconds."""
    stamp = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")
