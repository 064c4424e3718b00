"""`workers dlq list/show/replay` on a Redis stream destination, through the command line against
the real server: listing changes nothing, replays hand each letter on once, records failing
again come back once with their replay count, `--to source` puts them back on the source stream,
and an interrupted replay resumes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from tests import brokers
from tests.cli import interrupted_replay

pytestmark = [pytest.mark.integration, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = 20
# n of the poison entries and the error each raises until the handler is fixed.
POISON = {3: "ValueError", 7: "KeyError", 10: "ValueError", 15: "KeyError"}
FAIL_FIELD = {"ValueError": "value", "KeyError": "key"}


@dataclass
class Setup:
    client: redis.Redis
    config: Path
    source: str
    dlq: str
    out: Path
    fixed: Path


@pytest.fixture
def setup(redis_url: str, tmp_path: Path) -> Iterator[Setup]:
    """A mapping reading a fresh stream of ENTRIES entries into a fresh dead-letter stream; both
    streams are deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    source = brokers.unique_name("redis-dlq-src")
    dlq = brokers.unique_name("redis-dlq-letters")
    out, fixed = tmp_path / "handled.jsonl", tmp_path / "fixed"
    config = tmp_path / "mappings.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "functions": {
                    "picky": {
                        "handler": "tests.handlers.redis_replay_handlers:picky",
                        "isolation": "thread",
                        "environment": {"RDLQ_OUT": str(out), "RDLQ_FIXED": str(fixed)},
                    }
                },
                "event_source_mappings": [
                    {
                        "name": "orders",
                        "function": "picky",
                        "source": {
                            "type": "redis",
                            "url": redis_url,
                            "streams": [source],
                            "consumer_name": "test",
                        },
                        "batch_size": 5,
                        "maximum_batching_window_s": 0.05,
                        "bisect_batch_on_function_error": True,
                        "maximum_retry_attempts": 0,
                        "destination_config": {
                            "on_failure": {"type": "redis", "url": redis_url, "stream": dlq}
                        },
                    }
                ],
            }
        )
    )
    pipe = client.pipeline(transaction=False)
    for n in range(ENTRIES):
        fields: dict[Any, Any] = {"n": n, "tenant": "acme"}
        if n in POISON:
            fields["fail"] = FAIL_FIELD[POISON[n]]
        pipe.xadd(source, fields)
    pipe.execute()
    try:
        yield Setup(client, config, source, dlq, out, fixed)
    finally:
        client.delete(source, dlq)
        client.close()


