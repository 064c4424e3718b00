"""Counting a fault scenario by record id, and the results file the README's table comes from.

A scenario produces records whose ids it knows, lets `workers run` handle them through a fault,
then reads back what the handler completed (from its journal) and what reached the dead-letter
destination. `Tally` turns those three lists into what the reliability table shows: produced,
handled, dead-lettered, lost (must be 0), duplicates and recovery time.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]
# Where scenarios append their results (one JSON object a line); `python -m tests.faults.report`
# renders it as the README's reliability table.
RESULTS_ENV = "ESM_FAULTS_RESULTS"
DEFAULT_RESULTS = REPO / "var" / "faults" / "results.jsonl"


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


@dataclass
class Tally:
    """What became of every produced record in one scenario on one broker."""

    scenario: str
    broker: str
    produced: Sequence[str]
    # Ids the handler completed successfully, once per successful invocation that held them,
    # in the order the handler finished them.
    handled: Sequence[str]
    dead_lettered: Sequence[str] = ()
    # Seconds from the fault ending (broker back, worker restarted) to the last record settled.
    recovery_s: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> list[str]:
        settled = set(self.handled) | set(self.dead_lettered)
        return [i for i in self.produced if i not in settled]

    @property
    def unknown(self) -> list[str]:
        """Ids handled or dead-lettered that were never produced (a scenario bug, or worse)."""
        produced = set(self.produced)
        return sorted({i for i in [*self.handled, *self.dead_lettered] if i not in produced})

    @property
    def duplicates(self) -> int:
        """Successful handlings beyond the first of each id."""
        return sum(n - 1 for n in Counter(self.handled).values() if n > 1)

    def order_violations(self, key_of: dict[str, str]) -> list[tuple[str, str, str]]:
        """(key, earlier id, later id) where a later record of a key was first handled before
        an earlier one (produced order per key against the order of first handling)."""
        first: dict[str, int] = {}
        for index, ident in enumerate(self.handled):
            first.setdefault(ident, index)
        violations = []
        last_seen: dict[str, tuple[str, int]] = {}
        for ident in self.produced:
            if ident not in first or ident not in key_of:
                continue
            key = key_of[ident]
            previous = last_seen.get(key)
            if previous is not None and first[ident] < previous[1]:
                violations.append((key, previous[0], ident))
            last_seen[key] = (ident, first[ident])
        return violations

    def check(self, *, max_duplicates: int = 0, key_of: dict[str, str] | None = None) -> None:
        """Assert the promise: nothing lost, nothing unknown, duplicates within what a crash
        may cause, order per key kept."""
        assert not self.lost, (
            f"{self.scenario}/{self.broker}: lost {len(self.lost)}: {self.lost[:20]}"
        )
        assert not self.unknown, f"{self.scenario}/{self.broker}: unknown ids {self.unknown[:20]}"
        assert self.duplicates <= max_duplicates, (
            f"{self.scenario}/{self.broker}: {self.duplicates} duplicates (at most"
            f" {max_duplicates} allowed)"
        )
        if key_of is not None:
            bad = self.order_violations(key_of)
            assert not bad, f"{self.scenario}/{self.broker}: order per key broken: {bad[:10]}"

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "broker": self.broker,
            "produced": len(self.produced),
            "handled": len(set(self.handled)),
            "dead_lettered": len(set(self.dead_lettered)),
            "lost": len(self.lost),
            "duplicates": self.duplicates,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
            "notes": self.notes,
            **self.extra,
        }

    def record(self) -> None:
        """Append this result to the results file (after `check`, so only what held is kept)."""
        path = results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(orjson.dumps(self.as_json()) + b"\n")


def read_journal(path: Path) -> list[str]:
    """Ids from a handler journal: one JSON array of ids a line, a line per successful
    invocation (see tests/faults/handlers.py); a torn last line from a killed process is
    ignored, since its invocation never returned."""
    if not path.exists():
        return []
    ids: list[str] = []
    for line in path.read_bytes().splitlines():
        try:
            batch = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        ids.extend(str(i) for i in batch)
    return ids


def ids_of(values: Iterable[bytes]) -> list[str]:
    """Record ids from payloads written by the scenarios: JSON objects with an "id"."""
    out = []
    for value in values:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "id" in doc:
            out.append(str(doc["id"]))
    return out


def file_letters(directory: Path, mapping: str) -> list[dict[str, Any]]:
    """The letters a `file` destination holds for `mapping` (whole lines only)."""
    path = directory / f"{mapping}.jsonl"
    if not path.exists():
        return []
    letters = []
    for line in path.read_bytes().splitlines():
        try:
            letters.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return letters


def letter_ids(letters: Iterable[dict[str, Any]]) -> list[str]:
    """Ids of the records that dead letters carry in their payloads."""
    from workers.events import records

    values = [
        r.value for letter in letters if "payload" in letter for r in records(letter["payload"])
    ]
    return ids_of(values)
