"""`python -m bench.scaling`: how the cost of esm-workers grows with the work, and how it scales
out on one machine. Through the real `workers run` command with the no-op handler, per broker:

1. record size (100 B, 10 KB, 1 MB) under thread and process isolation: records/s, MB/s,
   time per invocation, peak memory of the poller and its environments;
2. partitions (Kafka) or streams (Redis) per poller (1, 32, 500), same record count: records/s,
   the poller's threads and memory;
3. `parallelization_factor` 1, 4, 16 on one partition (the cost of lanes), and `pollers: 1`
   against `pollers: 2` on 8 partitions (scale-out across cores).

Every run checks that each record was handled. Writes bench/results/scaling.json, scaling.md
and scaling.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import scaling_report
from bench.common import OUT_ENV, RESULTS, BenchError, key_of, log, rate_of
from bench.engine import MAPPING, Workdir, config_for, run_workers
from bench.proctree import TreeSampler, find_process
from bench.targets import Dataset, KafkaTarget, RedisTarget, Target

BROKERS: dict[str, Callable[[], Target]] = {"kafka": KafkaTarget, "redis": RedisTarget}
POLLERS = (1, 2)
POLLER_PARTITIONS = 8
KEYS = 1000
# Records per pipeline or producer call while filling: large values go a few at a time.
FILL_BYTES = 4_000_000


@dataclass(frozen=True, slots=True)
class Plan:
    size_records: dict[int, int]  # value bytes -> records
    size_isolations: tuple[str, ...]
    partitions: tuple[int, ...]
    partition_records: int
    lanes: tuple[int, ...]
    lane_records: int
    poller_isolations: tuple[str, ...]
    poller_records: int
    poller_repeats: int = 1
    until_idle_s: float = 0.5


FULL = Plan(
    size_records={100: 100_000, 10_000: 20_000, 1_000_000: 200},
    size_isolations=("thread", "process"),
    partitions=(1, 32, 500),
    partition_records=100_000,
    lanes=(1, 4, 16),
    lane_records=100_000,
    poller_isolations=("thread", "process"),
    poller_records=300_000,
    poller_repeats=3,
)
# About a fifth of the records and half the runs: a smoke test that takes under two minutes.
QUICK = Plan(
    size_records={100: 20_000, 10_000: 4_000, 1_000_000: 50},
    size_isolations=("process",),
    partitions=(1, 500),
    partition_records=20_000,
    lanes=(1, 16),
    lane_records=20_000,
    poller_isolations=("thread",),
    poller_records=100_000,
)


@dataclass(slots=True)
class Row:
    broker: str
    section: str  # size | partitions | lanes | pollers
    label: str
    isolation: str
    records: int
    rate: float = 0.0  # records/s, the handler's first start to its last end
    mb_per_s: float = 0.0  # of record values
    ms_per_invocation: float = 0.0
    records_per_invocation: float = 0.0
    invocations: int = 0
    value_bytes: int = 0
    units: int = 1  # partitions or streams
    parallelization_factor: int = 1
    pollers: int = 1
    fill_s: float = 0.0  # creating and filling the topic or streams
    create_s: float = 0.0  # creating the topic (Kafka)
    wall_s: float = 0.0  # the whole `workers run`, start-up and group join included
    memory: dict[str, Any] = field(default_factory=dict)
    # CPU seconds per role over the measured span (widened to the sampler's ticks), window_s.
    cpu: dict[str, float] = field(default_factory=dict)
    cores: float = 0.0  # CPU of the whole `workers run` tree over the span: cores kept busy
    poller_cores: float = 0.0  # the pollers' share of it
    machine_cores: float = 0.0  # every CPU's busy time over the span: the broker, other work
    broker_cores: float = 0.0  # the broker process's (on the shared Redis, others' work too)
    records_per_cpu_s: float = 0.0  # records per second of CPU the tree used
    runs: list[float] = field(default_factory=list)  # records/s of each repeat, if repeated
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def sized_value(i: int, size: int) -> bytes:
    """A JSON object of exactly `size` bytes (at least its fixed fields, about 60)."""
    head = orjson.dumps({"id": i, "kind": "order", "amount": (i * 37) % 10_000 / 100, "note": ""})
    room = size - len(head)
    return head[:-2] + b"x" * max(0, room) + b'"}'


# --- filling topics and streams ----------------------------------------------------------------


def fill(target: Target, label: str, n: int, *, units: int, size: int) -> Dataset:
    """`n` keyed records of `size` bytes spread evenly over `units` partitions or streams."""
    started = time.monotonic()
    if isinstance(target, KafkaTarget):
        ds = _fill_kafka(target, label, n, units, size)
    else:
        ds = _fill_streams(target, label, n, units, size)
    ds.extra["fill_s"] = time.monotonic() - started
    log(
        f"{target.name}: {n:,} records of {size:,} bytes on {units} unit(s)"
        f" in {ds.extra['fill_s']:.1f}s"
    )
    ds.extra["value_bytes"] = size
    return ds


def _chunks(n: int, size: int) -> Sequence[range]:
    step = max(1, min(1000, FILL_BYTES // max(size, 1)))
    return [range(start, min(n, start + step)) for start in range(0, n, step)]


def _fill_kafka(target: KafkaTarget, label: str, n: int, partitions: int, size: int) -> Dataset:
    from confluent_kafka import Producer
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # no __all__
        AdminClient,
        NewTopic,
    )

    name = f"esm-scaling-{uuid.uuid4().hex[:8]}-{label}"
    admin = AdminClient({"bootstrap.servers": target.bootstrap})
    started = time.monotonic()
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[
        name
    ].result(timeout=60)
    _wait_leaders(admin, name, partitions)
    create_s = time.monotonic() - started
    failed: list[Any] = []
    producer = Producer(
        {
            "bootstrap.servers": target.bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 200_000,
            # librdkafka refuses records over 1,000,000 bytes by default; Tansu takes them.
            "message.max.bytes": max(1_000_000, 2 * size),
        }
    )

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(err)

    for chunk in _chunks(n, size):
        for i in chunk:
            while True:
                try:
                    producer.produce(
                        name,
                        value=sized_value(i, size),
                        key=key_of(i, KEYS),
                        partition=i % partitions,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
    left = producer.flush(120)
    if left or failed:
        raise BenchError(f"kafka: {left} records unflushed, {failed[:1]} failed to {name}")
    return Dataset(name, n, KEYS, extra={"units": [name], "create_s": create_s})


def _wait_leaders(admin: Any, name: str, partitions: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = admin.list_topics(topic=name, timeout=10).topics.get(name)
        if (
            found is not None
            and found.error is None
            and len(found.partitions) == partitions
            and all(p.leader >= 0 for p in found.partitions.values())
        ):
            return
        time.sleep(0.05)
    raise BenchError(f"topic {name}: not all {partitions} partitions have a leader")


def _fill_streams(target: Target, label: str, n: int, streams: int, size: int) -> Dataset:
    parts = [target.empty(f"{label}-{s}") for s in range(streams)]
    producers = [target.producer(ds) for ds in parts]
    for chunk in _chunks(n, size):
        by_stream: dict[int, list[tuple[bytes, bytes]]] = {}
        for i in chunk:
            by_stream.setdefault(i % streams, []).append((key_of(i, KEYS), sized_value(i, size)))
        for s, records in by_stream.items():
            producers[s].send(records)
    for producer in producers:
        producer.close()
    return Dataset(parts[0].name, n, KEYS, extra={"units": [ds.name for ds in parts]})


def release(target: Target, ds: Dataset) -> None:
    """Frees a large dataset's memory on the shared Redis now, not when the run ends."""
    if isinstance(target, RedisTarget):
        import redis

        from bench.targets import REDIS_URL

        client = redis.Redis.from_url(REDIS_URL)
        try:
            client.delete(*ds.extra["units"])
        finally:
            client.close()


