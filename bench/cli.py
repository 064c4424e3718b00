"""`python -m bench`: measure each broker's raw client loop, esm-workers and FastStream in the
same run, plus key-ordered concurrency, latency and the cost of bisect; write bench/results/."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.common import RESULTS, log
from bench.engine import Workdir
from bench.scenarios import SCENARIOS, Row, Settings, Suite
from bench.targets import TARGETS

# Sized so that the whole suite takes about 5-10 minutes on a 2-core machine. moto's cost per
# SQS message grows with the queue's depth, so its queues stay small (bench/README.md).
DEFAULT_RECORDS = {
    "kafka": 200_000,
    "redis": 100_000,
    "rabbitmq": 50_000,
    "kombu": 20_000,
    "sqs": 500,
}
DEFAULT_BROKERS = ("kafka", "redis", "rabbitmq", "sqs", "kombu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark esm-workers against the raw client loop of each broker and against"
            " FastStream. Writes bench/results/run-*.json, latest.json, latest.md, latest.png."
        ),
    )
    parser.add_argument(
        "--brokers",
        default=",".join(DEFAULT_BROKERS),
        help=f"comma-separated: {', '.join(TARGETS)} (default: {', '.join(DEFAULT_BROKERS)})",
    )
    parser.add_argument(
        "--records",
        type=int,
        help="records per throughput run, for every broker (default: "
        + ", ".join(f"{b} {n:,}" for b, n in DEFAULT_RECORDS.items())
        + ")",
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated measurements to run: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, help="runs per measurement, median kept (3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "a fifth of the records (at least 1,000, or the default when smaller), one run each,"
            " 3 s of latency: a smoke test, not a result"
        ),
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="results directory (default: bench/results)"
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary configs, handler outputs and logs",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in TARGETS]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    bad = only - set(SCENARIOS)
    if unknown or bad or not brokers or not only:
        print(
            f"error: unknown broker(s) {unknown} or measurement(s) {sorted(bad)}", file=sys.stderr
        )
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    started = datetime.now(UTC)
    clock = time.monotonic()
    workdir = Workdir()
    rows: list[Row] = []
    errors: list[str] = []
    skipped: list[str] = []
    records: dict[str, int] = {}
    try:
        for broker in brokers:
            n = args.records or DEFAULT_RECORDS[broker]
            if args.quick:
                n = max(min(n, 1000), n // 5)
            records[broker] = n
            settings = Settings(
                records=n,
                repeats=repeats,
                parallel_records=1000 if args.quick else 2000,
                latency_s=3.0 if args.quick else 10.0,
            )
            target = TARGETS[broker]()
            log(f"{broker}: {n:,} records, {repeats} run(s) per measurement")
            try:
                target.setup()
            except Exception as exc:
                errors.append(f"{broker}: cannot set up: {exc!r}")
                log(f"{broker}: cannot set up: {exc!r}")
                continue
            try:
                suite = Suite(target, settings, workdir, only)
                rows += suite.run()
                errors += suite.errors
                skipped += suite.skipped
            finally:
                target.close()
    finally:
        if args.keep_workdir:
            log(f"work directory kept: {workdir.path}")
        else:
            workdir.cleanup()
    run: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(time.monotonic() - clock, 1),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": _versions(),
        },
        "settings": {
            "brokers": brokers,
            "records": records,
            "repeats": repeats,
            "only": sorted(only),
            "quick": args.quick,
        },
        "rows": [r.as_json() for r in rows],
        "errors": errors,
        "skipped": skipped,
    }
    paths = report.write(run, args.output)
    print(report.table(run["rows"]))
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 1 if errors else 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "esm-workers",
        "confluent-kafka",
        "redis",
        "pika",
        "kombu",
        "boto3",
        "moto",
        "faststream",
        "orjson",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
