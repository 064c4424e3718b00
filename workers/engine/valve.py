"""Whether a mapping may invoke its function now: the operator's switch (`workers mappings
enable|disable`) and the circuit breaker a handler trips by raising `workers.Throttled`.

Batch threads ask before every invocation (`admit`) and say how it ended (`done`); the poller's
loop thread asks whether to start new batches and keep its source paused (`holds`). The breaker
is closed until an invocation is throttled; it then stays open for a pause (1 s, doubling with
each throttle in a row, up to 60 s), during which nothing is invoked. After the pause one
invocation at a time is let through (half-open): an answer from the handler closes the breaker,
another throttle opens it for twice as long. A disabled mapping lets nothing through at all.
"""

from __future__ import annotations

import threading
from typing import Any

from workers.engine.clock import Clock
from workers.engine.outcomes import Outcome, PartialFailure, Success, Throttling

# A mapping's states, named as Lambda names an event source mapping's.
ENABLED = "Enabled"
DISABLING = "Disabling"  # disabled; invocations still running finish first
DISABLED = "Disabled"
STATE_CHANGES = {
    ENABLED: "enabled; polling",
    DISABLING: "disabled; invocations running finish, the position is kept",
    DISABLED: "disabled; nothing is invoked until it is enabled",
}


THROTTLE_BASE_S = 1.0
THROTTLE_CAP_S = 60.0
# How long a batch waiting for a change it cannot foresee (an enable, the end of another
# invocation's probe) sleeps before looking again; changes wake it at once.
_UNFORESEEN_S = 60.0


class Valve:
    """Thread-safe; one per mapping (per poller), shared by its batch threads and its loop."""

    def __init__(
        self,
        clock: Clock,
        *,
        enabled: bool = True,
        base_s: float = THROTTLE_BASE_S,
        cap_s: float = THROTTLE_CAP_S,
    ) -> None:
        self.clock = clock
        self.base_s = base_s
        self.cap_s = cap_s
        self._lock = threading.Lock()
        self._enabled = enabled
        self._until: float | None = None  # open (or half-open once passed) until this time
        self._pause_s = 0.0
        self._trips = 0  # throttles in a row
        self._generation = 0  # counts openings: an invocation's ticket is the one it began in
        self._probing = False
        self._waiting = 0
        self._changed = threading.Event()

    # --- the operator ----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        with self._lock:
            if enabled != self._enabled:
                self._enabled = enabled
                self._notify()

    def poke(self) -> None:
        """Wake every waiting batch so it looks at its stop event again."""
        with self._lock:
            self._notify()

    # --- batch threads ---------------------------------------------------------------------------

    def admit(self, stop: threading.Event) -> int | None:
        """Wait until an invocation may start; its ticket for `done`, or None if `stop` came
        first. After a pause, the invocation admitted first is the breaker's probe."""
        waiting = False
        try:
            while True:
                with self._lock:
                    if stop.is_set():
                        return None
                    wait_s = self._wait_s()
                    if wait_s == 0.0:
                        if self._until is not None:
                            self._probing = True
                        if waiting:
                            self._waiting -= 1
                            waiting = False
                        return self._generation
                    if not waiting:
                        self._waiting += 1
                        waiting = True
                    changed = self._changed
                self.clock.wait(changed, wait_s)
        finally:
            if waiting:
                with self._lock:
                    self._waiting -= 1

    def started(self) -> int:
        """The ticket of an invocation that started without waiting here: a staged batch,
        which its environment began on its own (`workers.engine.ahead`)."""
        with self._lock:
            return self._generation

    def done(self, ticket: int, outcome: Outcome | None) -> float | None:
        """How an admitted invocation ended (None: it did not run); the pause it started, if
        it was throttled and opened the breaker."""
        if self._until is None and not isinstance(outcome, Throttling):
            return None  # closed, and it stays so: the common case, without the lock
        with self._lock:
            if ticket != self._generation:
                # Began before the latest opening: its throttle is counted already, and its
                # success says nothing about the downstream since.
                return None
            if isinstance(outcome, Throttling):
                self._trips += 1
                self._pause_s = min(self.cap_s, self.base_s * 2 ** min(self._trips - 1, 62))
                self._until = self.clock.monotonic() + self._pause_s
                self._generation += 1
                self._probing = False
                self._notify()
                return self._pause_s
            if isinstance(outcome, Success | PartialFailure):
                # The handler answered: the downstream takes work again.
                if self._until is not None:
                    self._until = None
                    self._trips = 0
                    self._probing = False
                    self._notify()
                return None
            # A failure of another kind, or no invocation: the next waiting batch probes.
            if self._probing:
                self._probing = False
                self._notify()
            return None

    # --- the loop thread -------------------------------------------------------------------------

    def holds(self, in_flight: int) -> bool:
        """True while no new batch should start and the source should stay paused: disabled,
        throttled, or past the pause with batches in flight that will probe."""
        with self._lock:
            if not self._enabled:
                return True
            if self._until is None:
                return False
            return in_flight > 0 or self.clock.monotonic() < self._until

    def is_open(self) -> bool:
        """Enabled with the breaker closed: a lane may go on to its next batch."""
        return self._enabled and self._until is None

    def waiting(self) -> int:
        """Batches parked here (disabled or throttled) rather than invoking."""
        with self._lock:
            return self._waiting

    def snapshot(self) -> dict[str, Any]:
        """The breaker for /status: `closed`, `open` (pausing) or `half-open` (probing)."""
        with self._lock:
            if self._until is None:
                return {"state": "closed"}
            left = self._until - self.clock.monotonic()
            return {
                "state": "open" if left > 0 else "half-open",
                "pause_s": self._pause_s,
                "resumes_in_s": round(max(left, 0.0), 3),
                "throttles_in_a_row": self._trips,
            }

    # --- internals (lock held) -------------------------------------------------------------------

    def _wait_s(self) -> float:
        """0 when an invocation may start now, else how long to wait before asking again."""
        if not self._enabled:
            return _UNFORESEEN_S
        if self._until is None:
            return 0.0
        if self._probing:
            return _UNFORESEEN_S
        return max(0.0, self._until - self.clock.monotonic())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = threading.Event()
