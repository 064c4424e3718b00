"""Shared pieces of the benchmark: record payloads, timing files, bounded subprocesses, medians."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from workers.engine.ports import prefetch_window

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The measurements of `python -m bench --only` (bench/README.md says what each one is).
MEASUREMENTS = ("raw", "engine", "faststream", "parallel", "latency", "bisect")

# Environment variable naming the file a benchmark handler appends its timings to.
OUT_ENV = "BENCH_OUT"

VALUE_BYTES = 200

# The raw loops' and peers' batch, as the engine's mappings in the bench use it.
BATCH = 500
# The window esm-workers gives a queue mapping of this batch size by default (2,000): the same
# for every reader of a queue, since it decides how much the broker can send ahead.
PREFETCH = prefetch_window(BATCH, 1)
_PAD = "x" * VALUE_BYTES


def key_of(i: int, keys: int) -> bytes:
    return b"k-%05d" % (i % keys)


def value_of(i: int, *, stamp: float = 0.0, poison: bool = False, warm: bool = False) -> bytes:
    """A JSON object of about VALUE_BYTES bytes; `ts` is the producer's wall clock."""
    doc: dict[str, Any] = {
        "id": i,
        "kind": "order",
        "customer": f"c-{i % 997:04d}",
        "amount": (i * 37) % 10_000 / 100,
        "ts": stamp,
        "poison": poison,
        "warm": warm,
        "note": "",
    }
    room = VALUE_BYTES - len(orjson.dumps(doc))
    doc["note"] = _PAD[: max(0, room)]
    return orjson.dumps(doc)


@dataclass(frozen=True, slots=True)
class Span:
    """Timings one handler invocation (or one raw batch) wrote: wall-clock start and end."""

    start: float
    end: float
    records: int


def read_spans(path: Path) -> list[Span]:
    """The `start end records` lines a benchmark handler appended to `path`."""
    spans: list[Span] = []
    if not path.exists():
        return spans
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] != "L":
            spans.append(Span(float(parts[0]), float(parts[1]), int(parts[2])))
    return spans


def read_latencies(path: Path) -> list[tuple[float, float]]:
    """(producer stamp, handler start - stamp in ms) pairs from `L` lines."""
    out: list[tuple[float, float]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.startswith("L "):
            for pair in line[2:].split():
                stamp, latency = pair.split(",")
                out.append((float(stamp), float(latency)))
    return out


def rate_of(spans: Sequence[Span]) -> tuple[float, float, int]:
    """(records/s, seconds, records) from the first start to the last end."""
    if not spans:
        return 0.0, 0.0, 0
    first = min(s.start for s in spans)
    last = max(s.end for s in spans)
    records = sum(s.records for s in spans)
    seconds = max(last - first, 1e-9)
    return records / seconds, seconds, records


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


class BenchError(RuntimeError):
    """A measurement that could not be taken (timeout, wrong count, crashed subprocess)."""


@dataclass(slots=True)
class Finished:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_bounded(
    command: Sequence[str],
    *,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    log_path: Path | None = None,
) -> Finished:
    """Run `command` in its own process group; SIGTERM, then SIGKILL, the group past timeout_s.

    Standard error goes to `log_path` when given (it can be long), else it is captured.
    """
    started = time.monotonic()
    stderr_file = log_path.open("wb") if log_path is not None else None
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_file if stderr_file is not None else subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(process)
        out, err = process.communicate()
        raise BenchError(
            f"{' '.join(command[:4])}... did not finish within {timeout_s:.0f}s"
            + (f" (log: {log_path})" if log_path else f": {(err or b'').decode()[-1500:]}")
        ) from None
    finally:
        if stderr_file is not None:
            stderr_file.close()
    return Finished(
        process.returncode,
        (out or b"").decode(errors="replace"),
        (err or b"").decode(errors="replace"),
        time.monotonic() - started,
    )


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def run_module(module: str, spec: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """Run `python -m module SPEC_JSON` and return the JSON object it prints last."""
    done = run_bounded([sys.executable, "-m", module, json.dumps(spec)], timeout_s=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.code != 0 or not lines:
        raise BenchError(
            f"{module} exited {done.code}: {done.stderr.strip()[-1500:] or done.stdout[-500:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        log(f"{label}: {time.monotonic() - started:.1f}s")
