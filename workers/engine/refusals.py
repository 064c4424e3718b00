"""Whether a mapping's on-failure destination keeps refusing letters: logged once per interval,
kept in the mapping's stats for `/status` and the metrics."""

from __future__ import annotations

import logging
import threading
from typing import Any

from workers.engine.clock import Clock, iso_ms
from workers.engine.stats import MappingStats

log = logging.getLogger("workers.deadletter")

# While the destination keeps refusing, one warning per mapping this often, however many batch
# threads are retrying their letters.
WARN_EVERY_S = 30.0


class Refusals:
    """The on-failure destination of one mapping as its deliveries see it: ok, or refusing since
    the first refusal that no accepted letter followed.

    A letter is waiting from its first refusal until it is delivered (or its delivery is given
    up on: stopping, or split for its size); its records are not checkpointed meanwhile.
    """

    def __init__(
        self,
        *,
        mapping: str,
        clock: Clock,
        stats: MappingStats,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        self.mapping = mapping
        self.clock = clock
        self.stats = stats
        self.warn_every_s = warn_every_s
        self._lock = threading.Lock()
        self._waiting: dict[int, int] = {}  # records of each waiting letter, by delivery key
        self._since_s: float | None = None  # monotonic
        self._since_ms: int | None = None
        self._warned_at_s: float | None = None
        self._spell_refusals = 0
        self._last_reason: str | None = None
        self._last_refused_ms: int | None = None

    def no_destination(self) -> None:
        self.stats.set_destination({"state": "none"})

    def refused(self, key: object, records: int, reason: str, retry_in_s: float) -> None:
        """The delivery `key` of `records` record(s) was refused for `reason` (redacted)."""
        now_s, now_ms = self.clock.monotonic(), self.clock.wall_ms()
        with self._lock:
            self._waiting[id(key)] = records
            if self._since_s is None:
                self._since_s, self._since_ms = now_s, now_ms
                self._spell_refusals = 0
            self._spell_refusals += 1
            self._last_reason, self._last_refused_ms = reason, now_ms
            self.stats.add(destination_refusals=1)
            self._publish()
            due = self._warned_at_s is None or now_s - self._warned_at_s >= self.warn_every_s
            if due:
                self._warned_at_s = now_s
                log.warning(
                    "mapping %s: on-failure destination refused %d record(s): %s; retry in %.1fs"
                    " (refusing for %.0fs, %d refusal(s); %d letter(s) of %d record(s) waiting,"
                    " not checkpointed)",
                    self.mapping,
                    records,
                    reason,
                    retry_in_s,
                    now_s - self._since_s,
                    self._spell_refusals,
                    len(self._waiting),
                    sum(self._waiting.values()),
                )
        if not due:
            log.debug(
                "mapping %s: on-failure destination refused %d record(s): %s; retry in %.1fs",
                self.mapping,
                records,
                reason,
                retry_in_s,
            )

    def accepted(self, key: object) -> None:
        """The delivery `key` was accepted: the destination takes letters again."""
        with self._lock:
            self._waiting.pop(id(key), None)
            if self._since_s is not None:
                log.info(
                    "mapping %s: on-failure destination accepts letters again after %.0fs and"
                    " %d refusal(s)",
                    self.mapping,
                    self.clock.monotonic() - self._since_s,
                    self._spell_refusals,
                )
                self._since_s = self._since_ms = self._warned_at_s = None
                self._publish()
            elif self._waiting:
                self._publish()

    def given_up(self, key: object) -> None:
        """The delivery `key` ended without its letter accepted (stopping, or split)."""
        with self._lock:
            if self._waiting.pop(id(key), None) is not None:
                self._publish()

    def _publish(self) -> None:
        state: dict[str, Any] = {
            "state": "ok" if self._since_ms is None else "refusing",
            "refusing_since": None if self._since_ms is None else iso_ms(self._since_ms),
            "last_reason": self._last_reason,
            "last_refused_at": (
                None if self._last_refused_ms is None else iso_ms(self._last_refused_ms)
            ),
            "letters_waiting": len(self._waiting),
            "records_waiting": sum(self._waiting.values()),
        }
        self.stats.set_destination(state)
