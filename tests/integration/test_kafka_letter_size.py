"""Letters larger than the Kafka destination takes (issue 12, case 1), end to end with `workers
run --until-idle` against a Kafka-protocol broker (Tansu).

Before, a failing batch of 100 x 10 KB records (bisect off) or a failing 3 MB record became a
letter over the producer's message.max.bytes (1,000,000 by default), retried forever: the offset
never moved and the run never returned. Now the batch goes as one letter per record, the record
too large alone goes without its payload, and the partition moves on. A second mapping writes to
a topic whose max.message.bytes (read with DescribeConfigs) is lower than the producer's limit:
Tansu reports that setting but does not enforce it, so only the engine keeps letters under it.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from connectors.kafka import config as kafka_cfg
from connectors.kafka.destination import LETTER_ENVELOPE_BYTES, KafkaDestination
from connectors.kafka.producer import KafkaRecordTooLarge
from tests import brokers
from tests.brokers import KafkaRecord, Tansu, committed_offsets, read_topic
from tests.cli import workers_run
from workers.app import config as cfg
from workers.engine.ports import LetterTooLarge

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
# A short session: Tansu joins a member after half of it (tests/brokers.py).
CLIENT_CONFIG = dict(brokers.KAFKA_TEST_SESSION)
# The unfixed engine never returned; the fixed run takes well under this.
RUN_TIMEOUT_S = 150.0
TOPIC_LIMIT_BYTES = 100_000


def padded(prefix: str, size: int) -> bytes:
    return prefix.encode().ljust(size, b".")


@dataclass
class Run:
    bootstrap: str
    source: str  # "issue": 100 failing 10 KB records, then a failing 3 MB one, with good ones
    dlq: str
    group: str
    limited_source: str  # "topic-limit": into a topic with max.message.bytes 100000
    limited_dlq: str
    limited_group: str
    summary: dict[str, Any]
    log: str
    handled: set[tuple[str, int]]
    config: Path


def letters(bootstrap: str, topic: str) -> list[tuple[int, dict[str, Any]]]:
    """(bytes, letter) of every record in the dead-letter topic, in order."""
    return [
        (len(m.value() or b""), orjson.loads(m.value() or b""))
        for m in read_topic(bootstrap, topic)
    ]


def payload_offsets(letter: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (unit, item["offset"])
        for unit, items in letter["payload"]["records"].items()
        for item in items
    ]


@pytest.fixture(scope="module")
def run(kafka_broker: Tansu, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    bootstrap = kafka_broker.bootstrap
    tmp = tmp_path_factory.mktemp("letter-size")
    source, dlq = brokers.unique_name("big-src"), brokers.unique_name("big-dlq")
    limited_source, limited_dlq = brokers.unique_name("lim-src"), brokers.unique_name("lim-dlq")
    group, limited_group = brokers.unique_name("big"), brokers.unique_name("lim")
    brokers.create_topic(bootstrap, source, 2)
    brokers.create_topic(bootstrap, dlq, 1)
    brokers.create_topic(bootstrap, limited_source, 1)
    brokers.create_topic(
        bootstrap, limited_dlq, 1, config={"max.message.bytes": str(TOPIC_LIMIT_BYTES)}
    )
    # Partition 0: a batch of 100 failing records whose one letter (1.35 MB) is over the
    # producer's limit, then good ones. Partition 1: a failing 3 MB record, then good ones of
    # 300 KB, so that maximum_batch_bytes keeps the failing one in a batch of its own.
    records = [KafkaRecord(padded(f"fail-{i}", 10_000), partition=0) for i in range(100)]
    records += [KafkaRecord(padded(f"ok-{i}", 100), partition=0) for i in range(5)]
    records += [KafkaRecord(padded("fail-huge", 3_000_000), partition=1)]
    records += [KafkaRecord(padded(f"ok-{i}", 300_000), partition=1) for i in range(5)]
    brokers.produce(bootstrap, source, records, config={"message.max.bytes": 10_000_000})
    # Ten failing records (one letter of 135 KB), good ones, then a record over
    # maximum_batch_bytes whose letter (800 KB) the producer would take but the topic not.
    limited = [KafkaRecord(padded(f"fail-{i}", 10_000)) for i in range(10)]
    limited += [KafkaRecord(padded(f"ok-{i}", 100)) for i in range(3)]
    limited += [KafkaRecord(padded("big", 600_000))]
    limited += [KafkaRecord(padded(f"ok-{i}", 100)) for i in range(3, 6)]
    brokers.produce(bootstrap, limited_source, limited)

    out = tmp / "handled.txt"
    config, summary = tmp / "esm.yaml", tmp / "summary.json"

    def mapping(name: str, topic: str, group_id: str, dlq_topic: str, **extra: Any) -> Any:
        return {
            "name": name,
            "function": "fail_marked",
            "source": {
                "type": "kafka",
                "bootstrap_servers": bootstrap,
                "topics": [topic],
                "consumer_group_id": group_id,
                "client_config": CLIENT_CONFIG,
            },
            "bisect_batch_on_function_error": False,
            "maximum_retry_attempts": 0,
            "destination_config": {"on_failure": {"type": "kafka", "topic": dlq_topic}},
            **extra,
        }

    config.write_text(
        yaml.safe_dump(
            {
                "functions": {
                    "fail_marked": {
                        "handler": "tests.handlers.letter_size_handlers:fail_marked",
                        "isolation": "thread",
                        "environment": {"LETTERS_OUT": str(out)},
                    }
                },
                "event_source_mappings": [
                    mapping(
                        "issue",
                        source,
                        group,
                        dlq,
                        batch_size=100,
                        maximum_batching_window_s=2.0,
                        maximum_batch_bytes=4_300_000,
                    ),
                    mapping(
                        "topic-limit",
                        limited_source,
                        limited_group,
                        limited_dlq,
                        batch_size=10,
                        maximum_batching_window_s=1.0,
                        maximum_batch_bytes=300_000,
                    ),
                ],
            }
        )
    )
    # A session of its own, so that a run that does not return is killed with its pollers.
    proc = subprocess.Popen(
        workers_run(config, summary),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, log = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, log = proc.communicate()
        pytest.fail(f"workers run did not return within {RUN_TIMEOUT_S:.0f}s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-4000:]
    handled = set()
    for line in out.read_text().splitlines() if out.exists() else []:
        unit, offset = line.split()
        handled.add((unit, int(offset)))
    yield Run(
        bootstrap,
        source,
        dlq,
        group,
        limited_source,
        limited_dlq,
        limited_group,
        orjson.loads(summary.read_bytes()),
        log,
        handled,
        config,
    )


def test_a_batch_and_a_record_too_large_for_a_letter_never_stall_the_partition(run: Run) -> None:
    stored = [letter for _, letter in letters(run.bootstrap, run.dlq)]
    with_payload = [letter for letter in stored if "payload" in letter]
    omitted = [letter for letter in stored if letter.get("payloadOmitted")]
    p0, p1 = f"{run.source}-0", f"{run.source}-1"

    # The batch: one letter per record, in order, each with its record.
    assert [payload_offsets(letter) for letter in with_payload] == [[(p0, n)] for n in range(100)]
    assert all(
        letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
        and letter["error"]["errorType"] == "ValueError"
        for letter in with_payload
    )
    item = with_payload[0]["payload"]["records"][p0][0]
    assert base64.b64decode(item["value"]) == padded("fail-0", 10_000)
    # The 3 MB record: its letter without payload, with its coordinates and its error.
    [huge] = omitted
    assert "payload" not in huge
    assert huge["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    assert huge["omitted"]["condition"] == "RetryAttemptsExhausted"
    assert huge["omitted"]["itemIdentifier"] == {"partition": p1, "offset": 0}
    assert huge["KafkaBatchInfo"]["recordsInfo"][p1]["firstRecordOffset"] == "0"
    assert huge["error"]["errorType"] == "ValueError"
    assert f"{p1}@0" in huge["error"]["errorMessage"]
    assert f"{p1}@0" in run.log and "without its payload" in run.log

    # The partitions moved on: the good records after them were handled, offsets committed.
    assert {(p0, n) for n in range(100, 105)} | {(p1, n) for n in range(1, 6)} <= run.handled
    assert committed_offsets(run.bootstrap, run.group, run.source) == {0: 105, 1: 6}
    counts = run.summary["issue"]
    assert counts["dead_lettered"] == 101
    assert counts["payload_omitted"] == 1
    assert counts["succeeded"] == 10


def test_letters_stay_under_the_topics_max_message_bytes(run: Run) -> None:
    stored = letters(run.bootstrap, run.limited_dlq)
    unit = f"{run.limited_source}-0"

    assert all(size <= TOPIC_LIMIT_BYTES for size, _ in stored)
    with_payload = [letter for _, letter in stored if "payload" in letter]
    assert [payload_offsets(letter) for letter in with_payload] == [[(unit, n)] for n in range(10)]
    [big] = [letter for _, letter in stored if letter.get("payloadOmitted")]
    assert big["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    assert big["omitted"]["condition"] == "MaximumPayloadSizeExceeded"
    assert big["omitted"]["itemIdentifier"] == {"partition": unit, "offset": 13}
    assert big["omitted"]["limitBytes"] < TOPIC_LIMIT_BYTES

    assert {(unit, n) for n in [10, 11, 12, 14, 15, 16]} <= run.handled
    assert committed_offsets(run.bootstrap, run.limited_group, run.limited_source) == {0: 17}
    counts = run.summary["topic-limit"]
    assert counts["dead_lettered"] == 11 and counts["payload_omitted"] == 1


def test_the_destination_states_its_limit_and_refuses_a_letter_over_it(
    kafka_broker: Tansu,
) -> None:
    bootstrap = kafka_broker.bootstrap
    source, dlq = brokers.unique_name("dst-src"), brokers.unique_name("dst-dlq")
    brokers.create_topic(bootstrap, dlq, 1)
    mapping = cfg.EventSourceMapping.model_validate(
        {
            "name": "sized",
            "function": "fn",
            "source": {"type": "kafka", "bootstrap_servers": bootstrap, "topics": [source]},
            "destination_config": {
                "on_failure": {
                    "type": "kafka",
                    "topic": dlq,
                    "client_config": {"message.max.bytes": 50_000},
                }
            },
        }
    )
    assert mapping.destination_config is not None
    dst = mapping.destination_config.on_failure
    assert isinstance(dst, kafka_cfg.KafkaDestination)
    destination = KafkaDestination(dst, mapping)
    try:
        # Tansu keeps no max.message.bytes for this topic: the producer's limit is what holds.
        assert destination.max_letter_bytes() == 50_000 - LETTER_ENVELOPE_BYTES
        with pytest.raises(LetterTooLarge) as refused:
            destination.deliver({"requestContext": {"requestId": "big"}, "x": "y" * 60_000}, [])
        assert refused.value.limit_bytes is not None and refused.value.limit_bytes < 50_000
        destination.deliver({"requestContext": {"requestId": "small"}}, [])
        # librdkafka's own refusal (past the check above) is a refusal for size, not an outage.
        with pytest.raises(KafkaRecordTooLarge):
            destination._sender.send([{"topic": dlq, "value": b"y" * 60_000}], dlq)
    finally:
        destination.close()
    assert [orjson.loads(m.value() or b"") for m in read_topic(bootstrap, dlq)] == [
        {"requestContext": {"requestId": "small"}}
    ]


def cli(*args: str) -> tuple[str, str]:
    """stdout and stderr of `workers ARGS`, which must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


def test_dlq_lists_and_shows_a_letter_without_payload_and_replay_skips_it(run: Run) -> None:
    config, unit = str(run.config), f"{run.limited_source}-0"
    listed, _ = cli("dlq", "list", config, "topic-limit", "--json")
    rows = [orjson.loads(line) for line in listed.splitlines()]
    assert len(rows) == 11
    [row] = [r for r in rows if r["condition"] == "MaximumPayloadSizeExceeded"]
    assert row["source"] == f"{unit}@13 (no payload)" and row["records"] == 1

    shown, _ = cli("dlq", "show", config, "topic-limit", row["id"])
    assert orjson.loads(shown)["omitted"]["itemIdentifier"] == {"partition": unit, "offset": 13}

    out, log = cli("dlq", "replay", config, "topic-limit", "--dry-run")
    assert f"{row['id']} cannot be replayed" in log and f"{unit}@13" in log
    summary = orjson.loads(out.strip().splitlines()[-1])
    assert summary["letters"] == 10 and summary["skipped_no_payload"] == 1
