"""The file destination writes whole letters or nothing, and its readers warn about broken lines.

Short and failing writes are injected here (pure logic); tests/integration/test_file_full_disk.py
fills a real disk.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

import connectors.file.destination
from connectors.file.destination import FileDeadLetterStore, FileDestination


def letter(n: int, size: int = 300) -> dict[str, Any]:
    return {
        "requestContext": {"requestId": f"id-{n}"},
        "payload": {"eventSource": "redis:streams", "records": {}},
        "pad": "x" * size,
    }


class ShortWrites:
    """`os` as connectors.file.destination sees it, with `write` writing at most `limit` bytes per
    call and
    failing (`error`) or writing nothing (`error` None) once `budget` bytes are written."""

    def __init__(self, limit: int, budget: int, error: int | None = errno.ENOSPC) -> None:
        self.limit, self.budget, self.error = limit, budget, error
        self.calls = 0

    def write(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.budget <= 0:
            if self.error is None:
                return 0
            raise OSError(self.error, os.strerror(self.error))
        n = os.write(fd, bytes(data[: min(self.limit, self.budget)]))
        self.budget -= n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_short_write_is_continued_until_the_letter_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = FileDestination(tmp_path, "m")
    fake = ShortWrites(limit=100, budget=10**6)
    monkeypatch.setattr(connectors.file.destination, "os", fake)
    dest.deliver(letter(1), [])
    dest.deliver(letter(2), [])
    assert fake.calls > 2
    lines = dest.path.read_bytes().splitlines()
    assert [orjson.loads(line)["requestContext"]["requestId"] for line in lines] == ["id-1", "id-2"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EFBIG, None])
def test_a_failing_write_leaves_the_file_as_it_was_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int | None
) -> None:
    dest = FileDestination(tmp_path, "m")
    dest.deliver(letter(1), [])
    before = dest.path.read_bytes()
    monkeypatch.setattr(
        connectors.file.destination, "os", ShortWrites(limit=120, budget=150, error=error)
    )
    with pytest.raises(OSError):
        dest.deliver(letter(2), [])
    assert dest.path.read_bytes() == before
    monkeypatch.undo()
    dest.deliver(letter(3), [])
    lines = dest.path.read_bytes().splitlines()
    assert [orjson.loads(line)["requestContext"]["requestId"] for line in lines] == ["id-1", "id-3"]


def test_a_torn_tail_left_by_a_crash_is_cut_before_the_next_letter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = FileDestination(tmp_path, "m")
    dest.deliver(letter(1), [])
    with dest.path.open("ab") as f:
        f.write(orjson.dumps(letter(2))[:50])
    with caplog.at_level(logging.WARNING, logger="connectors.file"):
        dest.deliver(letter(3), [])
    assert "torn last line" in caplog.text
    lines = dest.path.read_bytes().splitlines()
    assert [orjson.loads(line)["requestContext"]["requestId"] for line in lines] == ["id-1", "id-3"]


def test_the_store_warns_about_lines_that_are_not_letters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = FileDestination(tmp_path, "m")
    dest.deliver(letter(1), [])
    with dest.path.open("ab") as f:
        f.write(orjson.dumps(letter(2))[:50] + orjson.dumps(letter(3)) + b"\n")
        f.write(b'{"no": "request id"}\n')
    dest.deliver(letter(4), [])
    store = FileDeadLetterStore(tmp_path, "m")
    with caplog.at_level(logging.WARNING, logger="connectors.file"):
        ids = [s.id for s in store.pending()]
    assert ids == ["id-1", "id-4"]
    assert "m.jsonl:2: skipped, not a dead letter: not JSON" in caplog.text
    assert "m.jsonl:3: skipped, not a dead letter: no requestContext.requestId" in caplog.text
