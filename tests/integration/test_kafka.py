"""The Kafka connector against a Kafka-protocol broker (Tansu): the contract suite, rebalance
callbacks, and `workers run` end to end (dead letters, restarts, a member leaving, starting
positions, a broker that is down at start-up)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import TopicPartition

import connectors.kafka.source as kafka_source
from connectors.kafka.client import KafkaUnavailable
from connectors.kafka.probe import probe_kafka
from connectors.kafka.source import KafkaSource
from tests import brokers
from tests.brokers import KafkaRecord, Tansu, committed_offsets, end_offsets, read_topic
from tests.cli import run_workers, workers_run
from tests.contract import (
    OffsetContract,
    PauseContract,
    RebalanceContract,
    SourceContract,
    poll_n,
    settle,
)
from tests.contract.harness import RecordingListener
from tests.engine import kafka_items, letter_values, value_of
from workers.app import config as cfg
from workers.app import registry
from workers.engine.ports import Destination, Source

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

REPO = Path(__file__).resolve().parents[2]
# A short session: Tansu joins a member after half of it (tests/brokers.py).
CLIENT_CONFIG: dict[str, Any] = dict(brokers.KAFKA_TEST_SESSION)


def mapping_for(
    bootstrap: str, name: str, destination: dict[str, Any] | None = None, **source: Any
) -> cfg.EventSourceMapping:
    data: dict[str, Any] = {
        "name": name,
        "function": "fn",
        "source": {
            "type": "kafka",
            "bootstrap_servers": bootstrap,
            "topics": [name],
            "client_config": CLIENT_CONFIG,
            **source,
        },
    }
    if destination is not None:
        data["destination_config"] = destination
    return cfg.EventSourceMapping.model_validate(data)


def letters_in(bootstrap: str, topic: str) -> list[tuple[Any, dict[str, Any]]]:
    """Every dead letter in `topic`: (message, decoded letter)."""
    return [(m, orjson.loads(m.value() or b"")) for m in read_topic(bootstrap, topic)]


# --- the contract ------------------------------------------------------------------------------


class TestKafkaContract(SourceContract, OffsetContract, PauseContract, RebalanceContract):
    # A join takes about 1 s here; the contract also waits this long to see that nothing more
    # arrives, so it is kept short.
    join_timeout_s = 12.0
    # Once a member fetched, records of every partition it owns are on their way.
    quiet_s = 2.0

    @pytest.fixture(autouse=True)
    def _broker(self, kafka_broker: Tansu) -> None:
        self.bootstrap = kafka_broker.bootstrap
        self.topics: set[str] = set()

    def topic(self, name: str) -> str:
        if name not in self.topics:
            brokers.create_topic(self.bootstrap, name, 3)
            self.topics.add(name)
        return name

    def make_source(self, name: str) -> Source:
        return self.make_member(name, 0)

    def make_member(self, name: str, instance: int) -> Source:
        self.topic(name)
        return registry.open_source(mapping_for(self.bootstrap, name), instance)

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        records = [KafkaRecord(v, k) for v, k in zip(values, keys, strict=True)]
        brokers.produce(self.bootstrap, self.topic(name), records)

    def make_destination(self, name: str) -> Destination:
        dlq = self.topic(f"{name}.dlq")
        on_failure = {"type": "kafka", "topic": dlq, "bootstrap_servers": self.bootstrap}
        mapping = mapping_for(self.bootstrap, name, destination={"on_failure": on_failure})
        destination = registry.open_destination(mapping)
        assert destination is not None
        return destination

    def dead_letter_values(self, name: str) -> list[bytes]:
        return letter_values([letter for _, letter in letters_in(self.bootstrap, f"{name}.dlq")])

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        return [value_of(item) for item in kafka_items(event)]

    def test_event_is_lambdas_self_managed_kafka_event(self) -> None:
        name = self.fresh()
        self.topic(name)
        brokers.produce(
            self.bootstrap,
            name,
            [
                KafkaRecord(b"v", b"k", headers=[("h1", b"x"), ("h1", b"dup")], partition=1),
                KafkaRecord(None, b"gone", partition=1),  # a tombstone
            ],
        )
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 2, self.join_timeout_s)
            event = source.shape.event(records)
            assert event["eventSource"] == "SelfManagedKafka"
            assert event["bootstrapServers"] == self.bootstrap
            first, tombstone = event["records"][f"{name}-1"]
            assert first["topic"] == name and first["partition"] == 1 and first["offset"] == 0
            assert first["timestampType"] == "CREATE_TIME"
            assert first["key"] == "aw==" and first["value"] == "dg=="
            assert first["headers"] == [{"h1": [120]}, {"h1": [100, 117, 112]}]
            assert tombstone["value"] == ""
            assert records[0].size > records[1].size
            # A retry builds the same event from the records' fields, whatever the handler did
            # to the first one.
            rebuilt = orjson.loads(orjson.dumps(event))
            first["value"] = "changed"
            first["headers"].clear()
            assert source.shape.event(records) == rebuilt
            settle(source, records)
        finally:
            source.close()

    def test_event_with_a_cluster_arn_is_lambdas_msk_event(self) -> None:
        name = self.fresh()
        self.topic(name)
        arn = "arn:aws:kafka:us-east-1:123456789012:cluster/shop/751d2973-a626-431c-9d4e-1"
        brokers.produce(self.bootstrap, name, [KafkaRecord(b"v", b"k", headers=[("h", b"x")])])
        source = registry.open_source(mapping_for(self.bootstrap, name, event_source_arn=arn), 0)
        source.open(RecordingListener())
        try:
            records = poll_n(source, 1, self.join_timeout_s)
            event = source.shape.event(records)
            assert list(event) == ["eventSource", "eventSourceArn", "bootstrapServers", "records"]
            assert event["eventSource"] == "aws:kafka"
            assert event["eventSourceArn"] == arn
            assert event["bootstrapServers"] == self.bootstrap
            [(unit, [item])] = event["records"].items()
            assert unit == f"{name}-{item['partition']}" and item["topic"] == name
            assert item["key"] == "aw==" and item["value"] == "dg=="
            assert item["headers"] == [{"h": [120]}]
            # Read back (a dead letter's payload), the event names the same records.
            read = registry.shape_for_event(event).records(event)
            assert [(r.source, r.position, r.value) for r in read] == [
                (r.source, r.position, r.value) for r in records
            ]
            settle(source, records)
        finally:
            source.close()


# --- rebalance callbacks -----------------------------------------------------------------------


class CommittingListener:
    """Stands in for the engine: its last settle commits a position inside on_revoked."""

    def __init__(self, source: KafkaSource, final: dict[str, int]) -> None:
        self.source = source
        self.final = final
        self.events: list[str] = []

    def on_assigned(self, units: Collection[str]) -> None:
        self.events.append(f"assigned {sorted(units)}")

    def on_revoked(self, units: Collection[str]) -> None:
        self.events.append(f"revoked {sorted(units)}")
        self.source.commit({u: p for u, p in self.final.items() if u in units})


class RecordingConsumer:
    """The parts of a confluent-kafka consumer the rebalance callbacks use."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        kind = "async" if asynchronous else "sync"
        self.events.append(f"{kind} {[(tp.partition, tp.offset) for tp in offsets]}")
        return offsets


