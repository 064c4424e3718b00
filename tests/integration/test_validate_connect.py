"""`workers validate --connect` checks each mapping's on-failure destination as well as its
source: a dead-letter topic, queue or exchange that does not exist, a key of the wrong type or a
directory that cannot be written is reported before `run` would stall on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pika
import pytest
import redis

from tests import brokers

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def validate(
    tmp_path: Path, source: str, destination: str, extra: str = ""
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mappings.yaml"
    config.write_text(
        f"""
functions:
  f: {{handler: "tests.handlers.misbehaving:noop"}}
event_source_mappings:
  - name: m
    function: f
    source: {source}
    destination_config:
      on_failure: {destination}
{extra}
"""
    )
    return subprocess.run(
        [sys.executable, "-m", "workers", "validate", str(config), "--connect"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.redis
def test_file_destination(redis_url: str, tmp_path: Path) -> None:
    source = f"{{type: redis, url: '{redis_url}', streams: [{brokers.unique_name('s')}]}}"
    ok = validate(tmp_path, source, f"{{type: file, path: '{tmp_path / 'letters'}'}}")
    assert ok.returncode == 0, ok.stderr
    assert f"m: on-failure destination: directory '{tmp_path / 'letters'}' is writable" in ok.stdout

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = validate(tmp_path, source, f"{{type: file, path: '{blocker / 'letters'}'}}")
    assert bad.returncode == 1
    assert "cannot take letters: Not a directory" in bad.stderr


@pytest.mark.kafka
def test_kafka_destination(kafka_broker: brokers.Tansu, tmp_path: Path) -> None:
    topic = kafka_broker.create_topic(brokers.unique_name("src"))
    source = f"{{type: kafka, bootstrap_servers: '{kafka_broker.bootstrap}', topics: [{topic}]}}"
    missing = brokers.unique_name("dlq")
    bad = validate(tmp_path, source, f"{{type: kafka, topic: {missing}}}")
    assert bad.returncode == 1
    assert f"dead-letter topic '{missing}'" in bad.stderr

    kafka_broker.create_topic(missing)
    ok = validate(tmp_path, source, f"{{type: kafka, topic: {missing}}}")
    assert ok.returncode == 0, ok.stderr
    assert f"topic '{missing}' at {kafka_broker.bootstrap} exists" in ok.stdout


@pytest.mark.rabbitmq
def test_rabbitmq_destination(rabbitmq_url: str, tmp_path: Path) -> None:
    queue, letters = brokers.unique_name("q"), brokers.unique_name("dlq")
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    channel = connection.channel()
    channel.queue_declare(queue)
    try:
        source = f"{{type: rabbitmq, url: '{rabbitmq_url}', queue: {queue}}}"
        destination = f"{{type: rabbitmq, url: '{rabbitmq_url}', routing_key: {letters}}}"
        bad = validate(tmp_path, source, destination)
        assert bad.returncode == 1
        assert f"no queue '{letters}'" in bad.stderr
        assert "guest:guest@" not in bad.stderr

        channel.queue_declare(letters)
        ok = validate(tmp_path, source, destination)
        assert ok.returncode == 0, ok.stderr
        assert f"m: on-failure destination: queue '{letters}'" in ok.stdout
    finally:
        channel.queue_delete(queue)
        channel.queue_delete(letters)
        connection.close()


@pytest.mark.redis
def test_redis_destination(redis_url: str, tmp_path: Path) -> None:
    stream, key = brokers.unique_name("s"), brokers.unique_name("dlq")
    source = f"{{type: redis, url: '{redis_url}', streams: [{stream}]}}"
    destination = f"{{type: redis, url: '{redis_url}', stream: {key}}}"
    client = redis.Redis.from_url(redis_url)
    try:
        ok = validate(tmp_path, source, destination)
        assert ok.returncode == 0, ok.stderr
        assert f"stream '{key}'" in ok.stdout
        client.set(key, "not a stream")
        bad = validate(tmp_path, source, destination)
        assert bad.returncode == 1
        assert f"key '{key}' is a string, not a stream" in bad.stderr
    finally:
        client.delete(key, stream)
        client.close()


@pytest.mark.sqs
def test_sqs_queue_whose_redrive_policy_cuts_the_retries_short(
    sqs_server: brokers.MotoServer, tmp_path: Path
) -> None:
    client = sqs_server.client()
    dead = sqs_server.create_queue(brokers.unique_name("sqs-dead"))
    arn = client.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]
    redrive = json.dumps({"deadLetterTargetArn": arn["QueueArn"], "maxReceiveCount": 3})
    queue = sqs_server.create_queue(brokers.unique_name("sqs"), RedrivePolicy=redrive)
    letters = sqs_server.create_queue(brokers.unique_name("sqs-letters"))
    source = f"{{type: sqs, queue_url: '{queue}'}}"
    destination = f"{{type: sqs, queue_url: '{letters}'}}"
    name = queue.rsplit("/", 1)[1]

    # Four attempts, one receive each, but SQS moves the message after its third receive.
    short = validate(tmp_path, source, destination, "    maximum_retry_attempts: 3")
    assert short.returncode == 0, short.stderr
    assert (
        f"warning: mapping 'm': queue {name}'s redrive policy (maxReceiveCount) is 3, but the"
        " mapping tries a failing record up to 4 times (maximum_retry_attempts 3), one delivery"
        " each: the broker takes the record away after 3, before the mapping's last retries and"
        " before it can reach the on-failure destination; raise it to at least 4 or lower"
        " maximum_retry_attempts"
    ) in short.stdout
    enough = validate(tmp_path, source, destination, "    maximum_retry_attempts: 2")
    assert enough.returncode == 0, enough.stderr
    assert "maxReceiveCount" not in enough.stdout
