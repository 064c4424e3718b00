"""`workers rewind` on real brokers: records consumed by `workers run` are handled again exactly
from the point the group was moved to; a dry run changes nothing; a running mapping is refused.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from confluent_kafka import Consumer, TopicPartition

from tests import brokers
from tests.brokers import KafkaRecord, Tansu, committed_offsets
from tests.cli import REPO, run_workers

pytestmark = [pytest.mark.integration]

# A short session: Tansu joins a member after half of it (tests/brokers.py).
CLIENT_CONFIG: dict[str, Any] = dict(brokers.KAFKA_TEST_SESSION)
# Record i is stamped BASE_MS + i s: far enough in the past that "latest" means something.
BASE_MS = (int(time.time()) - 3600) * 1000


def rewind(config: Path, mapping: str, to: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "rewind", str(config), mapping, "--to", to, *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_until_idle(config: Path, summary: Path) -> None:
    """`workers run --until-idle 1`, insisting on exit 0."""
    run_workers(config, summary, until_idle_s=1.0)


def write_config(path: Path, name: str, source: dict[str, Any], handler: str, env: Any) -> Path:
    config = {
        "functions": {"f": {"handler": handler, "timeout_s": 10, "environment": env}},
        "event_source_mappings": [
            {"name": name, "function": "f", "batch_size": 3, "source": source}
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Running:
    """`workers run CONFIG` in the background until `stop()` (SIGTERM, insists on exit 0)."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# --- Kafka ----------------------------------------------------------------------------------------


def kafka_setup(kafka: Tansu, tmp_path: Path, out: Path) -> tuple[str, Path]:
    """A 2-partition topic with 10 records (record i on partition i % 2, at offset i // 2,
    stamped BASE_MS + i s) and a mapping that appends one line per handled record to `out`."""
    topic = kafka.create_topic(brokers.unique_name("rewind"), partitions=2)
    brokers.produce(
        kafka.bootstrap,
        topic,
        [KafkaRecord(f"v{i}", partition=i % 2, timestamp_ms=BASE_MS + i * 1000) for i in range(10)],
    )
    source = {
        "type": "kafka",
        "bootstrap_servers": kafka.bootstrap,
        "topics": [topic],
        "client_config": CLIENT_CONFIG,
    }
    config = write_config(
        tmp_path / "kafka.yaml",
        topic,
        source,
        "tests.handlers.kafka_handlers:record_lines",
        {"KAFKA_OUT": str(out)},
    )
    return topic, config


def handled_values(out: Path) -> list[str]:
    """The values handled, in (partition, offset) order; each line "topic-p offset key value"."""
    return [
        line.split()[3]
        for line in sorted(lines(out), key=lambda line: (line.split()[0], int(line.split()[1])))
    ]


