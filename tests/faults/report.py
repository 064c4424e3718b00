"""The reliability table: `python -m tests.faults.report [PATH]` reads the fault suite's results
(default var/faults/results.jsonl, see results.py) and prints a Markdown table of scenario x
broker -> produced, handled, dead-lettered, lost, duplicates and recovery time, from the latest
result of each scenario on each broker (the file only grows, one line per passing run)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from tests.faults.results import results_path

BROKERS = {
    "kafka": "Kafka (Tansu)",
    "redis": "Redis",
    "rabbitmq": "RabbitMQ",
    "sqs": "SQS (moto)",
}
COLUMNS = (
    "scenario",
    "broker",
    "produced",
    "handled",
    "dead-lettered",
    "lost",
    "duplicates",
    "recovery",
)


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every result in `path`, oldest first; lines that are not JSON objects are skipped."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            result = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(result, dict) and "scenario" in result and "broker" in result:
            out.append(result)
    return out


def latest(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last result of each (scenario, broker), ordered by scenario then broker."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        last[(str(result["scenario"]), str(result["broker"]))] = result
    order = list(BROKERS)

    def key(item: tuple[tuple[str, str], dict[str, Any]]) -> tuple[str, int, str]:
        scenario, broker = item[0]
        return (scenario, order.index(broker) if broker in order else len(order), broker)

    return [result for _, result in sorted(last.items(), key=key)]


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} s"


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(COLUMNS) - 2),
    ]
    for r in results:
        broker = str(r["broker"])
        cells = [
            str(r["scenario"]),
            BROKERS.get(broker, broker),
            _count(r.get("produced")),
            _count(r.get("handled")),
            _count(r.get("dead_lettered")),
            _count(r.get("lost")),
            _count(r.get("duplicates")),
            _seconds(r.get("recovery_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report", description=__doc__)
    parser.add_argument(
        "path", nargs="?", type=Path, help=f"results file (default {results_path()})"
    )
    args = parser.parse_args(argv)
    path: Path = args.path or results_path()
    if not path.exists():
        print(f"{path}: no results yet; run `make test-faults` first", file=sys.stderr)
        return 1
    results = latest(read_results(path))
    if not results:
        print(f"{path}: holds no results", file=sys.stderr)
        return 1
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