def source_for(target: Target, ds: Dataset) -> dict[str, Any]:
    source = target.source(ds, f"esm-scaling-{uuid.uuid4().hex[:10]}")
    if isinstance(target, RedisTarget):
        source["streams"] = list(ds.extra["units"])
    if isinstance(target, KafkaTarget):
        # Tansu admits a member after about half the session timeout: 1 s instead of 3 s of
        # start-up per run, and two pollers still join the same generation.
        source["client_config"]["session.timeout.ms"] = 2000
        source["client_config"]["heartbeat.interval.ms"] = 500
    return source


# --- one measurement ---------------------------------------------------------------------------


class Runner:
    def __init__(self, target: Target, plan: Plan, workdir: Workdir) -> None:
        self.target = target
        self.plan = plan
        self.workdir = workdir
        # The broker shares the machine's cores: its CPU time says when it is the bottleneck.
        broker: int | None = None
        if isinstance(target, KafkaTarget):
            broker = find_process("--listener-url", f"tcp://{target.bootstrap}")
        elif isinstance(target, RedisTarget):
            broker = find_process("redis-server", ":6379")
        self.watch = {"broker": broker} if broker is not None else {}

    @property
    def broker(self) -> str:
        return self.target.name

    def measure(
        self,
        ds: Dataset,
        row: Row,
        *,
        concurrency: int = 4,
        **mapping: Any,
    ) -> Row:
        """Runs `workers run` on `ds` with the no-op handler, batch 500 and the default
        batching window, and fills `row` in; raises BenchError when a record went missing."""
        config = config_for(
            source_for(self.target, ds),
            handler="bench.handlers:noop",
            isolation=row.isolation,
            concurrency=concurrency,
            batch_size=500,
            parallelization_factor=row.parallelization_factor,
            **mapping,
        )
        entry = config["event_source_mappings"][0]
        del entry["maximum_batching_window_s"]  # the mapping's default, 0.5 s
        if row.pollers != 1:
            entry["pollers"] = row.pollers
        folder = self.workdir.next(f"{self.broker}-{row.section}-{row.label}-{row.isolation}")
        # run_workers points the handler at folder/handler.out through BENCH_OUT, which every
        # process of the run inherits: the sampler finds the tree by it.
        with TreeSampler(f"{OUT_ENV}={folder / 'handler.out'}", watch=self.watch) as sampler:
            run = run_workers(config, folder, until_idle_s=self.plan.until_idle_s)
        succeeded = int(run.summary["succeeded"])
        handled = sum(s.records for s in run.spans)
        if succeeded != ds.records or handled < ds.records:
            raise BenchError(
                f"{row.section} {row.label}: {ds.records} records produced, {succeeded}"
                f" succeeded, the handler saw {handled}"
            )
        rate, seconds, _ = rate_of(run.spans)
        invocations = int(run.summary["invocations"])
        row.records = ds.records
        row.rate = rate
        row.value_bytes = int(ds.extra["value_bytes"])
        row.mb_per_s = rate * row.value_bytes / 1e6
        row.invocations = invocations
        row.ms_per_invocation = seconds * 1000 / max(1, invocations)
        row.records_per_invocation = ds.records / max(1, invocations)
        row.fill_s = round(float(ds.extra.get("fill_s", 0.0)), 2)
        row.create_s = round(float(ds.extra.get("create_s", 0.0)), 3)
        row.wall_s = round(run.wall_s, 2)
        row.memory = sampler.tree.summary()
        first = min(s.start for s in run.spans)
        last = max(s.end for s in run.spans)
        row.cpu = {k: round(v, 3) for k, v in sampler.tree.cpu_between(first, last).items()}
        used = sum(v for k, v in row.cpu.items() if k.endswith("_cpu_s"))
        window = row.cpu.get("window_s", 0.0)
        if used > 0 and window > 0:
            row.cores = used / window
            row.poller_cores = row.cpu.get("pollers_cpu_s", 0.0) / window
            row.machine_cores = row.cpu.get("machine_s", 0.0) / window
            row.broker_cores = row.cpu.get("broker_s", 0.0) / window
            row.records_per_cpu_s = ds.records / used
        log(
            f"{self.broker} {row.section} {row.label} {row.isolation}: {rate:,.0f} records/s,"
            f" {row.cores:.2f} cores ({row.poller_cores:.2f} pollers) + broker"
            f" {row.broker_cores:.2f} of {row.machine_cores:.2f} busy,"
            f" {row.records_per_cpu_s:,.0f} records/CPU-s,"
            f" poller {row.memory['poller_hwm_mb']} MB / {row.memory['poller_threads']} threads,"
            f" {row.memory['environments']} environment(s)"
        )
        return row

    def attempt(self, ds: Dataset, row: Row, **options: Any) -> Row:
        """`measure`, once more after a failure (the brokers are shared), then a row that says
        why it failed."""
        for attempt in (1, 2):
            try:
                return self.measure(ds, row, **options)
            except BenchError as exc:
                if attempt == 1:
                    log(f"{self.broker} {row.section} {row.label}: failed; once more")
                    continue
                log(f"{self.broker} {row.section} {row.label}: FAILED: {exc}")
                row.error = str(exc)[:300]
        return row

    # --- the sections ----------------------------------------------------------------------

    def sizes(self) -> list[Row]:
        rows = []
        for size, n in self.plan.size_records.items():
            ds = fill(self.target, f"size{size}", n, units=1, size=size)
            try:
                for isolation in self.plan.size_isolations:
                    row = Row(self.broker, "size", _bytes(size), isolation, n, value_bytes=size)
                    rows.append(self.attempt(ds, row))
            finally:
                release(self.target, ds)
        return rows

    def partitions(self) -> list[Row]:
        rows = []
        n = self.plan.partition_records
        for units in self.plan.partitions:
            ds = fill(self.target, f"units{units}", n, units=units, size=100)
            try:
                row = Row(self.broker, "partitions", str(units), "process", n, units=units)
                rows.append(self.attempt(ds, row))
            finally:
                release(self.target, ds)
        return rows

    def lanes(self) -> list[Row]:
        rows = []
        n = self.plan.lane_records
        ds = fill(self.target, "lanes", n, units=1, size=100)
        try:
            for pf in self.plan.lanes:
                row = Row(self.broker, "lanes", f"pf={pf}", "process", n, parallelization_factor=pf)
                rows.append(self.attempt(ds, row, concurrency=pf))
        finally:
            release(self.target, ds)
        return rows

    def pollers(self) -> list[Row]:
        """1 and 2 pollers, interleaved `poller_repeats` times: the machine's other load comes
        and goes, and falls on both alike. Each kept row is the run of median rate."""
        n = self.plan.poller_records
        runs: dict[tuple[str, int], list[Row]] = {}
        ds = fill(self.target, "pollers", n, units=POLLER_PARTITIONS, size=100)
        try:
            for _ in range(self.plan.poller_repeats):
                for isolation in self.plan.poller_isolations:
                    for count in POLLERS:
                        row = Row(
                            self.broker,
                            "pollers",
                            f"pollers={count}",
                            isolation,
                            n,
                            units=POLLER_PARTITIONS,
                            pollers=count,
                        )
                        runs.setdefault((isolation, count), []).append(self.attempt(ds, row))
        finally:
            release(self.target, ds)
        return [_median_row(group) for group in runs.values()]


