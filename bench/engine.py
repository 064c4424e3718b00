"""Runs esm-workers through its real command line: `workers run CONFIG --until-idle S
--summary-json PATH`, with a generated configuration and a benchmark handler."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import OUT_ENV, BenchError, Finished, Span, read_spans, run_bounded

MAPPING = "bench"


@dataclass(slots=True)
class EngineRun:
    summary: dict[str, Any]
    spans: list[Span]
    out_path: Path
    wall_s: float


class Workdir:
    """A temporary directory for configs, handler outputs and logs of one benchmark run."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="esm-bench-"))
        self._n = 0

    def next(self, label: str) -> Path:
        self._n += 1
        folder = self.path / f"{self._n:03d}-{label}"
        folder.mkdir()
        return folder

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def config_for(
    source: dict[str, Any],
    *,
    handler: str,
    isolation: str = "thread",
    concurrency: int = 4,
    timeout_s: float = 60,
    **mapping: Any,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "batch_size": 500,
        "maximum_batching_window_s": 0.05,
        "maximum_retry_attempts": 2,
        **mapping,
    }
    return {
        "functions": {
            "fn": {
                "handler": handler,
                "timeout_s": timeout_s,
                "concurrency": concurrency,
                "isolation": isolation,
            }
        },
        "event_source_mappings": [
            {"name": MAPPING, "function": "fn", "source": source, **settings}
        ],
    }


def workers_command() -> list[str]:
    script = Path(sys.executable).parent / "workers"
    return [str(script)] if script.exists() else [sys.executable, "-m", "workers"]


def run_workers(
    config: dict[str, Any],
    folder: Path,
    *,
    until_idle_s: float = 1.0,
    timeout_s: float = 180.0,
    metrics_port: int | None = None,
    while_running: Callable[[], None] | None = None,
) -> EngineRun:
    """Write `config`, run `workers run` on it until idle, and read what the handler wrote.

    With `while_running`, the command starts in the background and the callable runs once the
    poller reports itself assigned on /readyz (it needs `metrics_port`).
    """
    config_path = folder / "mapping.yaml"
    # JSON is YAML: no second serialiser needed.
    config_path.write_text(json.dumps(config, indent=2))
    summary_path = folder / "summary.json"
    out_path = folder / "handler.out"
    log_path = folder / "workers.log"
    command = [
        *workers_command(),
        "run",
        str(config_path),
        "--until-idle",
        str(until_idle_s),
        "--summary-json",
        str(summary_path),
    ]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    env = {OUT_ENV: str(out_path), "WORKERS_LOG_LEVEL": "INFO"}
    if while_running is None:
        done = run_bounded(command, timeout_s=timeout_s, env=env, log_path=log_path)
    else:
        done = _run_alongside(command, env, log_path, timeout_s, metrics_port, while_running)
    if done.code != 0 or not summary_path.exists():
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise BenchError(f"workers run exited {done.code}; log tail:\n{tail}")
    summary: dict[str, Any] = json.loads(summary_path.read_text())[MAPPING]
    return EngineRun(summary, read_spans(out_path), out_path, done.seconds)


def _run_alongside(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    metrics_port: int | None,
    action: Callable[[], None],
) -> Finished:
    import threading
    import time

    if metrics_port is None:
        raise ValueError("a background run needs a metrics port to know when it is ready")
    result: dict[str, Finished | BaseException] = {}

    def target() -> None:
        try:
            result["done"] = run_bounded(command, timeout_s=timeout_s, env=env, log_path=log_path)
        except BaseException as exc:
            result["done"] = exc

    thread = threading.Thread(target=target, name="workers-run")
    thread.start()
    deadline = time.monotonic() + 60
    while not _ready(metrics_port):
        if not thread.is_alive() or time.monotonic() > deadline:
            thread.join(timeout_s)
            raise BenchError(f"workers run never became ready; see {log_path}")
        time.sleep(0.05)
    try:
        action()
    finally:
        thread.join(timeout_s + 15)
    done = result.get("done")
    if isinstance(done, BaseException):
        raise done
    if not isinstance(done, Finished):
        raise BenchError("workers run did not finish")
    return done


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
