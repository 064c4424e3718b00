"""Every example under examples/ runs against its real broker: good orders handled, the bad one
in the dead-letter file. Each runs in a copy of its folder, as a user would run it there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest
import redis

from tests import brokers

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
BAD_ID = 7
ORDERS = [
    {
        "id": i,
        "amount": -5.0 if i == BAD_ID else 10.0 + i,
        "currency": "XXX" if i == BAD_ID else "EUR",
    }
    for i in range(1, 13)
]

pytestmark = pytest.mark.integration


def run_example(name: str, tmp_path: Path, environ: dict[str, str]) -> dict[str, Any]:
    """`workers run mappings.yaml --until-idle` in a copy of examples/NAME: its summary, with
    the letters of its dead-letter file."""
    folder = shutil.copytree(EXAMPLES / name, tmp_path / name)
    summary = tmp_path / "summary.json"
    command = [sys.executable, "-m", "workers", "run", "mappings.yaml", "--until-idle", "2"]
    done = subprocess.run(
        [*command, "--summary-json", str(summary)],
        cwd=folder,
        env={**os.environ, **environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    stats: dict[str, Any] = next(iter(orjson.loads(summary.read_bytes()).values()))
    stats["letters"] = [
        orjson.loads(line)
        for path in (folder / "dead-letters").glob("*.jsonl")
        for line in path.read_bytes().splitlines()
    ]
    return stats


def assert_bad_order_dead_lettered(stats: dict[str, Any]) -> None:
    from workers.events import records

    assert stats["succeeded"] == len(ORDERS) - 1, stats
    assert stats["dead_lettered"] == 1, stats
    ids = [r.json()["id"] for letter in stats["letters"] for r in records(letter["payload"])]
    assert ids == [BAD_ID]


def payloads() -> list[bytes]:
    return [json.dumps(order).encode() for order in ORDERS]


@pytest.mark.kafka
@pytest.mark.parametrize("example", ["quickstart", "powertools"])
def test_kafka_examples(example: str, kafka_broker: brokers.Tansu, tmp_path: Path) -> None:
    topic = kafka_broker.create_topic(brokers.unique_name("orders"))
    records = [brokers.KafkaRecord(value=v) for v in payloads()]
    brokers.produce(kafka_broker.bootstrap, topic, records)

    stats = run_example(
        example, tmp_path, {"KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "TOPIC": topic}
    )

    assert_bad_order_dead_lettered(stats)


MSK_CLUSTER_ARN = (
    "arn:aws:kafka:eu-west-1:123456789012:cluster/shop/4f2a3b1c-0d9e-4a7b-8c6d-5e4f3a2b1c0d-1"
)


@pytest.mark.kafka
def test_msk_example(kafka_broker: brokers.Tansu, tmp_path: Path) -> None:
    """A handler written for Amazon MSK runs unchanged: Powertools' `KafkaMskEventModel` accepts
    its event, which carries the configured cluster ARN (also in the dead letter's payload)."""
    topic = kafka_broker.create_topic(brokers.unique_name("orders"))
    brokers.produce(
        kafka_broker.bootstrap, topic, [brokers.KafkaRecord(value=v) for v in payloads()]
    )

    stats = run_example(
        "msk",
        tmp_path,
        {
            "KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "TOPIC": topic,
            "MSK_CLUSTER_ARN": MSK_CLUSTER_ARN,
        },
    )

    assert_bad_order_dead_lettered(stats)
    [payload] = [letter["payload"] for letter in stats["letters"]]
    assert payload["eventSource"] == "aws:kafka"
    assert payload["eventSourceArn"] == MSK_CLUSTER_ARN
    assert payload["bootstrapServers"] == kafka_broker.bootstrap


@pytest.mark.rabbitmq
def test_rabbitmq_example(rabbitmq_url: str, tmp_path: Path) -> None:
    queue = brokers.unique_name("orders")
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.confirm_delivery()
        for value in payloads():
            channel.basic_publish("", queue, value, pika.BasicProperties(delivery_mode=2))
        stats = run_example("rabbitmq", tmp_path, {"RABBITMQ_URL": rabbitmq_url, "QUEUE": queue})
        assert_bad_order_dead_lettered(stats)
    finally:
        connection.channel().queue_delete(queue)
        connection.close()


@pytest.mark.redis
def test_redis_example(redis_url: str, tmp_path: Path) -> None:
    stream = brokers.unique_name("orders")
    client = redis.Redis.from_url(redis_url)
    try:
        for value in payloads():
            client.xadd(stream, {"order": value})
        stats = run_example("redis", tmp_path, {"REDIS_URL": redis_url, "STREAM": stream})
        assert_bad_order_dead_lettered(stats)
    finally:
        client.delete(stream)
        client.close()


@pytest.mark.sqs
def test_sqs_example(sqs_server: brokers.MotoServer, tmp_path: Path) -> None:
    queue_url = sqs_server.create_queue(brokers.unique_name("orders"))
    client = sqs_server.client()
    for value in payloads():
        client.send_message(QueueUrl=queue_url, MessageBody=value.decode())
    stats = run_example("sqs", tmp_path, {"QUEUE_URL": queue_url})
    assert_bad_order_dead_lettered(stats)
    # Partial failures honoured: the good orders handled once each, only the bad one retried
    # (twice), as the handler named it by messageId.
    assert stats["invoked"] == len(ORDERS) + 2, stats
    [letter] = stats["letters"]
    assert letter["requestContext"]["approximateInvokeCount"] == 3
    # Every message settled: deleted, the dead-lettered one too.
    counts = client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == "0"
    assert counts["ApproximateNumberOfMessagesNotVisible"] == "0"
