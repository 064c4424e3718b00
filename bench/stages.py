"""Where the time goes, without a profiler's distortion: each hot-path stage timed on real driver
data (µs per record), then in-process engine runs with candidate changes patched in (or, for a
change that shipped, the code before it), so each change comes with a measured effect.

    python -m bench.stages --brokers redis,rabbitmq,kafka

Stages: the driver's read (the raw loop's unit of work), the connector turning driver messages
into engine records, the engine accepting them into lanes and taking batches, the event shape,
serialising the event for a process environment and decoding it there, the checkpoint call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from bench.common import RESULTS, log, rate_of, read_spans
from bench.engine import Workdir, config_for
from bench.targets import TARGETS, Dataset, Target
from workers.engine.invoker import PackedEvent, unpack
from workers.engine.ports import PackingShape

BATCH = 500
REPEATS = 30


def _best_us(fn: Callable[[], Any], records: int, setup: Callable[[], Any] | None = None) -> float:
    """Median µs per record over REPEATS timed calls (setup runs untimed before each)."""
    times = []
    for _ in range(REPEATS):
        if setup is not None:
            setup()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / records * 1e6


def _mapping(
    target: Target,
    ds: Dataset,
    folder: Path,
    isolation: str = "thread",
    handler: str = "bench.handlers:noop",
    **settings: Any,
) -> Any:
    from workers.app.config import load_config

    path = folder / "mapping.yaml"
    data = config_for(
        target.source(ds, f"esm-bench-stages-{time.time_ns()}"),
        handler=handler,
        isolation=isolation,
        **settings,
    )
    path.write_text(json.dumps(data))
    config = load_config(path)
    return config, config.mapping("bench")


# --- driver data -------------------------------------------------------------------------------


def _redis_batch(target: Any, ds: Dataset) -> tuple[Any, Callable[[], Any], Callable[[], Any]]:
    import redis

    from connectors.redis.entries import stream_replies

    client = redis.Redis.from_url(target.source(ds, "")["url"])
    # The replies as the source's client reads them (connectors/redis/source.py `open`).
    client.set_response_callback("XREADGROUP", stream_replies)
    group = f"stages-{time.time_ns()}"
    client.xgroup_create(ds.name, group, id="0")
    reply: Any = client.xreadgroup(group, "c", {ds.name: ">"}, count=BATCH)
    entries = reply[0][1]
    ids: list[Any] = [e[0] for e in entries]

    def read() -> Any:
        # The same 500 entries again: XREADGROUP of the consumer's own pending entries.
        return client.xreadgroup(group, "c", {ds.name: "0"}, count=BATCH)

    def ack() -> Any:
        return client.xack(ds.name, group, *ids)

    return entries, read, ack


def _rabbit_batch(target: Any, ds: Dataset) -> list[tuple[Any, Any, bytes]]:
    import pika

    params = pika.URLParameters(target.source(ds, "")["url"])
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=BATCH)
    out: list[tuple[Any, Any, bytes]] = []
    for method, props, body in channel.consume(ds.name, inactivity_timeout=5):
        if method is None:
            break
        out.append((method, props, body))
        if len(out) == BATCH:
            break
    channel.cancel()
    connection.close()
    return out


def _kafka_batch(target: Any, ds: Dataset) -> list[Any]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": target.bootstrap, "group.id": f"stages-{time.time_ns()}"}
    )
    consumer.assign([TopicPartition(ds.name, 0, 0)])
    messages: list[Any] = []
    deadline = time.monotonic() + 30
    while len(messages) < BATCH and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(BATCH - len(messages), 1.0) if not m.error()]
    consumer.close()
    return messages


# --- stage timings -----------------------------------------------------------------------------


class _NoInvoker:
    def invoke(self, event: Any, request: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _poller(source: Any, pf: int = 1) -> Any:
    from workers.engine.batcher import BatchLimits
    from workers.engine.policy import Policy
    from workers.engine.poller import Poller, PollerSettings

    settings = PollerSettings(
        mapping="bench",
        function="fn",
        limits=BatchLimits(batch_size=BATCH, maximum_batching_window_s=0.05),
        parallelization_factor=pf,
    )
    return Poller(settings, source=source, invoker=_NoInvoker(), policy=Policy(), destination=None)


def stages(broker: str, target: Target, workdir: Workdir) -> dict[str, float]:
    """µs per record of each stage, on one batch of BATCH real records."""
    ds = target.dataset("stages", 5 * BATCH, keys=1000)
    folder = workdir.next(f"stages-{broker}")
    _, mapping = _mapping(target, ds, folder)
    out: dict[str, float] = {}
    if broker == "redis":
        from connectors.redis.source import RedisSource

        entries, read, ack = _redis_batch(target, ds)
        source: Any = RedisSource(mapping, 0)
        out["driver: XREADGROUP 500 (round trip + parse)"] = _best_us(read, BATCH)
        out["driver: XACK 500 (round trip)"] = _best_us(ack, BATCH)

        def convert() -> Any:
            return source._records(ds.name, entries, 0.0)

        def reset() -> None:
            source._in_flight[ds.name].clear()

        count = BATCH
    elif broker == "rabbitmq":
        from connectors.rabbitmq.source import RabbitMQSource

        items = _rabbit_batch(target, ds)
        source = RabbitMQSource(mapping, 0)

        def convert() -> Any:
            return source._take(len(items))

        def reset() -> None:
            source._pending = deque(items)
            source._live.clear()

        count = len(items)
    else:
        from confluent_kafka import TopicPartition

        from connectors.kafka.source import KafkaSource

        messages = _kafka_batch(target, ds)
        source = KafkaSource(mapping, 0)
        unit = f"{ds.name}-0"
        source._assigned[unit] = TopicPartition(ds.name, 0)

        def convert() -> Any:
            return source._records_from(messages)

        def reset() -> None:
            pass  # the Kafka connector keeps no per-record state to clear

        count = len(messages)

    def convert_again() -> Any:
        reset()
        return convert()

    out["connector: records"] = _best_us(convert, count, reset)
    records = convert_again()
    n = len(records)
    box: dict[str, Any] = {}

    def fresh_poller() -> None:
        box["poller"] = _poller(source)

    def accept_and_take() -> None:
        poller = box["poller"]
        poller._accept(records)
        for lane in list(poller._lanes.values()):
            while lane.buffer.records:
                poller._take(lane)

    out["engine: accept + take"] = _best_us(accept_and_take, n, fresh_poller)
    if source.capabilities.checkpoint == "offset":

        def track() -> None:
            poller = _poller(source)
            poller._accept(records)
            box["poller"] = poller

        def settle() -> None:
            box["poller"]._settle(records)

        out["engine: settle (tracker + commit call)"] = _best_us(settle, n, track)
    shape = source.shape
    out["event building (thread isolation)"] = _best_us(lambda: shape.event(records), n)
    event = shape.event(records)
    payload = orjson.dumps(event)
    out["event as JSON: orjson.dumps(event)"] = _best_us(lambda: orjson.dumps(event), n)
    out["event as JSON: orjson.loads in the environment"] = _best_us(
        lambda: orjson.loads(payload), n
    )
    out["event as JSON: payload bytes per record"] = len(payload) / n
    if isinstance(shape, PackingShape):
        # What process isolation does: the poller packs, the environment builds the event.
        packed = shape.pack(records)
        out["process isolation: pack (poller)"] = _best_us(lambda: shape.pack(records), n)
        out["process isolation: unpack into the event (environment)"] = _best_us(
            lambda: unpack(PackedEvent(shape.unpacker, packed)), n
        )
        out["process isolation: payload bytes per record"] = len(packed) / n
    return {k: round(v, 3) for k, v in out.items()}


# --- in-process engine runs with candidate changes ---------------------------------------------


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@contextlib.contextmanager
def short_paused_wait() -> Iterator[None]:
    import connectors.redis.source

    with patched(connectors.redis.source, "PAUSED_WAIT_S", 0.0005):
        yield


@contextlib.contextmanager
def kafka_client_config(**extra: Any) -> Iterator[None]:
    from connectors.kafka.source import KafkaSource

    original = KafkaSource._new_consumer

    def new_consumer(self: Any, config: dict[str, Any]) -> Any:
        return original(self, {**config, **extra})

    with patched(KafkaSource, "_new_consumer", new_consumer):
        yield


@contextlib.contextmanager
def kafka_soft_pause(records: int) -> Iterator[None]:
    import connectors.kafka.source

    with patched(connectors.kafka.source, "SOFT_PAUSE_RECORDS", records):
        yield


def variants(broker: str) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
    out: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "as shipped": contextlib.nullcontext,
        "sys.setswitchinterval(0.0005)": lambda: switch_interval(0.0005),
    }
    if broker == "redis":
        out["paused poll waits 0.5 ms, not 5 ms"] = lambda: short_paused_wait()
    elif broker == "kafka":
        out["hard pause only past 20,000 held records"] = lambda: kafka_soft_pause(20_000)
    return out


def in_process_rate(
    target: Target, broker: str, n: int, isolation: str, workdir: Workdir, repeats: int
) -> dict[str, list[float]]:
    """records/s of an in-process poller (build_poller + run) for each variant, interleaved."""
    from workers.app.wiring import build_poller

    results: dict[str, list[float]] = {name: [] for name in variants(broker)}
    for _ in range(repeats):
        for name, make in variants(broker).items():
            ds = target.dataset("stages-run", n, keys=1000)
            folder = workdir.next(f"inproc-{broker}")
            config, mapping = _mapping(
                target,
                ds,
                folder,
                isolation=isolation,
                batch_size=BATCH,
                maximum_batching_window_s=0.05,
            )
            out_path = folder / "handler.out"
            os.environ["BENCH_OUT"] = str(out_path)
            try:
                with make():
                    poller, invoker = build_poller(config, mapping)
                    try:
                        poller.run(until_idle_s=0.5)
                    finally:
                        invoker.close()
            finally:
                if ds.single_use:
                    target.release(ds)
            spans = read_spans(out_path)
            rate, _, handled = rate_of(spans)
            if handled < n:
                raise RuntimeError(f"{broker} {name}: handler saw {handled}/{n} records")
            results[name].append(rate)
            log(f"{broker} in-process {isolation} [{name}]: {rate:,.0f} records/s")
    return results


def latency_in_process(
    target: Target, broker: str, workdir: Workdir, seconds: float
) -> dict[str, dict[str, float]]:
    """p50/p99 from produce to handler start at 1,000 records/s, in-process, per variant."""
    import threading

    from bench.common import percentile, read_latencies
    from bench.scenarios import produce_steadily
    from workers.app.wiring import build_poller

    out: dict[str, dict[str, float]] = {}
    chosen: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "as shipped": contextlib.nullcontext
    }
    if broker == "kafka":
        chosen["fetch.wait.max.ms 10"] = lambda: kafka_client_config(**{"fetch.wait.max.ms": 10})
    for name, make in chosen.items():
        ds = target.empty("stages-latency")
        folder = workdir.next(f"latency-{broker}")
        config, mapping = _mapping(
            target,
            ds,
            folder,
            isolation="process",
            handler="bench.handlers:latency",
            batch_size=BATCH,
            maximum_batching_window_s=0,
        )
        out_path = folder / "handler.out"
        os.environ["BENCH_OUT"] = str(out_path)
        try:
            with make():
                poller, invoker = build_poller(config, mapping)
                runner = threading.Thread(target=poller.run, kwargs={"until_idle_s": 2.0})
                runner.start()
                deadline = time.monotonic() + 60
                while not poller.source.assignment() and time.monotonic() < deadline:
                    time.sleep(0.05)
                try:
                    produce_steadily(target, ds, 1000, seconds)
                finally:
                    runner.join(60)
                    poller.stop()
                    runner.join(30)
                    invoker.close()
        finally:
            target.release(ds)
        samples = [ms for _, ms in read_latencies(out_path)]
        out[name] = {
            "p50_ms": round(percentile(samples, 50), 2),
            "p99_ms": round(percentile(samples, 99), 2),
            "samples": len(samples),
        }
        log(f"{broker} in-process latency [{name}]: {out[name]}")
    return out


def raw_kafka_latency(target: Any, seconds: float) -> dict[str, dict[str, float]]:
    """The client alone: consume(1, t) then what is buffered, at fetch.wait.max.ms 100 and 10."""
    import threading

    from confluent_kafka import Consumer, TopicPartition

    from bench.common import percentile
    from bench.scenarios import produce_steadily

    out: dict[str, dict[str, float]] = {}
    for wait_ms in (100, 10):
        ds = target.empty("stages-raw-latency")
        consumer = Consumer(
            {
                "bootstrap.servers": target.bootstrap,
                "group.id": f"stages-{time.time_ns()}",
                "fetch.wait.max.ms": wait_ms,
                "enable.auto.commit": False,
            }
        )
        consumer.assign([TopicPartition(ds.name, 0, 0)])
        samples: list[float] = []
        stop = threading.Event()

        def consume(
            consumer: Any = consumer, samples: list[float] = samples, stop: Any = stop
        ) -> None:
            while not stop.is_set():
                messages = consumer.consume(1, 0.1)
                if not messages:
                    continue
                messages += consumer.consume(BATCH - 1, 0)
                now = time.time()
                for m in messages:
                    if m.error() is None:
                        doc = orjson.loads(m.value())
                        if not doc["warm"]:
                            samples.append((now - doc["ts"]) * 1000)

        reader = threading.Thread(target=consume)
        reader.start()
        try:
            produce_steadily(target, ds, 1000, seconds)
            time.sleep(0.5)
        finally:
            stop.set()
            reader.join(10)
            consumer.close()
        out[f"raw client, fetch.wait.max.ms {wait_ms}"] = {
            "p50_ms": round(percentile(samples, 50), 2),
            "p99_ms": round(percentile(samples, 99), 2),
            "samples": len(samples),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    parser.add_argument("--brokers", default="kafka,redis,rabbitmq")
    parser.add_argument("--records", type=int, default=0, help="records per in-process run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isolation", default="thread")
    parser.add_argument("--no-runs", action="store_true", help="stage timings only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    defaults = {"kafka": 200_000, "redis": 100_000, "rabbitmq": 50_000}
    report: dict[str, Any] = {}
    workdir = Workdir()
    try:
        for broker in [b for b in args.brokers.split(",") if b]:
            target = TARGETS[broker]()
            target.setup()
            try:
                entry: dict[str, Any] = {"stages_us_per_record": stages(broker, target, workdir)}
                log(f"{broker} stages: {entry['stages_us_per_record']}")
                if not args.no_runs and broker == "kafka":
                    entry["latency_in_process"] = {
                        **raw_kafka_latency(target, 5.0),
                        **latency_in_process(target, broker, workdir, 5.0),
                    }
                if not args.no_runs:
                    entry["in_process_records_per_s"] = in_process_rate(
                        target,
                        broker,
                        args.records or defaults[broker],
                        args.isolation,
                        workdir,
                        args.repeats,
                    )
                report[broker] = entry
            finally:
                target.close()
    finally:
        workdir.cleanup()
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"stages-{args.isolation}"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{stem}.md").write_text(render(report))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = []
    for broker, entry in report.items():
        lines.append(f"## {broker}\n\n| stage | µs/record |\n|---|---:|")
        for stage, us in entry["stages_us_per_record"].items():
            lines.append(f"| {stage} | {us:.2f} |")
        for name, lat in entry.get("latency_in_process", {}).items():
            lines.append(
                f"\nLatency in-process [{name}]: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms"
            )
        runs = entry.get("in_process_records_per_s")
        if runs:
            base = statistics.median(runs["as shipped"])
            lines.append(
                "\n| in-process run | records/s (median) | vs as shipped |\n|---|---:|---:|"
            )
            for name, rates in runs.items():
                rate = statistics.median(rates)
                lines.append(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