def workers(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def handled(s: Setup) -> list[dict[str, Any]]:
    if not s.out.exists():
        return []
    return [orjson.loads(line) for line in s.out.read_bytes().splitlines()]


def handled_ns(s: Setup) -> list[int]:
    return sorted(h["n"] for h in handled(s))


def run(s: Setup) -> None:
    done = workers("run", str(s.config), "--until-idle", "0.3")
    assert done.returncode == 0, done.stderr[-4000:]


def pending(s: Setup, *flags: str) -> list[dict[str, Any]]:
    result = workers("dlq", "list", str(s.config), "orders", "--json", *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def replay(s: Setup, *flags: str) -> dict[str, Any]:
    result = workers("dlq", "replay", str(s.config), "orders", *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    summary: dict[str, Any] = orjson.loads(result.stdout.strip().splitlines()[-1])
    return summary


def dead_letter_poison(s: Setup) -> None:
    run(s)
    assert handled_ns(s) == [n for n in range(ENTRIES) if n not in POISON]
    s.out.unlink()


def dlq_state(s: Setup) -> tuple[Any, ...]:
    """Everything a listing could change on the dead-letter stream."""
    return (
        s.client.xlen(s.dlq),
        s.client.xinfo_groups(s.dlq),
        s.client.xrange(s.dlq),
    )


def summary_of(letters: int, succeeded: int, failed_again: int) -> dict[str, Any]:
    return {
        "letters": letters,
        "records": letters,
        "succeeded": succeeded,
        "failed_again": failed_again,
        "interrupted": False,
        "dry_run": False,
    }


def test_list_show_and_replay_to_the_fixed_handler(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    before = dlq_state(s)
    assert before[0] == len(POISON) and before[1] == []

    rows = pending(s)
    assert pending(s) == rows  # listing twice: same result
    assert dlq_state(s) == before  # and nothing changed, not even a consumer group
    assert [r["error"] for r in rows] == [POISON[n] for n in sorted(POISON)]
    assert all(r["condition"] == "RetryAttemptsExhausted" for r in rows)
    assert all(r["records"] == 1 and r["replays"] == 0 for r in rows)
    assert all(r["source"].startswith(f"{s.source}@") for r in rows)
    assert len(pending(s, "--limit", "2")) == 2

    shown = workers("dlq", "show", str(s.config), "orders", rows[1]["id"])
    assert shown.returncode == 0, shown.stderr
    letter = orjson.loads(shown.stdout)
    [item] = letter["payload"]["records"][s.source]
    assert item["fieldsDecoded"] == {"n": 7, "tenant": "acme", "fail": "key"}
    assert letter["error"]["errorType"] == "KeyError"
    assert letter["requestContext"]["requestId"] == rows[1]["id"]
    missing = workers("dlq", "show", str(s.config), "orders", "no-such-letter")
    assert missing.returncode == 1

    table = workers("dlq", "list", str(s.config), "orders")
    assert rows[0]["id"] in table.stdout and "RetryAttemptsExhausted" in table.stdout

    dry = replay(s, "--dry-run")
    assert dry["letters"] == len(POISON) and dry["dry_run"]
    assert handled(s) == [] and dlq_state(s) == before

    s.fixed.touch()
    assert replay(s, "--to", "handler") == summary_of(4, succeeded=4, failed_again=0)
    assert handled_ns(s) == sorted(POISON)  # each exactly once
    assert pending(s) == []
    assert replay(s) == summary_of(0, succeeded=0, failed_again=0)  # nothing left to replay
    assert handled_ns(s) == sorted(POISON)
    assert s.client.xlen(s.dlq) == len(POISON)  # replaying keeps the letters, as progress
    assert s.client.xpending(s.dlq, "esm-replay")["pending"] == 0


def test_still_failing_letters_come_back_once_and_skipped_ones_stay(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    # Entries a shared or damaged stream may hold: another mapping's letter, and no letter.
    foreign = pending(s)[0]
    s.client.xadd(s.dlq, {"letter": b"{not json", "mapping": "orders"})
    s.client.xadd(s.dlq, {"letter": orjson.dumps({"x": 1}), "mapping": "orders"})
    letter = orjson.loads(workers("dlq", "show", str(s.config), "orders", foreign["id"]).stdout)
    letter["requestContext"]["requestId"] = "someone-else"
    s.client.xadd(s.dlq, {"letter": orjson.dumps(letter), "mapping": "other-mapping"})
    listed = workers("dlq", "list", str(s.config), "orders", "--json")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(POISON)
    assert listed.stderr.count("not a dead letter") == 2

    # Still failing: each ValueError letter is tried once and written back with replayCount 1;
    # the KeyError letters between them are skipped by the filter and stay to be replayed.
    again = replay(s, "--to", "handler", "--error-type", "ValueError")
    assert again == summary_of(2, succeeded=0, failed_again=2)
    rows = pending(s)
    assert sorted((r["error"], r["replays"]) for r in rows) == [
        ("KeyError", 0),
        ("KeyError", 0),
        ("ValueError", 1),
        ("ValueError", 1),
    ]
    assert rows[0]["error"] == "KeyError"  # oldest first
    # The letter skipped before a replayed one waits in the replay group's pending entries.
    assert s.client.xpending(s.dlq, "esm-replay")["pending"] == 1
    assert handled(s) == []

    s.fixed.touch()
    assert replay(s, "--to", "handler") == summary_of(4, succeeded=4, failed_again=0)
    assert handled_ns(s) == sorted(POISON)
    assert pending(s) == [] and replay(s)["letters"] == 0


def test_replay_to_the_source_stream(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    newest: Any = s.client.xrevrange(s.source, count=1)
    last_id = newest[0][0].decode()

    # Not fixed yet: the records go back onto the source and fail there again, with their count.
    assert replay(s, "--to", "source") == summary_of(4, succeeded=4, failed_again=0)
    assert pending(s) == []
    replayed: Any = s.client.xrange(s.source, f"({last_id}", "+")
    assert [
        {k.decode(): v.decode() for k, v in fields.items() if k != b"fail"}
        for _, fields in replayed
    ] == [{"n": str(n), "tenant": "acme", "esm-replay-count": "1"} for n in sorted(POISON)]
    run(s)
    rows = pending(s)
    assert len(rows) == len(POISON) and all(r["replays"] == 1 for r in rows)
    assert handled(s) == []

    s.fixed.touch()
    assert replay(s, "--to", "source")["letters"] == len(POISON)
    run(s)
    assert sorted((h["n"], h["replay"]) for h in handled(s)) == [(n, "2") for n in sorted(POISON)]
    assert pending(s) == []
    assert s.client.xlen(s.source) == ENTRIES + 2 * len(POISON)


def test_interrupted_replay_resumes_without_losing_letters(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    s.fixed.touch()
    first = interrupted_replay(s.config, "orders", lambda: bool(handled(s)), "--rate", "2")
    assert first["interrupted"] and 1 <= first["letters"] < len(POISON)
    assert len(pending(s)) == len(POISON) - first["letters"]

    rest = replay(s)
    assert first["letters"] + rest["letters"] == len(POISON)
    ns = handled_ns(s)
    # Nothing lost; at most the letter in flight at the signal is handled twice.
    assert set(ns) == set(POISON) and len(ns) <= len(POISON) + 1
    assert pending(s) == []
