"""The file destination on a real full disk (a tiny tmpfs), driven through `workers run` with a
Redis source and a handler that always fails: no letter is torn, no entry is acked before its
letter is on disk, and once space is freed every letter lands whole."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from tests import brokers
from tests.cli import REPO, workers_run

pytestmark = [pytest.mark.integration, pytest.mark.redis]

ENTRIES = 6
VALUE_BYTES = 3000  # each letter is about 4.3 KB: two fit in the space left, not six
DISK_BYTES = 64 * 1024
FREE_BYTES = 9 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for this test alone (needs root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        brokers.skip_or_fail(f"cannot mount a tmpfs for a full disk: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def letters_on_disk(path: Path) -> list[dict[str, Any]]:
    """Every line of the letters file, insisting that each is a whole letter."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line: {data[-80:]!r}"
    return [orjson.loads(line) for line in data.splitlines()]


def entry_ids(letters: list[dict[str, Any]]) -> list[str]:
    return [
        item["id"]
        for letter in letters
        for items in letter["payload"]["records"].values()
        for item in items
    ]


def test_a_full_disk_tears_no_letter_and_acks_nothing_unwritten(
    redis_url: str, tmp_path: Path, tiny_disk: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = brokers.unique_name("file-full-disk")
    ids = [
        brokers.redis_text(client.xadd(stream, {"n": str(n), "pad": "x" * VALUE_BYTES}))
        for n in range(ENTRIES)
    ]
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (DISK_BYTES - FREE_BYTES))
    dlq = tiny_disk / "dlq"
    config = tmp_path / "mappings.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "functions": {
                    "fails": {"handler": "tests.handlers.misbehaving:raises", "isolation": "thread"}
                },
                "event_source_mappings": [
                    {
                        "name": "full",
                        "function": "fails",
                        "source": {
                            "type": "redis",
                            "url": redis_url,
                            "streams": [stream],
                            "consumer_name": "test",
                        },
                        "batch_size": 1,
                        "maximum_batching_window_s": 0,
                        "maximum_retry_attempts": 0,
                        "destination_config": {"on_failure": {"type": "file", "path": str(dlq)}},
                    }
                ],
            }
        )
    )
    log_path = tmp_path / "run.log"
    summary = tmp_path / "summary.json"
    with log_path.open("w") as log:
        run = subprocess.Popen(
            workers_run(config, summary, until_idle_s=1.0), cwd=REPO, stderr=log, text=True
        )
    try:
        deadline = time.monotonic() + 60
        while "on-failure destination refused" not in log_path.read_text():
            assert run.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        # The disk is full: whatever letters are there are whole, and every entry not in one
        # is still pending in the group (not acked).
        written = entry_ids(letters_on_disk(dlq / "full.jsonl"))
        assert len(written) < ENTRIES
        pending = {
            brokers.redis_text(row["message_id"])
            for row in client.xpending_range(stream, "full", "-", "+", ENTRIES * 2)
        }
        assert set(ids) - set(written) <= pending, (written, pending)
        assert "No space left on device" in log_path.read_text()

        filler.unlink()
        assert run.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        assert client.xpending(stream, "full")["pending"] == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        client.delete(stream)
    letters = letters_on_disk(dlq / "full.jsonl")
    assert sorted(entry_ids(letters)) == sorted(ids)
    counts = orjson.loads(summary.read_bytes())["full"]
    assert counts["dead_lettered"] == ENTRIES
