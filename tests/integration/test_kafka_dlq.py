"""`workers dlq list/show/replay` on a Kafka destination topic, through the command line against a
Kafka-protocol broker (Tansu): listing changes nothing, replays hand each letter on once, records
failing again come back once with their replay count, letters a filter skips stay (and those
replayed past them are not offered again), `--to source` puts records back on their partitions,
and an interrupted replay resumes."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer

from connectors.kafka import config as kafka_cfg
from connectors.kafka.publisher import KafkaSourcePublisher
from connectors.kafka.shape import KafkaMeta
from connectors.kafka.store import REPLAY_STATE_TOPIC, KafkaDeadLetterStore
from tests import brokers
from tests.brokers import KafkaRecord, Tansu, committed_offsets, end_offsets, read_topic
from tests.cli import interrupted_replay
from workers.app import config as cfg
from workers.engine.records import Record

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
MAPPING = "orders"
REPLAY_GROUP = f"{MAPPING}-dlq-replay"
RECORDS = 20
# n of the poison records, the error each raises until the handler is fixed, and its key. All
# are on source partition 1; their letters are keyed like them, so the keys spread the letters
# over both partitions of the dead-letter topic: [3, 15] on one, [7, 10] on the other.
POISON = {3: "ValueError", 7: "KeyError", 10: "ValueError", 15: "KeyError"}
POISON_KEY = {3: "apple", 7: "banana", 10: "banana", 15: "apple"}
FAIL = {"ValueError": "value", "KeyError": "key"}
# Tansu joins a member only after about half of session.timeout.ms (docs/brokers.md).
CLIENT_CONFIG = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
# Slow enough that SIGTERM lands between letters.
RATE = ("--rate", "1")


@dataclass
class Original:
    partition: int
    offset: int
    key: Any
    value: Any


@dataclass
class Setup:
    bootstrap: str
    config: Path
    source: str
    dlq: str
    out: Path
    fixed: Path
    originals: dict[int, Original]  # n -> where the source record is, and what


def write_config(path: Path, bootstrap: str, source: str, dlq: str, out: Path, fixed: Path) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "functions": {
                    "picky": {
                        "handler": "tests.handlers.kafka_replay_handlers:picky",
                        "isolation": "thread",
                        "environment": {"KDLQ_OUT": str(out), "KDLQ_FIXED": str(fixed)},
                    }
                },
                "event_source_mappings": [
                    {
                        "name": MAPPING,
                        "function": "picky",
                        "source": {
                            "type": "kafka",
                            "bootstrap_servers": bootstrap,
                            "topics": [source],
                            "client_config": CLIENT_CONFIG,
                        },
                        "batch_size": 5,
                        "maximum_batching_window_s": 0.05,
                        "bisect_batch_on_function_error": True,
                        "maximum_retry_attempts": 0,
                        "destination_config": {"on_failure": {"type": "kafka", "topic": dlq}},
                    }
                ],
            }
        )
    )


@pytest.fixture
def setup(kafka_broker: Tansu, tmp_path: Path) -> Iterator[Setup]:
    """A mapping reading a fresh two-partition topic of RECORDS records into a fresh
    two-partition dead-letter topic."""
    bootstrap = kafka_broker.bootstrap
    source = brokers.unique_name("kafka-dlq-src")
    dlq = brokers.unique_name("kafka-dlq-letters")
    brokers.create_topic(bootstrap, source, 2)
    brokers.create_topic(bootstrap, dlq, 2)
    out, fixed, config = tmp_path / "handled.jsonl", tmp_path / "fixed", tmp_path / "esm.yaml"
    write_config(config, bootstrap, source, dlq, out, fixed)
    records = []
    for n in range(RECORDS):
        value: dict[str, Any] = {"n": n}
        if n in POISON:
            value["fail"] = FAIL[POISON[n]]
        records.append(
            KafkaRecord(
                orjson.dumps(value),
                POISON_KEY.get(n, f"k{n % 3}"),
                headers=[("tenant", b"acme")],
                partition=1 if n in POISON else n % 2,
            )
        )
    placed = brokers.produce(bootstrap, source, records)
    originals = {
        n: Original(partition, offset, record.key, record.value)
        for n, ((partition, offset), record) in enumerate(zip(placed, records, strict=True))
    }
    yield Setup(bootstrap, config, source, dlq, out, fixed, originals)


def workers(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def handled(s: Setup) -> list[dict[str, Any]]:
    if not s.out.exists():
        return []
    return [orjson.loads(line) for line in s.out.read_bytes().splitlines()]


def handled_ns(s: Setup) -> list[int]:
    return sorted(h["n"] for h in handled(s))


def run(s: Setup) -> None:
    done = workers("run", str(s.config), "--until-idle", "2")
    assert done.returncode == 0, done.stderr[-4000:]


def pending(s: Setup, *flags: str) -> list[dict[str, Any]]:
    result = workers("dlq", "list", str(s.config), MAPPING, "--json", *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def replay(s: Setup, *flags: str) -> dict[str, Any]:
    result = workers("dlq", "replay", str(s.config), MAPPING, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    summary: dict[str, Any] = orjson.loads(result.stdout.strip().splitlines()[-1])
    return summary


def summary_of(letters: int, succeeded: int, failed_again: int) -> dict[str, Any]:
    return {
        "letters": letters,
        "records": letters,
        "succeeded": succeeded,
        "failed_again": failed_again,
        "interrupted": False,
        "dry_run": False,
    }


def letters_by_partition(s: Setup) -> dict[int, list[int]]:
    """The n of each dead letter's record, per partition of the dead-letter topic, in order."""
    out: dict[int, list[int]] = {}
    for m in read_topic(s.bootstrap, s.dlq):
        try:
            letter = orjson.loads(m.value() or b"")
            [item] = next(iter(letter["payload"]["records"].values()))
        except (orjson.JSONDecodeError, KeyError):
            continue  # not a dead letter
        if letter["mapping"] == MAPPING:
            out.setdefault(m.partition() or 0, []).append(
                orjson.loads(base64.b64decode(item["value"]))["n"]
            )
    return out


