"""Records no engine path may crash on, against real brokers, through `workers run`: timestamps
past year 9999 (Kafka, Redis entry ids), absurd AMQP timestamps in properties and header fields.
Each good record is handled, the hostile one handled or dead-lettered, and the run exits 0."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pika
import pika.data
import pytest
import redis
import yaml

from tests import brokers
from tests.brokers import KafkaRecord, Tansu, read_topic
from tests.cli import run_workers
from tests.engine import kafka_items, rmq_items, value_of

pytestmark = [pytest.mark.integration]

# 2**50 ms is in year 37648; 2**40 s is in year 36812: datetime cannot show either.
ABSURD_MS = 2**50
ABSURD_S = 2**40
# A short session: Tansu joins a member after half of it (tests/brokers.py).
CLIENT_CONFIG: dict[str, Any] = dict(brokers.KAFKA_TEST_SESSION)


def write_config(path: Path, handler: str, environment: dict[str, str], **mapping: Any) -> Path:
    config = {
        "functions": {
            "f": {
                "handler": handler,
                "timeout_s": 10,
                "environment": environment,
            }
        },
        "event_source_mappings": [
            {
                "function": "f",
                "batch_size": 10,
                "maximum_batching_window_s": 0.1,
                "bisect_batch_on_function_error": True,
                "maximum_retry_attempts": 0,
                **mapping,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# --- Kafka ---------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_kafka_record_past_year_9999_is_dead_lettered_and_the_partition_moves_on(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-absurd-ts")
    dlq = f"{name}.dlq"
    brokers.create_topic(bootstrap, name, 1)
    brokers.create_topic(bootstrap, dlq, 1)
    good = [f"g{i}" for i in range(29)]
    records = [KafkaRecord(v, "k") for v in good]
    # The hostile record fails its handler, so its letter (with batch info) must be built too.
    records.insert(7, KafkaRecord("absurd", "k", timestamp_ms=ABSURD_MS))
    brokers.produce(bootstrap, name, records)
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        "tests.handlers.kafka_handlers:record_lines",
        {"KAFKA_OUT": str(out), "KAFKA_POISON": "absurd"},
        name=name,
        source={
            "type": "kafka",
            "bootstrap_servers": bootstrap,
            "topics": [name],
            "client_config": CLIENT_CONFIG,
        },
        destination_config={"on_failure": {"type": "kafka", "topic": dlq}},
    )
    summary = run_workers(config, tmp_path / "summary.json")[name]

    handled = [line.split(" ")[3] for line in out.read_text().splitlines()]
    assert sorted(handled) == sorted(good)
    [message] = read_topic(bootstrap, dlq)
    letter = orjson.loads(message.value() or b"")
    [item] = kafka_items(letter["payload"])
    assert value_of(item) == b"absurd"
    assert item["timestamp"] == ABSURD_MS  # the event keeps the broker's number
    info = letter["KafkaBatchInfo"]["recordsInfo"][f"{name}-0"]
    assert info["firstRecordTimestamp"] == "9999-12-31T23:59:59.999Z"  # clamped for the text
    assert summary["succeeded"] == len(good) and summary["dead_lettered"] == 1


# --- Redis ---------------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_entry_id_past_year_9999_is_dead_lettered_and_the_stream_moves_on(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    stream = brokers.unique_name("redis-absurd-ts")
    dlq = f"{stream}.dlq"
    try:
        good = [brokers.redis_text(client.xadd(stream, {"n": i})) for i in range(7)]
        # The hostile entry fails its handler; every entry after it has an id past year 9999 too.
        client.xadd(stream, {"n": "absurd", "poison": 1}, id=f"{ABSURD_MS}-0")
        good += [brokers.redis_text(client.xadd(stream, {"n": i})) for i in range(7, 29)]
        log = tmp_path / "handled.log"
        config = write_config(
            tmp_path / "config.yaml",
            "tests.handlers.redis_handlers:log_ids",
            {"REDIS_TEST_LOG": str(log)},
            name=stream,
            source={"type": "redis", "url": redis_url, "streams": [stream]},
            destination_config={"on_failure": {"type": "redis", "url": redis_url, "stream": dlq}},
        )
        summary = run_workers(config, tmp_path / "summary.json")[stream]

        handled = [line.split()[2] for line in log.read_text().splitlines()]
        assert handled == good
        letters: Any = client.xrange(dlq)
        [(_, fields)] = letters
        letter = orjson.loads(fields[b"letter"])
        [item] = letter["payload"]["records"][stream]
        assert item["id"] == f"{ABSURD_MS}-0" and item["timestamp"] == ABSURD_MS
        info = letter["RedisStreamBatchInfo"]["streams"][stream]
        assert info["firstRecordTimestamp"] == "9999-12-31T23:59:59.999Z"
        assert summary["succeeded"] == len(good) and summary["dead_lettered"] == 1
        pending: Any = client.xpending(stream, stream)
        assert pending["pending"] == 0
    finally:
        client.delete(stream, dlq)


# --- RabbitMQ ------------------------------------------------------------------------------------


class _RawTimestamp(int):
    """A header value published as an AMQP timestamp field (`T`) of any 64-bit value, which
    pika's encoder (from a datetime) cannot produce past year 9999."""


def _publish_raw_timestamp_headers(channel: Any, queue: str, body: bytes, seconds: int) -> None:
    original: Callable[[list[bytes], Any], int] = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, _RawTimestamp):
            pieces.append(struct.pack(">cQ", b"T", int(value)))
            return 9
        return original(pieces, value)

    pika.data.encode_value = encode_value
    try:
        channel.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(headers={"sent": _RawTimestamp(seconds), "kind": "raw"}),
        )
    finally:
        pika.data.encode_value = original


@pytest.mark.rabbitmq
def test_rabbitmq_absurd_timestamps_in_properties_and_header_fields_reach_the_handler(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    queue = brokers.unique_name("rmq-absurd-ts")
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=False, auto_delete=False)
    try:
        channel.confirm_delivery()
        good = [f"g{i}" for i in range(20)]
        for value in good[:5]:
            channel.basic_publish("", queue, value.encode())
        channel.basic_publish(
            "", queue, b"absurd-property", pika.BasicProperties(timestamp=ABSURD_S)
        )
        for value in good[5:10]:
            channel.basic_publish("", queue, value.encode())
        _publish_raw_timestamp_headers(channel, queue, b"absurd-header", ABSURD_S)
        for value in good[10:]:
            channel.basic_publish("", queue, value.encode())
        out = tmp_path / "events.jsonl"
        config = write_config(
            tmp_path / "config.yaml",
            "tests.handlers.crash_handlers:record_events",
            {"CRASH_EVENTS": str(out)},
            name=queue,
            source={"type": "rabbitmq", "url": rabbitmq_url, "queue": queue},
        )
        summary = run_workers(config, tmp_path / "summary.json")[queue]

        items = [i for line in out.read_text().splitlines() for i in rmq_items(orjson.loads(line))]
        by_value = {value_of(i).decode(): i for i in items}
        assert sorted(by_value) == sorted([*good, "absurd-property", "absurd-header"])
        prop = by_value["absurd-property"]["basicProperties"]
        assert prop["timestamp"] == "Dec 31, 9999, 11:59:59 PM"
        headers = by_value["absurd-header"]["basicProperties"]["headers"]
        assert headers["sent"] == ABSURD_S  # the raw seconds, as pika could not make a date
        assert summary["succeeded"] == len(good) + 2
        declared = channel.queue_declare(queue, passive=True)
        assert declared.method.message_count == 0
    finally:
        channel.queue_delete(queue)
        connection.close()
