"""Records a poller died on: its in-flight file, death counts per record, and suspects.

Some deaths no Python code can catch: a segfault in a C extension, `os._exit` from a handler
under `isolation: thread`, the OOM killer. So that such a record cannot kill its poller forever,
the poller keeps a small file naming the records of every invocation running (one write when an
invocation starts and one when it ends, whatever the batch size); when a poller dies abnormally,
the supervisor reads it, counts a death for each record named there and hands the counts to the
restarted poller. There a suspect (a record with deaths) runs alone and with no other invocation
beside it, so that a further death is pinned on it alone, and a record with `MAX_DEATHS` deaths
is dead-lettered on its next delivery without being invoked.

Records are named by their coordinates where those survive a redelivery (a Kafka offset, a Redis
entry id; a range per invocation is enough), and otherwise by the source's fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from workers.engine.records import Record

log = logging.getLogger("workers.flight")

MAX_DEATHS = 3
POLLER_DIED_ERROR_TYPE = "Runtime.PollerDied"

# A suspect list as it travels from the supervisor to a poller (plain data, picklable):
# ["range", unit, first, last, deaths] or ["id", fingerprint, deaths].
SuspectList = list[list[Any]]


class InFlightFile:
    """The poller's side: which records its running invocations hold, in one small file.

    Each write replaces the file's first line; a reader takes the first line only, so a longer
    earlier content left behind the newline (a write cut short by death) does no harm.
    """

    def __init__(self, path: Path, stable_positions: bool, fingerprint: Callable[[Record], str]):
        self.path = path
        self._stable = stable_positions
        self._fingerprint = fingerprint
        self._lock = threading.Lock()
        self._running: dict[int, list[Any]] = {}
        self._tokens = iter(range(1, 1 << 62))
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def begin(self, records: Sequence[Record]) -> int:
        entry = self._entry(records)
        with self._lock:
            token = next(self._tokens)
            self._running[token] = entry
            self._write()
        return token

    def end(self, token: int) -> None:
        with self._lock:
            if self._running.pop(token, None) is not None:
                self._write()

    def failed(self, records: Sequence[Record]) -> None:
        """Name `records` as in flight for good: the poller is about to die of them."""
        self.begin(records)

    def close(self) -> None:
        with self._lock:
            self._running.clear()
            self._write()
            os.close(self._fd)
            self._fd = -1

    def _entry(self, records: Sequence[Record]) -> list[Any]:
        if self._stable:
            positions = [r.position for r in records]
            # Batches never mix units; a range covers the records filtered out between.
            return [["range", records[0].source, min(positions), max(positions)]]
        return [["id", _fingerprint(self._fingerprint, r)] for r in records]

    def _write(self) -> None:
        if self._fd < 0:
            return
        entries = [e for entry in self._running.values() for e in entry]
        if self._stable:
            # json, not orjson: Redis positions (ms << 64 | seq) do not fit 64 bits.
            data = json.dumps(entries, separators=(",", ":")).encode() + b"\n"
        else:
            # A name per record, hundreds per batch: orjson takes 7 µs for 500, json 120.
            data = orjson.dumps(entries) + b"\n"
        try:
            os.pwrite(self._fd, data, 0)
        except OSError as exc:  # a full disk must not stop the poller; deaths go uncounted
            log.warning("in-flight file %s: %s", self.path, exc)


def read_in_flight(path: Path) -> list[list[Any]]:
    """What a dead poller had in flight, from its file ([] when there is none or it is torn)."""
    try:
        with path.open("rb") as f:
            line = f.readline()
    except OSError:
        return []
    try:
        entries = json.loads(line)
    except ValueError:
        return []
    return [e for e in entries if isinstance(e, list)] if isinstance(entries, list) else []


class DeathCounts:
    """The supervisor's side: deaths per in-flight entry, over every instance of a mapping."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Any, ...], int] = {}

    def add(self, entries: list[list[Any]]) -> None:
        for entry in entries:
            key = tuple(entry)
            self._counts[key] = self._counts.get(key, 0) + 1

    def suspects(self) -> SuspectList:
        return [[*key, n] for key, n in self._counts.items()]

    def __bool__(self) -> bool:
        return bool(self._counts)


class Suspects:
    """The restarted poller's side: how many times a poller died with a record in flight."""

    def __init__(self, listed: SuspectList, fingerprint: Callable[[Record], str]) -> None:
        self._ranges: dict[str, list[tuple[int, int, int]]] = {}
        self._ids: dict[str, int] = {}
        self._fingerprint = fingerprint
        for entry in listed:
            if entry[0] == "range" and len(entry) == 5:
                _, unit, first, last, deaths = entry
                self._ranges.setdefault(str(unit), []).append((int(first), int(last), int(deaths)))
            elif entry[0] == "id" and len(entry) == 3:
                self._ids[str(entry[1])] = self._ids.get(str(entry[1]), 0) + int(entry[2])

    def __bool__(self) -> bool:
        return bool(self._ranges or self._ids)

    def deaths(self, record: Record) -> int:
        n = 0
        ranges = self._ranges.get(record.source)
        if ranges:
            position = record.position
            n += sum(d for first, last, d in ranges if first <= position <= last)
        if self._ids:
            n += self._ids.get(_fingerprint(self._fingerprint, record), 0)
        return n


def _fingerprint(fingerprint: Callable[[Record], str], record: Record) -> str:
    try:
        return fingerprint(record)
    except Exception:  # a record that cannot be fingerprinted is only known by its position
        return f"{record.source}@{record.position}"


class Gate:
    """Invocations share the poller; a suspect's runs alone (writers first, so it gets in)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