def test_revoke_commits_synchronously_after_the_engine_drained() -> None:
    source = KafkaSource(mapping_for("127.0.0.1:1", "t"), 0)
    listener = CommittingListener(source, {"t-0": 7, "t-1": 3})
    consumer = RecordingConsumer(listener.events)
    source._listener = listener
    partitions = [TopicPartition("t", 0), TopicPartition("t", 1)]
    source._assigned = {"t-0": partitions[0], "t-1": partitions[1]}
    source._eof = {"t-0", "t-1"}
    source._on_revoke(consumer, partitions[:1])  # type: ignore[arg-type]
    assert listener.events == ["revoked ['t-0']", "sync [(0, 7)]"]
    assert source.assignment() == {"t-1"}
    # Lost partitions belong to another member already: nothing is committed for them.
    source.commit({"t-1": 2})
    source._on_lost(consumer, partitions[1:])  # type: ignore[arg-type]
    assert listener.events[2:] == ["revoked ['t-1']"]
    assert source.assignment() == frozenset() and not source._pending


def test_close_commits_what_settled_during_the_revoke(kafka_broker: Tansu) -> None:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-close")
    brokers.create_topic(bootstrap, name, 2)
    brokers.produce(bootstrap, name, [KafkaRecord(f"v{i}", partition=i % 2) for i in range(10)])
    source = KafkaSource(mapping_for(bootstrap, name), 0)
    listener = CommittingListener(source, {f"{name}-0": 4, f"{name}-1": 2})
    source.open(listener)
    try:
        assert len(poll_n(source, 10)) == 10
        source.commit({f"{name}-0": 1})  # committed on the next poll or at close
    finally:
        source.close()
    assert listener.events[-1] == f"revoked {[f'{name}-0', f'{name}-1']}"
    assert committed_offsets(bootstrap, name, name) == {0: 4, 1: 2}


