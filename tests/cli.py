"""Running the `workers` command from tests, as a user would: a subprocess in the repository."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]


# Every source's caught_up() is exact (the broker has nothing more, nothing is in flight), so a
# second of quiet ends a run over records produced before it. Tests that produce while the run
# goes on pass a longer wait.
UNTIL_IDLE_S = 1.0


def workers_run(config: Path, summary: Path, until_idle_s: float = UNTIL_IDLE_S) -> list[str]:
    """The command line of `workers run CONFIG --until-idle S --summary-json SUMMARY`."""
    return [
        sys.executable,
        "-m",
        "workers",
        "run",
        str(config),
        "--until-idle",
        str(until_idle_s),
        "--summary-json",
        str(summary),
    ]


def run_workers(
    config: Path,
    summary: Path,
    timeout_s: float = 90.0,
    check_log: Callable[[str], None] | None = None,
    until_idle_s: float = UNTIL_IDLE_S,
) -> dict[str, Any]:
    """Run until idle, insist on exit 0 (and on `check_log` of its log), return the summary."""
    done = subprocess.run(
        workers_run(config, summary, until_idle_s),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    if check_log is not None:
        check_log(done.stderr)
    result: dict[str, Any] = orjson.loads(summary.read_bytes())
    return result


def interrupted_replay(
    config: Path, mapping: str, started: Callable[[], bool], *flags: str, wait_s: float = 30.0
) -> dict[str, Any]:
    """Start `workers dlq replay`, send SIGTERM once `started()`, insist on exit 0 and return
    the summary it printed."""
    command = [
        sys.executable,
        "-m",
        "workers",
        "dlq",
        "replay",
        str(config),
        mapping,
        *flags,
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + wait_s
        while not started() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    summary: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return summary
