"""`workers dlq list/show/replay` on the file destination, through the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.cli import interrupted_replay

ROOT = Path(__file__).resolve().parents[2]
POISON = [3, 10, 17, 24]


def setup(tmp_path: Path, slow_s: float = 0) -> tuple[Path, Path, Path]:
    handled, fixed, dlq = tmp_path / "handled", tmp_path / "fixed", tmp_path / "dlq"
    config = tmp_path / "mappings.yaml"
    config.write_text(
        f"""
functions:
  picky:
    handler: tests.handlers.runtime_handlers:picky
    isolation: thread
    environment:
      HANDLED_FILE: "{handled}"
      FIXED_FILE: "{fixed}"
      POISON_IDS: "{",".join(map(str, POISON))}"
      SLOW_S: "{slow_s}"
event_source_mappings:
  - name: orders
    function: picky
    source: {{type: memory, topic: t, generate: 30}}
    batch_size: 5
    bisect_batch_on_function_error: true
    maximum_retry_attempts: 1
    destination_config: {{on_failure: {{type: file, path: "{dlq}"}}}}
"""
    )
    return config, handled, fixed


def workers(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ids_handled(handled: Path) -> list[int]:
    if not handled.exists():
        return []
    return [orjson.loads(line)["id"] for line in handled.read_bytes().splitlines()]


def pending(config: Path) -> list[dict[str, Any]]:
    result = workers("dlq", "list", str(config), "orders", "--json")
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def replay(config: Path, *extra: str) -> dict[str, Any]:
    result = workers("dlq", "replay", str(config), "orders", *extra)
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = orjson.loads(result.stdout.strip().splitlines()[-1])
    return summary


def dead_letter_poison(config: Path, handled: Path) -> None:
    run = workers("run", str(config), "--until-idle", "0.5")
    assert run.returncode == 0, run.stderr
    assert sorted(ids_handled(handled)) == [i for i in range(30) if i not in POISON]
    handled.unlink()


def test_list_show_and_replay_to_the_fixed_handler(tmp_path: Path) -> None:
    config, handled, fixed = setup(tmp_path)
    dead_letter_poison(config, handled)

    rows = pending(config)
    assert len(rows) == len(POISON)
    assert all(
        r["condition"] == "RetryAttemptsExhausted" and r["error"] == "ValueError" for r in rows
    )
    assert all(r["records"] == 1 and r["replays"] == 0 for r in rows)
    assert sorted(r["source"] for r in rows) == sorted(f"t-0@{i}" for i in POISON)

    shown = workers("dlq", "show", str(config), "orders", rows[0]["id"])
    assert shown.returncode == 0, shown.stderr
    letter = orjson.loads(shown.stdout)
    item = letter["payload"]["records"]["t-0"][0]
    assert item["valueDecoded"]["id"] in POISON
    assert letter["error"]["errorMessage"].startswith("cannot handle")

    table = workers("dlq", "list", str(config), "orders")
    assert rows[0]["id"] in table.stdout and "RetryAttemptsExhausted" in table.stdout

    dry = replay(config, "--dry-run")
    assert dry["letters"] == len(POISON) and dry["dry_run"]
    assert ids_handled(handled) == [] and len(pending(config)) == len(POISON)

    fixed.touch()
    done = replay(config, "--to", "handler")
    assert done == {
        "letters": 4,
        "records": 4,
        "succeeded": 4,
        "failed_again": 0,
        "interrupted": False,
        "dry_run": False,
    }
    assert sorted(ids_handled(handled)) == POISON
    assert pending(config) == []
    assert replay(config)["letters"] == 0  # a second replay does nothing
    assert sorted(ids_handled(handled)) == POISON


def test_records_failing_again_go_back_once_with_replay_count(tmp_path: Path) -> None:
    config, handled, _ = setup(tmp_path)
    dead_letter_poison(config, handled)
    summary = replay(config, "--to", "handler", "--error-type", "ValueError")
    # Each letter is tried once in this run: the new letters it writes are not picked up again.
    assert summary["letters"] == len(POISON) and summary["failed_again"] == len(POISON)
    rows = pending(config)
    assert len(rows) == len(POISON) and all(r["replays"] == 1 for r in rows)
    assert pending_filtered(config, "--error-type", "KeyError") == []


def pending_filtered(config: Path, *flags: str) -> list[dict[str, Any]]:
    result = workers("dlq", "list", str(config), "orders", "--json", *flags)
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def test_interrupted_replay_resumes_without_losing_or_repeating(tmp_path: Path) -> None:
    config, handled, fixed = setup(tmp_path)
    dead_letter_poison(config, handled)
    fixed.touch()
    first = interrupted_replay(
        config, "orders", lambda: bool(ids_handled(handled)), "--rate", "2", wait_s=60
    )
    assert first["interrupted"] and 1 <= first["letters"] < len(POISON)

    rest = replay(config)
    assert first["letters"] + rest["letters"] == len(POISON)
    assert sorted(ids_handled(handled)) == POISON  # each exactly once
    assert pending(config) == []
