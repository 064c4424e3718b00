"""The `file` on-failure destination: dead letters as JSON Lines, one file per mapping."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from workers.engine.ports import StoredLetter
from workers.engine.records import Record

log = logging.getLogger("connectors.file")


class LetterNotWritten(OSError):
    """A letter could not be appended whole; the file is as it was before the attempt."""


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` to `path` whole and durably, or leave the file as it was and raise.

    `os.write` may write only part of what it is given (a full disk, a file size limit): the
    rest is written in further calls, and on any failure the file is cut back to its size before
    the attempt, so a torn line never sits before the next one. An exclusive `flock` keeps
    writers in other processes (a mapping's other pollers) from appending in between, which the
    cut would otherwise take away with it. A torn tail that a crash left behind is cut first:
    nobody was told its letter was stored.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = _whole_lines_end(fd, path)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            _cut(fd, start)
            raise LetterNotWritten(
                exc.errno, f"{path}: nothing written ({exc.strerror or exc})"
            ) from exc
    finally:
        os.close(fd)  # also releases the flock


def _whole_lines_end(fd: int, path: Path) -> int:
    """The file's size, once a torn last line (no newline) has been cut away."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep = size
    while keep > 0:
        chunk = os.pread(fd, min(keep, 65536), max(0, keep - 65536))
        newline = chunk.rfind(b"\n")
        if newline != -1:
            keep = keep - len(chunk) + newline + 1
            break
        keep -= len(chunk)
    log.warning(
        "%s: cutting a torn last line (%d bytes) left by an earlier crash", path, size - keep
    )
    _cut(fd, keep)
    return keep


def _cut(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    os.fsync(fd)


def read_letters(path: Path, size: int | None = None) -> Iterator[dict[str, Any]]:
    """The letters in the first `size` bytes of `path` (all of it by default), oldest first.

    A line that is not a letter (a torn write, a hand edit) is skipped with a warning naming the
    line, so that a reader never takes fewer letters for all of them.
    """
    with path.open("rb") as f:
        # Writers hold an exclusive lock while appending: under a shared one no line is half
        # written, so a line that does not parse is really broken, not still being written.
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        data = f.read() if size is None else f.read(size)
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        letter, problem = _letter_of(line)
        if letter is None:
            log.warning("%s:%d: skipped, not a dead letter: %s", path, number, problem)
            continue
        yield letter


def _letter_of(line: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        letter = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return None, f"not JSON ({exc})"
    request = letter.get("requestContext") if isinstance(letter, dict) else None
    if not isinstance(request, dict) or not request.get("requestId"):
        return None, "no requestContext.requestId"
    if not isinstance(request["requestId"], str):
        return None, "requestContext.requestId is not a string"
    return letter, ""


class FileDestination:
    """Appends each letter as one line to `<directory>/<mapping>.jsonl`, fsynced before returning.

    The fsync is what makes a checkpoint after `deliver` safe: the letter survives a crash. A
    letter that cannot be written whole raises (`LetterNotWritten`) with the file unchanged, so
    the engine retries it with backoff and checkpoints nothing meanwhile.
    """

    def __init__(self, directory: str | Path, mapping: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{mapping}.jsonl"
        self._lock = threading.Lock()

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        line = orjson.dumps(letter) + b"\n"
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            append_whole(self.path, line)

    def close(self) -> None:
        pass


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
        size = self.letters_path.stat().st_size
        for letter in read_letters(self.letters_path, size):
            letter_id = letter["requestContext"]["requestId"]
            if letter_id not in replayed:
                yield StoredLetter(letter_id, letter)

    def done(self, stored: StoredLetter) -> None:
        with self._lock:
            append_whole(self.done_path, stored.id.encode() + b"\n")

    def close(self) -> None:
        pass