def test_missing_topic_and_unreachable_broker_are_clear_errors(kafka_broker: Tansu) -> None:
    missing = brokers.unique_name("kafka-missing")
    source = KafkaSource(mapping_for(kafka_broker.bootstrap, missing), 0)
    with pytest.raises(KafkaUnavailable, match=f"topic.*{missing} not found"):
        source.open(CommittingListener(source, {}))
    with pytest.raises(KafkaUnavailable, match=f"topic.*{missing} not found"):
        probe_kafka(mapping_for(kafka_broker.bootstrap, missing).source)  # type: ignore[arg-type]
    port = brokers.free_port()
    down = mapping_for(f"127.0.0.1:{port}", missing)
    with pytest.raises(KafkaUnavailable, match=f"servers 127.0.0.1:{port}: .*Connection refused"):
        probe_kafka(down.source)  # type: ignore[arg-type]
    assert isinstance(KafkaUnavailable("x"), KafkaSource.retryable_errors)


def test_paused_partition_holds_then_pauses_and_resumes_in_order(
    kafka_broker: Tansu, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_source, "SOFT_PAUSE_RECORDS", 10)
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-pause")
    brokers.create_topic(bootstrap, name, 2)
    brokers.produce(bootstrap, name, [KafkaRecord(f"a{i}", partition=0) for i in range(5)])
    source = KafkaSource(mapping_for(bootstrap, name), 0)
    source.open(CommittingListener(source, {}))
    paused, other = f"{name}-0", f"{name}-1"
    try:
        assert [r.value for r in poll_n(source, 5)] == [f"a{i}".encode() for i in range(5)]
        source.pause([paused])
        brokers.produce(
            bootstrap,
            name,
            [KafkaRecord(f"b{i}", partition=0) for i in range(40)]
            + [KafkaRecord(f"c{i}", partition=1) for i in range(3)],
        )
        got = poll_n(source, 3, 10)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            got += source.poll(100, 0.2)
        # The other partition flows; the paused one is held, then paused in librdkafka.
        assert [r.source for r in got] == [other] * 3
        assert source._hard_paused == {paused}
        assert not source.caught_up()
        source.resume([paused])
        again = poll_n(source, 40, 10)
        assert [r.value for r in again] == [f"b{i}".encode() for i in range(40)]
        assert [r.position for r in again] == list(range(5, 45))
        settle(source, got + again)
    finally:
        source.close()