def broker_lookup(kafka: Tansu, topic: str, ms: int) -> dict[int, int]:
    """What the broker itself answers to a lookup by time, per partition."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "lookup"})
    try:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in (0, 1)], timeout=10
        )
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


@pytest.mark.kafka
def test_kafka_rewind_replays_exactly_from_the_point(kafka_broker: Tansu, tmp_path: Path) -> None:
    first = tmp_path / "first.txt"
    topic, config = kafka_setup(kafka_broker, tmp_path, first)
    run_until_idle(config, tmp_path / "s1.json")
    assert sorted(handled_values(first)) == sorted(f"v{i}" for i in range(10))
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 5, 1: 5}

    dry = rewind(config, topic, "earliest", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{topic}-0  5 -> 0" in dry.stdout and f"{topic}-1  5 -> 0" in dry.stdout
    assert "dry run: 2 of 2 would move; nothing changed" in dry.stdout
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 5, 1: 5}

    done = rewind(config, topic, "earliest")
    assert done.returncode == 0, done.stderr
    assert "rewound: 2 of 2 moved" in done.stdout
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 0, 1: 0}
    second = tmp_path / "second.txt"
    config.write_text(config.read_text().replace(str(first), str(second)))
    run_until_idle(config, tmp_path / "s2.json")
    assert sorted(lines(second)) == sorted(lines(first))  # every record again, once

    # From a time: records 6..9 (offsets 3 and 4 of each partition), to the millisecond.
    since = BASE_MS + 6000
    done = rewind(config, topic, str(since))
    assert done.returncode == 0, done.stderr
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 3, 1: 3}
    if broker_lookup(kafka_broker, topic, since) != {0: 3, 1: 3}:
        # An approximate lookup (Tansu answers the earliest offset) is said, with the fix.
        assert "an approximate lookup" in done.stdout, done.stdout
        assert "found by reading 3 record(s)" in done.stdout, done.stdout
    third = tmp_path / "third.txt"
    config.write_text(config.read_text().replace(str(second), str(third)))
    run_until_idle(config, tmp_path / "s3.json")
    assert sorted(handled_values(third)) == ["v6", "v7", "v8", "v9"]

    # ISO-8601 as starting_position_timestamp takes it, then latest: nothing left to read.
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((BASE_MS + 8000) / 1000))
    assert rewind(config, topic, iso).returncode == 0
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 4, 1: 4}
    done = rewind(config, topic, "latest")
    assert done.returncode == 0, done.stderr
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 5, 1: 5}


@pytest.mark.kafka
def test_kafka_rewind_is_refused_while_the_mapping_runs(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    topic, config = kafka_setup(kafka_broker, tmp_path, out)
    running = Running(config)
    try:
        wait_for(lambda: len(lines(out)) == 10, 60, "the running mapping to handle 10 records")
        for flags in ((), ("--dry-run",)):
            refused = rewind(config, topic, "earliest", *flags)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert f"mapping {topic} is running" in refused.stderr
            assert "Running means: Kafka: the consumer group has members" in refused.stderr
        wait_for(
            lambda: committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 5, 1: 5},
            30,
            "the running mapping to commit",
        )
        running.stop()
    finally:
        running.kill()
    # A stopped `workers run` has left the group: the rewind goes through at once.
    done = rewind(config, topic, "earliest")
    assert done.returncode == 0, done.stderr
    assert committed_offsets(kafka_broker.bootstrap, topic, topic) == {0: 0, 1: 0}


# --- Redis ----------------------------------------------------------------------------------------


@pytest.fixture
def stream(client: redis.Redis) -> Iterator[str]:
    name = brokers.unique_name("redis-rewind")
    # Entry i has id (BASE_MS + i s)-0.
    for i in range(10):
        client.xadd(name, {"n": str(i)}, id=f"{BASE_MS + i * 1000}-0")
    yield name
    client.delete(name)


def redis_config(path: Path, url: str, stream: str, log: Path, **extra: Any) -> Path:
    source = {
        "type": "redis",
        "url": url,
        "streams": [stream],
        "consumer_name": "rewind-test",
        **extra,
    }
    return write_config(
        path, stream, source, "tests.handlers.redis_handlers:log_ids", {"REDIS_TEST_LOG": str(log)}
    )


def handled_ids(log: Path) -> list[str]:
    return sorted((line.split()[2] for line in lines(log)), key=lambda i: int(i.split("-")[0]))


def group_of(client: redis.Redis, stream: str) -> dict[str, Any]:
    (group,) = client.xinfo_groups(stream)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in group.items()}


def entry_id(i: int) -> str:
    return f"{BASE_MS + i * 1000}-0"


@pytest.mark.redis
def test_redis_rewind_replays_exactly_from_the_point(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    first = tmp_path / "first.txt"
    config = redis_config(tmp_path / "redis.yaml", redis_url, stream, first)
    run_until_idle(config, tmp_path / "s1.json")
    assert handled_ids(first) == [entry_id(i) for i in range(10)]
    assert group_of(client, stream)["last-delivered-id"] == entry_id(9)
    # A stopped consumer holding nothing leaves the group: nothing there looks like it runs.
    assert client.xinfo_consumers(stream, stream) == []

    dry = rewind(config, stream, "earliest", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{stream}  {entry_id(9)} -> 0-0" in dry.stdout
    assert "dry run: 1 of 1 would move; nothing changed" in dry.stdout
    assert group_of(client, stream)["last-delivered-id"] == entry_id(9)

    assert rewind(config, stream, "earliest").returncode == 0
    assert group_of(client, stream)["last-delivered-id"] == "0-0"
    second = tmp_path / "second.txt"
    config = redis_config(config, redis_url, stream, second)
    run_until_idle(config, tmp_path / "s2.json")
    assert handled_ids(second) == [entry_id(i) for i in range(10)]

    # From a time: entries 6..9, the one stamped exactly at the time included.
    done = rewind(config, stream, str(BASE_MS + 6000))
    assert done.returncode == 0, done.stderr
    third = tmp_path / "third.txt"
    config = redis_config(config, redis_url, stream, third)
    run_until_idle(config, tmp_path / "s3.json")
    assert handled_ids(third) == [entry_id(i) for i in range(6, 10)]

    done = rewind(config, stream, "latest", "--dry-run")
    assert f"{stream}  {entry_id(9)} -> {entry_id(9)}  (unchanged)" in done.stdout


@pytest.mark.redis
def test_redis_rewind_acks_pending_entries_it_replays_and_keeps_older_ones(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    """Entries 0..4 delivered to a consumer that crashed, 0 and 1 acked: 2, 3, 4 are pending. A
    rewind to entry 3 acks 3 and 4 (read again from the new position) and keeps 2 pending, so
    that the next run handles each of 2..9 once."""
    config = redis_config(
        tmp_path / "redis.yaml", redis_url, stream, tmp_path / "log.txt", claim_idle_s=1
    )
    client.xgroup_create(stream, stream, id="0")
    client.xreadgroup(stream, "crashed", {stream: ">"}, count=5)
    client.xack(stream, stream, entry_id(0), entry_id(1))

    # The consumer read just now: it counts as running, and the rewind is refused.
    refused = rewind(config, stream, str(BASE_MS + 3000))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "consumer crashed on stream" in refused.stderr
    assert "3 pending" in refused.stderr
    assert group_of(client, stream)["last-delivered-id"] == entry_id(4)

    from connectors.redis.rewind import RedisRewinder
    from workers.app.config import load_config

    rewinder = RedisRewinder(load_config(config).mapping(stream))
    try:
        (move,) = rewinder.plan(BASE_MS + 3000)
        assert (move.current, move.new) == (entry_id(4), f"{BASE_MS + 2999}-18446744073709551615")
        assert "2 pending entries after it are acked and read again" in move.note
        assert "1 pending entries before it stay pending" in move.note
        rewinder.apply([move])
    finally:
        rewinder.close()
    pending = client.xpending_range(stream, stream, "-", "+", 10)
    assert [brokers.redis_text(p["message_id"]) for p in pending] == [entry_id(2)]
    log = tmp_path / "after.txt"
    config = redis_config(config, redis_url, stream, log, claim_idle_s=1)
    run_until_idle(config, tmp_path / "s.json")
    # 3..9 read again from the new position; 2 claimed from the crashed consumer.
    assert handled_ids(log) == [entry_id(i) for i in range(2, 10)]
    assert client.xpending_range(stream, stream, "-", "+", 10) == []


@pytest.mark.redis
def test_redis_rewind_is_refused_while_the_mapping_runs(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    config = redis_config(tmp_path / "redis.yaml", redis_url, stream, log)
    running = Running(config)
    try:
        wait_for(lambda: len(lines(log)) == 10, 60, "the running mapping to handle 10 entries")
        refused = rewind(config, stream, "earliest")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"mapping {stream} is running (consumer rewind-test on stream" in refused.stderr
        assert group_of(client, stream)["last-delivered-id"] == entry_id(9)
        running.stop()
    finally:
        running.kill()
    done = rewind(config, stream, "earliest")
    assert done.returncode == 0, done.stderr
    assert group_of(client, stream)["last-delivered-id"] == "0-0"