def _median_row(group: list[Row]) -> Row:
    done = sorted((r for r in group if not r.error), key=lambda r: r.rate)
    if not done:
        return group[-1]
    kept = done[(len(done) - 1) // 2]
    kept.runs = [round(r.rate) for r in group if not r.error]
    return kept


def _bytes(size: int) -> str:
    if size >= 1_000_000:
        return f"{size // 1_000_000} MB"
    if size >= 1000:
        return f"{size // 1000} KB"
    return f"{size} B"


# --- the command -------------------------------------------------------------------------------

SECTIONS = ("size", "partitions", "lanes", "pollers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description=(
            "How throughput, threads and memory of esm-workers grow with record size,"
            " partitions per poller and parallelization_factor, and pollers 1 against 2."
            " Writes bench/results/scaling.json, scaling.md and scaling.png."
        ),
    )
    parser.add_argument(
        "--brokers", default="kafka,redis", help="comma-separated: kafka, redis (default: both)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer records and runs (process isolation for sizes, partitions 1 and 500,"
        " parallelization_factor 1 and 16, thread isolation for pollers): a smoke test",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="results directory (default: bench/results)"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the configs, handler outputs and logs"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [b for b in brokers if b not in BROKERS] + [s for s in only if s not in SECTIONS]
    if unknown or not brokers or not only:
        print(f"error: unknown broker(s) or section(s): {unknown}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    clock = time.monotonic()
    workdir = Workdir()
    rows: list[Row] = []
    errors: list[str] = []
    try:
        for broker in brokers:
            target = BROKERS[broker]()
            try:
                target.setup()
            except Exception as exc:
                errors.append(f"{broker}: cannot set up: {exc!r}")
                log(f"{broker}: cannot set up: {exc!r}")
                continue
            runner = Runner(target, plan, workdir)
            steps = {
                "size": runner.sizes,
                "partitions": runner.partitions,
                "lanes": runner.lanes,
                "pollers": runner.pollers,
            }
            try:
                for section in only:
                    began = time.monotonic()
                    try:
                        rows += steps[section]()
                    except BenchError as exc:  # the data could not be written
                        errors.append(f"{broker} {section}: {exc}")
                        log(f"{broker} {section}: FAILED: {exc}")
                    log(f"{broker} {section}: {time.monotonic() - began:.1f}s")
            finally:
                target.close()
    finally:
        if args.keep_workdir:
            log(f"work directory kept: {workdir.path}")
        else:
            workdir.cleanup()
    errors += [
        f"{r.broker} {r.section} {r.label} {r.isolation}: {r.error}" for r in rows if r.error
    ]
    run: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(time.monotonic() - clock, 1),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "brokers": brokers,
            "sections": only,
            "quick": args.quick,
            "plan": asdict(plan),
            "mapping": f"{MAPPING}: batch_size 500, maximum_batching_window_s default (0.5 s),"
            " no-op handler (bench.handlers:noop), concurrency 4 unless said",
        },
        "rows": [r.as_json() for r in rows],
        "errors": errors,
    }
    paths = scaling_report.write(run, args.output)
    print(scaling_report.markdown(run))
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