def topic_exists(bootstrap: str, topic: str) -> bool:
    """Asked as a consumer: Tansu creates a missing topic for an admin client's metadata
    request."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "esm-tests-metadata"})
    try:
        found = consumer.list_topics(topic, timeout=10).topics.get(topic)
    finally:
        consumer.close()
    return found is not None and found.error is None


def state_records(s: Setup) -> list[tuple[bytes, bytes | None]]:
    """This test's records in the replay-state topic (key, value)."""
    if not topic_exists(s.bootstrap, REPLAY_STATE_TOPIC):
        return []
    messages = read_topic(s.bootstrap, REPLAY_STATE_TOPIC)
    return [
        (m.key() or b"", m.value())
        for m in messages
        if (m.key() or b"").startswith(f"{REPLAY_GROUP}/{s.dlq}/".encode())
    ]


def dlq_state(s: Setup) -> tuple[Any, ...]:
    """Everything a listing could change: the letters, the replay group's offsets and state."""
    return (
        end_offsets(s.bootstrap, s.dlq),
        committed_offsets(s.bootstrap, REPLAY_GROUP, s.dlq),
        state_records(s),
    )


def dead_letter_poison(s: Setup) -> None:
    run(s)
    assert handled_ns(s) == [n for n in range(RECORDS) if n not in POISON]
    s.out.unlink()
    by_partition = letters_by_partition(s)
    # The keys spread the letters as this test needs (the partitioner hashes keys the same way
    # on every run).
    assert sorted(by_partition.values()) == [[3, 15], [7, 10]], by_partition


