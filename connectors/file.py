"""The `file` on-failure destination: dead letters as JSON Lines, one file per mapping."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from connectors.base import StoredLetter
from workers.records import Record


class FileDestination:
    """Appends each letter as one line to `<directory>/<mapping>.jsonl`, fsynced before returning.

    The fsync is what makes a checkpoint after `deliver` safe: the letter survives a crash.
    """

    def __init__(self, directory: str | Path, mapping: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{mapping}.jsonl"
        self._lock = threading.Lock()

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        line = orjson.dumps(letter) + b"\n"
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        """Every letter in the file, oldest first (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        letters = []
        for line in self.path.read_bytes().splitlines():
            try:
                letters.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return letters


class FileDeadLetterStore:
    """Reads `<mapping>.jsonl` back; replay progress is kept in `<mapping>.replayed` (one id a
    line, fsynced), so an interrupted replay resumes where it stopped."""

    def __init__(self, directory: str | Path, mapping: str) -> None:
        self.letters_path = Path(directory) / f"{mapping}.jsonl"
        self.done_path = Path(directory) / f"{mapping}.replayed"
        self._lock = threading.Lock()

    def pending(self) -> Iterator[StoredLetter]:
        if not self.letters_path.exists():
            return
        replayed = set()
        if self.done_path.exists():
            replayed = set(self.done_path.read_text().split())
        # Only what the file holds now: letters appended by this replay wait for the next one.
        with self.letters_path.open("rb") as f:
            data = f.read(self.letters_path.stat().st_size)
        for line in data.splitlines():
            try:
                letter = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn last line from a crash mid-write
            letter_id = str(letter.get("requestContext", {}).get("requestId", ""))
            if letter_id and letter_id not in replayed:
                yield StoredLetter(letter_id, letter)

    def done(self, stored: StoredLetter) -> None:
        with self._lock:
            fd = os.open(self.done_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, stored.id.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        pass