# --- workers run -------------------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    bootstrap: str,
    mappings: list[dict[str, Any]],
    environment: dict[str, Any],
    isolation: str = "process",
) -> Path:
    """A function per mapping; an `environment` value may be a dict of values by mapping."""
    functions: dict[str, Any] = {}
    full = []
    for m in mappings:
        env = {k: v[m["name"]] if isinstance(v, dict) else v for k, v in environment.items()}
        functions[m["name"]] = {
            "handler": "tests.handlers.kafka_handlers:record_lines",
            "isolation": isolation,
            "timeout_s": 10,
            "concurrency": 4,
            "environment": env,
        }
        source = {
            "type": "kafka",
            "bootstrap_servers": bootstrap,
            "topics": [m["name"]],
            "client_config": CLIENT_CONFIG,
            **m.get("source", {}),
        }
        full.append({**m, "function": m["name"], "source": source})
    config = {"functions": functions, "event_source_mappings": full}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def handled(path: Path) -> list[tuple[str, int, str, str]]:
    """(partition, offset, key, value) per line the handler wrote."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        unit, offset, key, value = line.split(" ")
        out.append((unit, int(offset), key, value))
    return out


def assert_ordered_per_key(lines: list[tuple[str, int, str, str]]) -> None:
    last: dict[tuple[str, str], int] = {}
    for unit, offset, key, _ in lines:
        assert offset > last.get((unit, key), -1), f"{unit} key {key} went back to {offset}"
        last[(unit, key)] = offset


def fully_committed(bootstrap: str, group: str, topic: str) -> None:
    ends = {p: e for p, e in end_offsets(bootstrap, topic).items() if e > 0}
    assert committed_offsets(bootstrap, group, topic) == ends


def wait_for(predicate: Any, timeout_s: float, what: str, process: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"workers exited with {process.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_workers_run_dead_letters_exactly_the_poison_records(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-run")
    dlq = f"{name}.dlq"
    brokers.create_topic(bootstrap, name, 3)
    brokers.create_topic(bootstrap, dlq, 1)
    n = 900
    records = [KafkaRecord(f"v{i}", f"k{i % 9}") for i in range(n)]
    placed = brokers.produce(bootstrap, name, records)
    poison = {"v13", "v450", "v899"}
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        bootstrap=bootstrap,
        environment={"KAFKA_OUT": str(out), "KAFKA_POISON": ",".join(sorted(poison))},
        mappings=[
            {
                "name": name,
                "batch_size": 50,
                "maximum_batching_window_s": 0.1,
                "parallelization_factor": 2,
                "bisect_batch_on_function_error": True,
                "maximum_retry_attempts": 1,
                "destination_config": {"on_failure": {"type": "kafka", "topic": dlq}},
            }
        ],
    )
    summary = run_workers(config, tmp_path / "summary.json")[name]

    lines = handled(out)
    # Every other record exactly once.
    assert sorted(v for *_, v in lines) == sorted(
        f"v{i}" for i in range(n) if f"v{i}" not in poison
    )
    assert_ordered_per_key(lines)
    letters = letters_in(bootstrap, dlq)
    assert sorted(v.decode() for v in letter_values([x for _, x in letters])) == sorted(poison)
    where = {f"v{i}": placed[i] for i in range(n)}
    for message, letter in letters:
        [item] = kafka_items(letter["payload"])
        value = value_of(item).decode()
        headers = dict((k, v.decode()) for k, v in message.headers() or [])
        assert headers["esm-mapping"] == name
        assert headers["esm-condition"] == "RetryAttemptsExhausted"
        assert headers["esm-error-type"] == "ValueError"
        assert headers["esm-source-topic"] == name
        assert (int(headers["esm-source-partition"]), int(headers["esm-source-offset"])) == (
            where[value]
        )
        assert message.key() == f"k{int(value[1:]) % 9}".encode()
        assert letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
        assert letter["KafkaBatchInfo"]["recordsInfo"]
        assert letter["payload"]["eventSource"] == "SelfManagedKafka"
    assert summary["dead_lettered"] == len(poison)
    assert summary["succeeded"] == n - len(poison)
    fully_committed(bootstrap, name, name)


def test_restarted_worker_resumes_from_committed_offsets(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-restart")
    brokers.create_topic(bootstrap, name, 3)
    brokers.produce(bootstrap, name, [KafkaRecord(f"a{i}", f"k{i % 5}") for i in range(300)])
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        bootstrap=bootstrap,
        environment={"KAFKA_OUT": str(out)},
        mappings=[{"name": name, "batch_size": 40, "maximum_batching_window_s": 0.05}],
        isolation="thread",
    )
    first = run_workers(config, tmp_path / "first.json")[name]
    assert first["succeeded"] == 300
    fully_committed(bootstrap, name, name)

    brokers.produce(bootstrap, name, [KafkaRecord(f"b{i}", f"k{i % 5}") for i in range(200)])
    second = run_workers(config, tmp_path / "second.json")[name]
    assert second["polled"] == 200 and second["succeeded"] == 200
    lines = handled(out)
    values = [v for *_, v in lines]
    assert sorted(values) == sorted([f"a{i}" for i in range(300)] + [f"b{i}" for i in range(200)])
    assert_ordered_per_key(lines)
    fully_committed(bootstrap, name, name)


def test_two_workers_split_the_group_and_one_leaves_mid_run(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-pair")
    partitions, n, batch_size = 4, 1600, 10
    brokers.create_topic(bootstrap, name, partitions)
    brokers.produce(bootstrap, name, [KafkaRecord(f"p{i}", f"k{i % 8}") for i in range(n)])
    outs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    processes = []
    for tag, out in zip("ab", outs, strict=True):
        config = write_config(
            tmp_path / f"{tag}.yaml",
            bootstrap=bootstrap,
            environment={"KAFKA_OUT": str(out), "KAFKA_SLEEP_S": "0.1"},
            mappings=[{"name": name, "batch_size": batch_size, "maximum_batching_window_s": 0}],
            isolation="thread",
        )
        processes.append(
            subprocess.Popen(
                workers_run(config, tmp_path / f"{tag}.json", until_idle_s=4),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / f"{tag}.log").open("w"),
            )
        )
    leaver, stayer = processes
    try:
        wait_for(
            lambda: len(handled(outs[0])) >= 60 and handled(outs[1]), 40, "both workers to work"
        )
        moved = {u for u, *_ in handled(outs[0])}
        assert len(handled(outs[0])) + len(handled(outs[1])) < n / 2, "too late to leave"
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(timeout=30) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert stayer.wait(timeout=90) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    a, b = handled(outs[0]), handled(outs[1])
    counts = Counter(v for *_, v in a + b)
    assert set(counts) == {f"p{i}" for i in range(n)}  # every record at least once
    duplicates = sum(c - 1 for c in counts.values())
    # The leaving worker drains and commits before it leaves: nothing should be handled twice,
    # and at most what was in flight could be.
    assert duplicates <= batch_size * len(moved), duplicates
    assert duplicates == 0, duplicates
    assert {u for u, *_ in b} == {f"{name}-{p}" for p in range(partitions)}
    assert_ordered_per_key(a + b)
    fully_committed(bootstrap, name, name)


def test_latest_and_at_timestamp_start_where_they_should(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    latest = brokers.unique_name("kafka-latest")
    at = brokers.unique_name("kafka-at")
    for topic in (latest, at):
        brokers.create_topic(bootstrap, topic, 3)
    # Already there when the LATEST group joins: never handled.
    brokers.produce(bootstrap, latest, [KafkaRecord(f"old{i}", f"k{i}") for i in range(30)])
    # AT_TIMESTAMP: partition 0 holds older then newer records, 1 only older, 2 only newer.
    start_ms = int(time.time() * 1000) - 60_000
    at_records = [
        KafkaRecord(f"before{p}.{i}", partition=p, timestamp_ms=start_ms - 30_000 + i)
        for p in (0, 1)
        for i in range(5)
    ] + [
        KafkaRecord(f"after{p}.{i}", partition=p, timestamp_ms=start_ms + i)
        for p in (0, 2)
        for i in range(5)
    ]
    brokers.produce(bootstrap, at, at_records)
    latest_out, at_out = tmp_path / "latest.txt", tmp_path / "at.txt"
    config = write_config(
        tmp_path / "config.yaml",
        bootstrap=bootstrap,
        environment={"KAFKA_OUT": {latest: str(latest_out), at: str(at_out)}},
        mappings=[
            {"name": latest, "source": {"starting_position": "LATEST"}},
            {
                "name": at,
                "source": {
                    "starting_position": "AT_TIMESTAMP",
                    "starting_position_timestamp": start_ms,
                },
            },
        ],
        isolation="thread",
    )

    log_path = tmp_path / "run.log"
    process = subprocess.Popen(
        # Records are produced while it runs: the idle wait must outlast the gaps between them.
        workers_run(config, tmp_path / "summary.json", until_idle_s=3.0),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
    )
    try:
        wait_for(lambda: f"mapping {latest}: assigned" in log_path.read_text(), 40, "join", process)
        # LATEST starts at the end as the consumer first looks it up, a moment after the join:
        # produce probes until one is handled, then the records that must all be handled.
        probe = 0
        while not handled(latest_out):
            assert process.poll() is None, log_path.read_text()[-3000:]
            brokers.produce(bootstrap, latest, [KafkaRecord(f"probe{probe}", "kp")])
            probe += 1
            time.sleep(0.3)
        brokers.produce(bootstrap, latest, [KafkaRecord(f"new{i}", f"k{i}") for i in range(30)])
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    latest_values = [v for *_, v in handled(latest_out)]
    assert not [v for v in latest_values if v.startswith("old")]
    assert sorted(v for v in latest_values if v.startswith("new")) == sorted(
        f"new{i}" for i in range(30)
    )
    assert len(latest_values) == len(set(latest_values))
    at_lines = handled(at_out)
    assert sorted(v for *_, v in at_lines) == [f"after{p}.{i}" for p in (0, 2) for i in range(5)]
    assert {u for u, *_ in at_lines} == {f"{at}-0", f"{at}-2"}
    assert_ordered_per_key(at_lines)
    fully_committed(bootstrap, latest, latest)
    committed = committed_offsets(bootstrap, at, at)
    assert committed == {0: 10, 2: 5}


def test_broker_down_at_start_up_is_reported_and_the_worker_recovers(
    own_kafka_broker: Tansu, tmp_path: Path
) -> None:
    broker = own_kafka_broker
    name = broker.create_topic(brokers.unique_name("kafka-down"), 3)
    broker.stop()  # memory storage: it comes back with the topic (recreated) and no records
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        bootstrap=broker.bootstrap,
        environment={"KAFKA_OUT": str(out)},
        mappings=[{"name": name, "batch_size": 50, "maximum_batching_window_s": 0.05}],
        isolation="thread",
    )
    log_path = tmp_path / "run.log"
    process = subprocess.Popen(
        # The records are produced once the broker is back, while it runs.
        workers_run(config, tmp_path / "summary.json", until_idle_s=3.0),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
    )
    unreachable = f"cannot reach bootstrap servers {broker.bootstrap}"
    try:
        wait_for(lambda: unreachable in log_path.read_text(), 30, "the error", process)
        time.sleep(2)  # another retry or two while the broker stays down
        broker.start()
        n = 200
        brokers.produce(
            broker.bootstrap, name, [KafkaRecord(f"d{i}", f"k{i % 4}") for i in range(n)]
        )
        assert process.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert "Connection refused" in text
    # Retried with backoff and throttled: a handful of lines, not one per reconnect attempt.
    assert 1 <= text.count(unreachable) <= 10, text[-3000:]
    assert text.count("Connect to ipv4") <= 3, text[-3000:]
    lines = handled(out)
    assert sorted(v for *_, v in lines) == sorted(f"d{i}" for i in range(n))
    fully_committed(broker.bootstrap, name, name)