def test_list_show_and_replay_to_the_fixed_handler(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    before = dlq_state(s)
    assert before[1] == {} and before[2] == []

    rows = pending(s)
    assert pending(s) == rows  # listing twice: same result
    assert dlq_state(s) == before  # and nothing changed, not even a commit
    assert sorted(r["error"] for r in rows) == sorted(POISON.values())
    assert all(r["condition"] == "RetryAttemptsExhausted" for r in rows)
    assert all(r["records"] == 1 and r["replays"] == 0 for r in rows)
    assert all(r["source"].startswith(f"{s.source}-1@") for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)  # oldest first
    assert len(pending(s, "--limit", "2")) == 2

    by_id = {r["id"]: r for r in rows}
    shown = workers("dlq", "show", str(s.config), MAPPING, rows[1]["id"])
    assert shown.returncode == 0, shown.stderr
    letter = orjson.loads(shown.stdout)
    [item] = letter["payload"]["records"][f"{s.source}-1"]
    n = item["valueDecoded"]["n"]
    assert item["valueDecoded"] == {"n": n, "fail": FAIL[POISON[n]]}
    assert item["keyDecoded"] == POISON_KEY[n]
    assert item["offset"] == s.originals[n].offset
    assert letter["error"]["errorType"] == POISON[n] == by_id[rows[1]["id"]]["error"]
    assert letter["requestContext"]["requestId"] == rows[1]["id"]
    missing = workers("dlq", "show", str(s.config), MAPPING, "no-such-letter")
    assert missing.returncode == 1

    table = workers("dlq", "list", str(s.config), MAPPING)
    assert rows[0]["id"] in table.stdout and "RetryAttemptsExhausted" in table.stdout

    dry = replay(s, "--dry-run")
    assert dry["letters"] == len(POISON) and dry["dry_run"]
    assert handled(s) == [] and dlq_state(s) == before

    s.fixed.touch()
    assert replay(s, "--to", "handler") == summary_of(4, succeeded=4, failed_again=0)
    assert handled_ns(s) == sorted(POISON)  # each exactly once
    assert pending(s) == []
    assert replay(s) == summary_of(0, succeeded=0, failed_again=0)  # nothing left to replay
    assert handled_ns(s) == sorted(POISON)
    ends, committed, state = dlq_state(s)
    assert ends == before[0]  # replaying keeps the letters; the group's offsets are the progress
    assert committed == ends and state == []


def test_still_failing_letters_come_back_once_and_skipped_ones_stay(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    # Records a shared or damaged topic may hold: another mapping's letter, and no letter.
    first = pending(s)[0]
    letter = orjson.loads(workers("dlq", "show", str(s.config), MAPPING, first["id"]).stdout)
    letter["mapping"] = "other-mapping"
    letter["requestContext"]["requestId"] = "someone-else"
    by_header = orjson.dumps(letter)
    letter["requestContext"]["requestId"] = "someone-else-too"
    brokers.produce(
        s.bootstrap,
        s.dlq,
        [
            KafkaRecord(b"{not json", partition=0),
            KafkaRecord(orjson.dumps(letter), partition=0),  # no header, named in the letter
            KafkaRecord(by_header, headers=[("esm-mapping", b"other-mapping")], partition=1),
            KafkaRecord(orjson.dumps({"x": 1}), partition=1),
        ],
    )
    listed = workers("dlq", "list", str(s.config), MAPPING, "--json")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(POISON)
    assert listed.stderr.count("not a dead letter") == 2

    # Still failing: each ValueError letter is tried once and written back with replayCount 1;
    # the KeyError letters are skipped by the filter and stay. On one partition a KeyError
    # letter comes before a ValueError one: the commit stops at the KeyError letter, and the
    # ValueError letter replayed past it is remembered in the replay state.
    again = replay(s, "--to", "handler", "--error-type", "ValueError")
    assert again == summary_of(2, succeeded=0, failed_again=2)
    rows = pending(s)
    assert sorted((r["error"], r["replays"]) for r in rows) == [
        ("KeyError", 0),
        ("KeyError", 0),
        ("ValueError", 1),
        ("ValueError", 1),
    ]
    assert handled(s) == []
    by_partition = letters_by_partition(s)
    committed = committed_offsets(s.bootstrap, REPLAY_GROUP, s.dlq)
    for partition, ns in by_partition.items():
        # [3, 15]: past 3 only; [7, 10]: nothing committed past 7, 10 in the state.
        assert committed[partition] == (1 if ns[:2] == [3, 15] else 0)
    [(_, value)] = state_records(s)
    assert value is not None and orjson.loads(value)["done"] == [[1, 1]]

    s.fixed.touch()
    assert replay(s, "--to", "handler") == summary_of(4, succeeded=4, failed_again=0)
    assert handled_ns(s) == sorted(POISON)  # 10 was not replayed a second time
    assert sorted((h["n"], h["replay"]) for h in handled(s)) == [(n, None) for n in sorted(POISON)]
    assert pending(s) == [] and replay(s)["letters"] == 0
    assert committed_offsets(s.bootstrap, REPLAY_GROUP, s.dlq) == end_offsets(s.bootstrap, s.dlq)
    # Everything replayed is behind the commit: the state record is deleted.
    assert state_records(s)[-1][1] is None


def test_replay_to_the_source_topic(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    source_ends = end_offsets(s.bootstrap, s.source)

    # Not fixed yet: the records go back onto their partition and fail there again, counted.
    assert replay(s, "--to", "source") == summary_of(4, succeeded=4, failed_again=0)
    assert pending(s) == []
    replayed = [
        m
        for m in read_topic(s.bootstrap, s.source)
        if (m.offset() or 0) >= source_ends[m.partition() or 0]
    ]
    assert len(replayed) == len(POISON)
    for m in replayed:
        n = orjson.loads(m.value() or b"")["n"]
        original = s.originals[n]
        assert (m.partition(), m.key(), m.value()) == (
            original.partition,
            original.key.encode(),
            original.value,
        )
        assert m.headers() == [("tenant", b"acme"), ("esm-replay-count", b"1")]
    run(s)
    rows = pending(s)
    assert len(rows) == len(POISON) and all(r["replays"] == 1 for r in rows)
    assert handled(s) == []

    s.fixed.touch()
    assert replay(s, "--to", "source")["letters"] == len(POISON)
    run(s)
    assert sorted((h["n"], h["replay"], h["tenant"], h["partition"]) for h in handled(s)) == [
        (n, "2", "acme", 1) for n in sorted(POISON)
    ]
    assert pending(s) == []
    assert sum(end_offsets(s.bootstrap, s.source).values()) == RECORDS + 2 * len(POISON)


def test_interrupted_replay_resumes_without_losing_letters(setup: Setup) -> None:
    s = setup
    dead_letter_poison(s)
    s.fixed.touch()
    first = interrupted_replay(s.config, MAPPING, lambda: bool(handled(s)), *RATE)
    assert first["interrupted"] and 1 <= first["letters"] < len(POISON)
    assert len(pending(s)) == len(POISON) - first["letters"]

    rest = replay(s)
    assert first["letters"] + rest["letters"] == len(POISON)
    ns = handled_ns(s)
    # Nothing lost; at most the letter in flight at the signal is handled twice.
    assert set(ns) == set(POISON) and len(ns) <= len(POISON) + 1
    assert pending(s) == []


def test_publisher_falls_back_to_the_key_partitioner_and_store_reads_no_topic(
    kafka_broker: Tansu,
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = brokers.unique_name("kafka-dlq-pub")
    brokers.create_topic(bootstrap, topic, 2)
    mapping = cfg.EventSourceMapping.model_validate(
        {
            "name": "pub",
            "function": "fn",
            "source": {"type": "kafka", "bootstrap_servers": bootstrap, "topics": [topic]},
            "destination_config": {
                "on_failure": {"type": "kafka", "topic": brokers.unique_name("kafka-dlq-none")}
            },
        }
    )
    assert isinstance(mapping.source, kafka_cfg.KafkaSource)
    publisher = KafkaSourcePublisher(mapping.source)
    gone = Record(
        f"{topic}-7",
        3,
        b"gone",
        b"k",
        headers=[("esm-replay-count", b"1"), ("h", b"x")],
        meta=KafkaMeta(topic, 7),  # a partition the topic no longer has
    )
    elsewhere = Record("old-topic-0", 4, b"elsewhere", None, meta=KafkaMeta("old-topic", 0))
    try:
        publisher.publish([gone, elsewhere], 2)
    finally:
        publisher.close()
    got = {m.value(): m for m in read_topic(bootstrap, topic)}
    assert set(got) == {b"gone", b"elsewhere"}
    assert got[b"gone"].key() == b"k" and got[b"gone"].partition() in (0, 1)
    assert got[b"gone"].headers() == [("h", b"x"), ("esm-replay-count", b"2")]
    assert got[b"elsewhere"].headers() == [("esm-replay-count", b"2")]

    # A dead-letter topic that does not exist (yet) holds no letters, and reading it creates
    # nothing.
    assert mapping.destination_config is not None
    dst = mapping.destination_config.on_failure
    assert isinstance(dst, kafka_cfg.KafkaDestination)
    store = KafkaDeadLetterStore(dst, mapping)
    try:
        assert list(store.pending()) == []
    finally:
        store.close()
    assert not topic_exists(bootstrap, dst.topic)
