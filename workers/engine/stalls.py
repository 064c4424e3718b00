"""Stuck detection: a source unit (partition, stream, queue) whose checkpoint has not moved for
`stalled_after_s` while work waits on it (records not yet read, or read and not settled) is
stalled. Said once per stall in the log, with the record holding it up and why; kept in the
mapping's stats for `/status` and the `esm_stalled_units` gauge. So a poison record retried
forever is an alert, not a mystery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from workers.engine.clock import Clock, iso_ms
from workers.engine.outcomes import ErrorInfo
from workers.engine.redact import redact_text
from workers.engine.stats import MappingStats

log = logging.getLogger("workers.stalls")

# Error messages are shown in `/status` and on the status page: enough to recognise the error.
MESSAGE_CHARS = 500


def error_json(error: ErrorInfo) -> dict[str, str]:
    """An error's type and message as `/status` shows them: passwords masked, message capped."""
    message = redact_text(error.message)
    if len(message) > MESSAGE_CHARS:
        message = message[: MESSAGE_CHARS - 1] + "…"
    return {"errorType": error.error_type, "errorMessage": message}


class Retrying:
    """Batches that failed and wait for their next attempt, by unit: why a unit does not move.

    Thread-safe: batch threads report, the loop thread reads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # work -> (unit, first position, what /status shows)
        self._failing: dict[object, tuple[str, int, dict[str, Any]]] = {}

    def failed(
        self,
        work: object,
        unit: str,
        position: int,
        *,
        record: Any,
        records: int,
        attempt: int,
        error: ErrorInfo,
    ) -> None:
        """`work` (`records` records from `record`) failed its attempt number `attempt`."""
        entry = {"record": record, "records": records, "attempt": attempt, **error_json(error)}
        with self._lock:
            self._failing[work] = (unit, position, entry)

    def done(self, work: object) -> None:
        """`work` is over: settled, split or stopped."""
        with self._lock:
            self._failing.pop(work, None)

    def by_unit(self) -> dict[str, dict[str, Any]]:
        """Per unit, its failing batch that starts earliest: the one holding its checkpoint."""
        with self._lock:
            failing = list(self._failing.values())
        first: dict[str, tuple[int, dict[str, Any]]] = {}
        for unit, position, entry in failing:
            if unit not in first or position < first[unit][0]:
                first[unit] = (position, entry)
        return {unit: entry for unit, (_, entry) in first.items()}


class Stalls:
    """The stall state of one poller's units. The loop thread only: `moved` when it checkpoints
    a unit, `check` about once a second with what it knows of each unit."""

    def __init__(
        self,
        *,
        mapping: str,
        stalled_after_s: float,
        clock: Clock,
        stats: MappingStats,
        retrying: Retrying,
    ) -> None:
        self.mapping = mapping
        self.stalled_after_s = stalled_after_s
        self.clock = clock
        self.stats = stats
        self.retrying = retrying
        # Units with work waiting, since when (monotonic) they have not moved.
        self._since: dict[str, float] = {}
        self._stalled: dict[str, dict[str, Any]] = {}

    def moved(self, units: Iterable[str]) -> None:
        """The checkpoint of `units` moved (a commit or an ack)."""
        now = self.clock.monotonic()
        recovered = False
        for unit in units:
            if unit in self._stalled:
                self._recover(unit, now)
                recovered = True
            if unit in self._since:
                self._since[unit] = now
        if recovered:
            self._publish()

    def check(
        self, assigned: Collection[str], lag: Mapping[str, int], unsettled: Mapping[str, int]
    ) -> None:
        """Look at every assigned unit: `lag` records not yet read, `unsettled` read and not
        settled."""
        now = self.clock.monotonic()
        retrying = self.retrying.by_unit()
        for unit in [u for u in self._since if u not in assigned]:
            # Revoked: another consumer owns it now, and says for itself whether it moves.
            del self._since[unit]
            self._stalled.pop(unit, None)
        for unit in assigned:
            waiting, held = lag.get(unit, 0), unsettled.get(unit, 0)
            failing = retrying.get(unit)
            if waiting <= 0 and held <= 0 and failing is None:
                if unit in self._stalled:
                    self._recover(unit, now)
                self._since.pop(unit, None)
                continue
            since = self._since.setdefault(unit, now)
            if now - since < self.stalled_after_s:
                continue
            entry = self._entry(since, now, waiting, held, failing)
            if unit not in self._stalled:
                log.warning(
                    "mapping %s: %s has not moved for %.0fs with %d record(s) not yet read and"
                    " %d read and not settled; %s",
                    self.mapping,
                    unit,
                    now - since,
                    waiting,
                    held,
                    _explain(entry),
                )
            self._stalled[unit] = entry
        self._publish()

    def _publish(self) -> None:
        self.stats.set_stalled(dict(self._stalled))

    def _entry(
        self,
        since: float,
        now: float,
        waiting: int,
        held: int,
        failing: dict[str, Any] | None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "since": iso_ms(self.clock.wall_ms() - int((now - since) * 1000)),
            "for_s": round(now - since, 1),
            "lag": waiting,
            "unsettled": held,
        }
        destination = self.stats.destination
        if failing is not None:
            entry.update(reason="retrying", **failing)
        elif destination.get("state") == "refusing":
            entry.update(reason="destination_refusing", destination=destination.get("last_reason"))
        else:
            entry["reason"] = "not_settled"
        return entry

    def _recover(self, unit: str, now: float) -> None:
        del self._stalled[unit]
        log.info(
            "mapping %s: %s moves again after %.0fs",
            self.mapping,
            unit,
            now - self._since.get(unit, now),
        )


def _explain(entry: dict[str, Any]) -> str:
    """Why a stalled unit does not move, for the log."""
    if entry["reason"] == "retrying":
        return (
            f"{_coordinates(entry['record'])} ({entry['records']} record(s)) failed attempt"
            f" {entry['attempt']} and is being retried: {entry['errorType']}:"
            f" {entry['errorMessage']}"
        )
    if entry["reason"] == "destination_refusing":
        return f"its dead letters wait for the on-failure destination: {entry['destination']}"
    return "no batch of it has settled (a long invocation, or records waiting behind one)"


def _coordinates(record: Any) -> str:
    if isinstance(record, dict):
        return ", ".join(f"{k} {v}" for k, v in record.items())
    return str(record)
