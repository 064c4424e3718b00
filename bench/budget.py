"""Where a record's cost goes: CPU time per record, by process, for the raw client loop and for
`workers run` (both isolations) on Kafka, Redis and RabbitMQ, and the rate those costs allow on
this machine's cores.

    python -m bench.budget [--brokers kafka,redis,rabbitmq] [--repeats 2] [--scale 1.0]

Every process of a run, the broker's included, shares the machine's cores; when they are all
busy, throughput is the cores divided by the CPU time a record costs in all of them. The raw loop
spends its CPU in one process (and the broker); `workers run` spends it in the poller, the
execution environment and the broker. Runs are longer than `python -m bench`'s (seconds, not
fractions of one) so that /proc's 10 ms ticks measure them well, and interleaved like its runs.
Writes results/budget.json and results/budget.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import OUT_ENV, BenchError, log, median, rate_of, run_bounded
from bench.engine import Workdir, config_for, run_workers
from bench.proctree import TreeSampler, find_process
from bench.targets import KafkaTarget, RabbitMQTarget, RedisTarget, Target

RESULTS = Path(__file__).parent / "results"
# Records per run: a few seconds of the raw loop on the 2-core development machine.
RECORDS = {"kafka": 2_000_000, "redis": 600_000, "rabbitmq": 150_000}
KINDS = ("raw", "thread", "process")
ROLES = ("client", "environments", "broker")


def _target(name: str) -> Target:
    if name == "kafka":
        return KafkaTarget()
    return RedisTarget() if name == "redis" else RabbitMQTarget()


def _broker_pid(target: Target) -> int | None:
    if isinstance(target, KafkaTarget):
        return find_process("--listener-url", f"tcp://{target.bootstrap}")
    if isinstance(target, RedisTarget):
        return find_process("redis-server", ":6379")
    return find_process("beam.smp")


def measure(target: Target, kind: str, records: int, workdir: Workdir) -> dict[str, Any]:
    """One run of `kind` on a freshly filled dataset: records/s and CPU µs per record by role."""
    ds = target.dataset("budget", records, keys=1000)  # filled once where reading keeps it
    group = f"esm-budget-{uuid.uuid4().hex[:8]}"
    folder = workdir.next(f"{target.name}-{kind}")
    marker = f"{OUT_ENV}={folder / 'handler.out'}"
    broker = _broker_pid(target)
    watch = {"broker": broker} if broker is not None else {}
    try:
        with TreeSampler(marker, interval_s=0.05, watch=watch) as sampler:
            if kind == "raw":
                done = run_bounded(
                    [sys.executable, "-m", "bench.raw", json.dumps(target.client_spec(ds, group))],
                    timeout_s=300,
                    env={OUT_ENV: str(folder / "handler.out")},
                )
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.code != 0 or not lines:
                    raise BenchError(f"bench.raw exited {done.code}: {done.stderr[-1500:]}")
                result = json.loads(lines[-1])
                if result["records"] != records:
                    raise BenchError(f"raw read {result['records']}/{records} records")
                first, last = float(result["first"]), float(result["last"])
                rate = records / (last - first)
            else:
                config = config_for(
                    target.source(ds, group), handler="bench.handlers:noop", isolation=kind
                )
                run = run_workers(config, folder, timeout_s=300)
                if int(run.summary["succeeded"]) != records:
                    raise BenchError(f"{kind}: {run.summary['succeeded']}/{records} succeeded")
                rate, _, _ = rate_of(run.spans)
                first = min(s.start for s in run.spans)
                last = max(s.end for s in run.spans)
    finally:
        target.release(ds)
    return {
        "rate": rate,
        **per_record(sampler.tree.cpu_between(first, last), records, last - first),
    }


def per_record(cpu: dict[str, float], records: int, seconds: float) -> dict[str, Any]:
    """CPU µs per record by role, from `Tree.cpu_between` over a run that read `records` in
    `seconds`. The sampled window is wider than the run by up to a sampling interval at each
    end, and the records counted are those of the window's share of the run."""
    window = cpu.get("window_s", 0.0)
    n = records * min(1.0, window / max(seconds, 1e-9)) if window else records
    per = {
        "client": cpu.get("supervisor_cpu_s", 0.0) + cpu.get("pollers_cpu_s", 0.0),
        "environments": cpu.get("environments_cpu_s", 0.0),
        "broker": cpu.get("broker_s", 0.0),
    }
    us = {role: round(used / n * 1e6, 3) for role, used in per.items()}
    us["total"] = round(sum(us[r] for r in ROLES), 3)
    return {
        "us_per_record": us,
        "machine_cores": round(cpu.get("machine_s", 0.0) / window, 2) if window else None,
        "window_s": round(window, 2),
    }


