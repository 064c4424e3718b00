"""The six measurements, per broker. Every measurement returns `Row`s; throughput repeats are
interleaved (raw, thread, process, FastStream, raw, ...) so that the machine's noise falls on
all of them alike, and each row reports the median of its repeats."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import (
    MEASUREMENTS,
    BenchError,
    log,
    median,
    percentile,
    rate_of,
    read_latencies,
    run_module,
    value_of,
)
from bench.engine import EngineRun, Workdir, config_for, free_port, run_workers
from bench.targets import Dataset, Target

SCENARIOS = MEASUREMENTS
# Brokers whose raw loop can also build Lambda's event (the second ceiling row).
RAW_EVENT_BROKERS = ("kafka", "redis", "rabbitmq")
PF_VALUES = (1, 8, 32)


@dataclass(slots=True)
class Row:
    broker: str
    measurement: str
    rate: float | None = None  # records/s (median of the runs)
    ratio: float | None = None  # to the raw client loop of the same broker, same run
    runs: list[float] = field(default_factory=list)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Settings:
    records: int
    repeats: int = 3
    parallel_records: int = 2000
    parallel_keys: int = 1000
    latency_rate: int = 1000
    latency_s: float = 10.0
    bisect_records: int = 1000


def _group() -> str:
    return f"esm-bench-{uuid.uuid4().hex[:10]}"


class Suite:
    """Runs the chosen measurements for one broker."""

    def __init__(
        self, target: Target, settings: Settings, workdir: Workdir, only: set[str]
    ) -> None:
        self.target = target
        self.s = settings
        self.workdir = workdir
        skipped = sorted(only & set(target.not_measured))
        self.only = only - set(skipped)
        self.rows: list[Row] = []
        self.errors: list[str] = []
        # "broker measurement: why", for what was asked for and this broker does not take.
        self.skipped = [f"{self.broker} {m}: {target.not_measured[m]}" for m in skipped]

    @property
    def broker(self) -> str:
        return self.target.name

    def run(self) -> list[Row]:
        for line in self.skipped:
            log(f"skipped: {line}")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("throughput", self.throughput),
            ("parallel", self.parallel),
            ("latency", self.latency),
            ("bisect", self.bisect),
        ]
        for name, step in steps:
            wanted = {"raw", "engine", "faststream"} if name == "throughput" else {name}
            if not wanted & self.only:
                continue
            started = time.monotonic()
            # Once more after a failure: the brokers are shared, and other people's tests
            # restart them (a RabbitMQ stop_app drops non-durable queues).
            for attempt in (1, 2):
                try:
                    step()
                    break
                except BenchError as exc:
                    if attempt == 1:
                        log(f"{self.broker} {name}: failed ({str(exc)[:200]}); once more")
                        continue
                    log(f"{self.broker} {name}: FAILED: {exc}")
                    self.errors.append(f"{self.broker} {name}: {exc}")
                    self.rows.append(Row(self.broker, name, notes=f"failed: {str(exc)[:120]}"))
            log(f"{self.broker} {name}: {time.monotonic() - started:.1f}s")
        return self.rows

    # --- 1-3: throughput ---------------------------------------------------------------------

    def throughput(self) -> None:
        n = self.s.records
        kinds = [
            k
            for k, wanted in (
                ("raw", "raw"),
                ("raw-event", "raw"),
                ("engine-thread", "engine"),
                ("engine-process", "engine"),
                ("faststream", "faststream"),
            )
            if wanted in self.only and (k != "raw-event" or self.broker in RAW_EVENT_BROKERS)
        ]
        runs: dict[str, list[float]] = {k: [] for k in kinds}
        extra: dict[str, dict[str, Any]] = {k: {} for k in kinds}
        for repeat in range(self.s.repeats):
            for kind in kinds:
                ds = self.target.dataset("tput", n, keys=1000)
                try:
                    rate, info = self._throughput_once(kind, ds)
                finally:
                    if ds.single_use:
                        self.target.release(ds)
                runs[kind].append(rate)
                extra[kind].setdefault("per_run", []).append(info)
                log(f"{self.broker} {kind} #{repeat + 1}: {rate:,.0f} records/s")
        raw = median(runs["raw"]) if "raw" in runs else None
        # Said on every row: the server's own cost is most of what is measured.
        moto = "; moto's server, not AWS" if self.broker == "sqs" else ""
        notes = {
            "raw": self._raw_note(),
            "raw-event": (
                "the raw loop, plus Lambda's event built for each batch (a dict per record,"
                " base64 payloads) and a no-op function called with it, in one process"
            ),
            "engine-thread": f"workers run, no-op handler, isolation: thread, batch 500{moto}",
            "engine-process": f"workers run, no-op handler, isolation: process, batch 500{moto}",
            "faststream": self._faststream_note(),
        }
        for kind in kinds:
            rate = median(runs[kind])
            self.rows.append(
                Row(
                    self.broker,
                    kind,
                    rate=rate,
                    ratio=rate / raw if raw else None,
                    runs=runs[kind],
                    notes=notes[kind],
                    extra=extra[kind],
                )
            )

    def _raw_note(self) -> str:
        return {
            "kafka": "confluent-kafka consume(500) + orjson + async commit",
            "redis": "redis-py XREADGROUP COUNT 500 + orjson + XACK",
            "rabbitmq": "pika basic_consume, prefetch 2000, orjson, multiple-ack per 500",
            "kombu": "kombu Consumer on RabbitMQ, prefetch 2000, orjson, multiple-ack per 500",
            "sqs": (
                "boto3 ReceiveMessage (10, wait 1 s, all attributes) + orjson +"
                " DeleteMessageBatch per receive; moto's server, not AWS"
            ),
        }[self.broker]

    def _faststream_note(self) -> str:
        return {
            "kafka": "FastStream (aiokafka) batch=True, max_records 500, commit per batch",
            "redis": "FastStream StreamSub batch=True, max_records 500, XACK",
            "rabbitmq": "FastStream (aio-pika) one message at a time, ack each, prefetch 2000",
        }.get(self.broker, "")

    def _throughput_once(self, kind: str, ds: Dataset) -> tuple[float, dict[str, Any]]:
        group = _group()
        if kind in ("raw", "raw-event", "faststream"):
            module = "bench.peers" if kind == "faststream" else "bench.raw"
            spec = {**self.target.client_spec(ds, group), "event": kind == "raw-event"}
            result = run_module(module, spec, timeout_s=180)
            if result["records"] != ds.records:
                raise BenchError(f"{kind} read {result['records']}/{ds.records} records")
            seconds = result["last"] - result["first"]
            return ds.records / seconds, {"seconds": round(seconds, 4)}
        isolation = kind.split("-", 1)[1]
        config = config_for(
            self.target.source(ds, group),
            handler="bench.handlers:noop",
            isolation=isolation,
            batch_size=500,
            maximum_batching_window_s=0.05,
        )
        run = run_workers(config, self.workdir.next(f"{self.broker}-{kind}"))
        self._check_all(run, ds.records)
        rate, seconds, _ = rate_of(run.spans)
        return rate, {
            "seconds": round(seconds, 4),
            "invocations": run.summary["invocations"],
            "wall_s": round(run.wall_s, 2),
        }

    def _check_all(self, run: EngineRun, expected: int) -> None:
        succeeded = run.summary["succeeded"]
        handled = sum(s.records for s in run.spans)
        if succeeded != expected or handled < expected:
            raise BenchError(
                f"expected {expected} records, summary says {succeeded} succeeded, the handler"
                f" saw {handled}"
            )

    # --- 4: key-ordered concurrency ------------------------------------------------------------

    def parallel(self) -> None:
        n = self.s.parallel_records
        runs: dict[int, list[float]] = {pf: [] for pf in PF_VALUES}
        for repeat in range(self.s.repeats):
            for pf in PF_VALUES:
                ds = self.target.dataset("keyed", n, keys=self.s.parallel_keys)
                try:
                    config = config_for(
                        self.target.source(ds, _group()),
                        handler="bench.handlers:io_bound",
                        isolation="thread",
                        concurrency=max(PF_VALUES),
                        batch_size=100,
                        maximum_batching_window_s=0.05,
                        parallelization_factor=pf,
                    )
                    run = run_workers(config, self.workdir.next(f"{self.broker}-pf{pf}"))
                finally:
                    if ds.single_use:
                        self.target.release(ds)
                self._check_all(run, n)
                rate, _, _ = rate_of(run.spans)
                runs[pf].append(rate)
                log(f"{self.broker} pf={pf} #{repeat + 1}: {rate:,.0f} records/s")
        base = median(runs[1])
        spread = (
            f"{self.s.parallel_keys} keys"
            if self.target.ordered
            else "lanes round-robin (unordered queue)"
        )
        for pf in PF_VALUES:
            rate = median(runs[pf])
            self.rows.append(
                Row(
                    self.broker,
                    f"io-bound pf={pf}",
                    rate=rate,
                    runs=runs[pf],
                    notes=(
                        f"2 ms/record handler, {n} records on one unit, {spread}, batch 100,"
                        " thread isolation;"
                        f" {rate / base:.1f}x pf=1, ideal {1000 / 2 * pf:,.0f}/s"
                    ),
                    extra={"speedup": rate / base if base else None},
                )
            )

    # --- 5: end-to-end latency -----------------------------------------------------------------

    def latency(self) -> None:
        ds = self.target.empty("latency")
        port = free_port()
        config = config_for(
            self.target.source(ds, _group()),
            handler="bench.handlers:latency",
            isolation="process",
            batch_size=500,
            maximum_batching_window_s=0,
        )
        sent: list[int] = [0]

        def produce() -> None:
            sent[0] = self._produce_steadily(ds)

        try:
            run = run_workers(
                config,
                self.workdir.next(f"{self.broker}-latency"),
                until_idle_s=2.0,
                metrics_port=port,
                while_running=produce,
            )
        finally:
            self.target.release(ds)
        self._check_all(run, sent[0])
        samples = [ms for _, ms in read_latencies(run.out_path)]
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        self.rows.append(
            Row(
                self.broker,
                "latency",
                rate=float(self.s.latency_rate),
                notes=(
                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(samples):.1f} ms: produce to"
                    f" handler start at {self.s.latency_rate}/s for {self.s.latency_s:.0f} s,"
                    " maximum_batching_window_s 0, isolation: process"
                ),
                extra={
                    "p50_ms": p50,
                    "p90_ms": percentile(samples, 90),
                    "p99_ms": p99,
                    "max_ms": max(samples),
                    "samples": len(samples),
                    "invocations": run.summary["invocations"],
                },
            )
        )
        log(f"{self.broker} latency: p50 {p50:.1f} ms p99 {p99:.1f} ms ({len(samples)} samples)")

    def _produce_steadily(self, ds: Dataset) -> int:
        return produce_steadily(self.target, ds, self.s.latency_rate, self.s.latency_s)

    # --- 6: the cost of bisect -----------------------------------------------------------------

    def bisect(self) -> None:
        n = self.s.bisect_records
        poison_at = n // 2 + 17
        results: dict[str, list[EngineRun]] = {"clean": [], "poison": []}
        for _ in range(self.s.repeats):
            for kind in ("clean", "poison"):
                at = poison_at if kind == "poison" else -1

                def values(i: int, at: int = at) -> bytes:
                    return value_of(i, poison=i == at)

                ds = self.target.dataset(f"bisect-{kind}", n, keys=100, values=values)
                folder = self.workdir.next(f"{self.broker}-bisect-{kind}")
                dlq = folder / "dead-letters"
                config = config_for(
                    self.target.source(ds, _group()),
                    handler="bench.handlers:poison",
                    isolation="process",
                    batch_size=n,
                    maximum_batching_window_s=1.0,
                    bisect_batch_on_function_error=True,
                    maximum_retry_attempts=2,
                    destination_config={"on_failure": {"type": "file", "path": str(dlq)}},
                )
                try:
                    run = run_workers(config, folder)
                finally:
                    self.target.release(ds)
                done = run.summary["succeeded"] + run.summary["dead_lettered"]
                if done != n:
                    raise BenchError(f"bisect {kind}: {done}/{n} records settled")
                results[kind].append(run)
        for kind, runs in results.items():
            walls = [rate_of(r.spans)[1] for r in runs]
            backoffs = [_retry_backoff(r) for r in runs]
            wall, backoff = median(walls), median(backoffs)
            last = runs[-1].summary
            note = (
                f"{last['invocations']} invocation(s) handling {last['invoked']} records,"
                f" {last['bisected']} splits, {last['dead_lettered']} dead-lettered;"
                f" {wall * 1000:.0f} ms from the first invocation's start to the last one's end"
            )
            if kind == "poison":
                note += (
                    f": {(wall - backoff) * 1000:.0f} ms bisecting, {backoff * 1000:.0f} ms of"
                    " retry backoff before the 2 retries of the poison record (0.5 s base,"
                    " full jitter); bisect on, maximum_retry_attempts 2"
                )
            else:
                note += " (the handler's own time: one invocation)"
            self.rows.append(
                Row(
                    self.broker,
                    f"bisect {kind} batch of {n}",
                    notes=note,
                    extra={
                        "invocations": last["invocations"],
                        "invoked_records": last["invoked"],
                        "bisected": last["bisected"],
                        "dead_lettered": last["dead_lettered"],
                        "wall_s": walls,
                        "retry_backoff_s": backoffs,
                        "first_batch_records": runs[-1].spans[0].records if runs[-1].spans else 0,
                    },
                )
            )


def _retry_backoff(run: EngineRun) -> float:
    """Seconds spent waiting before retries: bisect ends on the poison record alone, and every
    later single-record invocation is a retry of it."""
    spans = sorted(run.spans, key=lambda sp: sp.start)
    singles = [i for i, sp in enumerate(spans) if sp.records == 1]
    return sum(max(0.0, spans[i].start - spans[i - 1].end) for i in singles[1:])


def produce_steadily(target: Target, ds: Dataset, rate: int, seconds: float) -> int:
    """One second of warm-up records, then `rate` records/s for `seconds`, in 10 ms ticks; each
    value carries its producer's wall clock. Returns how many records were sent."""
    producer = target.producer(ds)
    per_tick = max(1, rate // 100)
    ticks = int((1.0 + seconds) * 100)
    warm_ticks = 100
    sent = 0
    start = time.monotonic()
    try:
        for tick in range(ticks):
            delay = start + tick * 0.01 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            warm = tick < warm_ticks
            batch = [
                (b"k-%05d" % ((sent + j) % 1000), value_of(sent + j, stamp=now, warm=warm))
                for j in range(per_tick)
            ]
            producer.send(batch)
            sent += per_tick
    finally:
        producer.close()
    return sent