def run_broker(name: str, repeats: int, scale: float, workdir: Workdir) -> dict[str, Any]:
    target = _target(name)
    target.setup()
    records = max(10_000, int(RECORDS[name] * scale))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    try:
        for repeat in range(repeats):
            for kind in KINDS:
                got = measure(target, kind, records, workdir)
                runs[kind].append(got)
                us = got["us_per_record"]
                log(
                    f"{name} {kind} #{repeat + 1}: {got['rate']:,.0f} records/s; µs/record"
                    f" client {us['client']}, environments {us['environments']},"
                    f" broker {us['broker']}"
                )
    finally:
        target.close()
    out: dict[str, Any] = {"records": records, "runs": runs, "median": {}}
    for kind, kept in runs.items():
        out["median"][kind] = {
            "rate": median([g["rate"] for g in kept]),
            "us_per_record": {
                role: median([g["us_per_record"][role] for g in kept]) for role in (*ROLES, "total")
            },
            "machine_cores": median([g["machine_cores"] or 0.0 for g in kept]),
        }
    return out


def render(results: dict[str, Any]) -> str:
    cores = results["cpus"]
    lines = [
        f"# CPU per record, {results['started']}",
        "",
        f"{cores} CPUs, Python {results['python']}. `python -m bench.budget`: medians of"
        f" {results['repeats']} interleaved runs per row. µs of CPU time per record, from /proc,"
        " over the span from the first record's arrival to the last checkpoint (raw loop) or"
        " from the first invocation's start to the last one's end (`workers run`, no-op handler,"
        " batch 500). Client: the raw loop's process, or the supervisor and poller of"
        " `workers run`; environments: its execution environments (process isolation). The"
        f" broker runs on the same {cores} cores. Allowed: the rate at which the records' total"
        f" CPU would fill all {cores} cores.",
        "",
        "| broker | run | records/s | ratio to raw | client | environments | broker | total"
        " | allowed by the cores | cores busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, got in results["brokers"].items():
        raw = got["median"]["raw"]["rate"]
        for kind in KINDS:
            m = got["median"][kind]
            us = m["us_per_record"]
            allowed = cores / us["total"] * 1e6 if us["total"] else 0
            label = {"raw": "raw client loop"}.get(kind, f"esm-workers ({kind})")
            env = f"{us['environments']:.2f}" if kind == "process" else "—"
            lines.append(
                f"| {name} | {label} | {m['rate']:,.0f} | {m['rate'] / raw:.2f} |"
                f" {us['client']:.2f} | {env} | {us['broker']:.2f} | {us['total']:.2f} |"
                f" {allowed:,.0f} | {m['machine_cores']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__)
    parser.add_argument("--brokers", default="kafka,redis,rabbitmq")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the records")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in names if b not in RECORDS]
    if unknown:
        parser.error(f"unknown broker(s): {', '.join(unknown)} (kafka, redis, rabbitmq)")
    workdir = Workdir()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "brokers": {},
    }
    try:
        for name in names:
            results["brokers"][name] = run_broker(name, args.repeats, args.scale, workdir)
    finally:
        workdir.cleanup()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "budget.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "budget.md").write_text(render(results))
    log(f"wrote {args.output / 'budget.md'}")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
