"""The connector registry: found through entry points, without importing any broker client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from workers.app.config import parse_config
from workers.app.registry import connectors, shape_for_event

config = parse_config('''
functions: {f: {handler: "tests.handlers.misbehaving:ok"}}
event_source_mappings:
  - {name: k, function: f, source: {type: kafka, bootstrap_servers: "h:1", topics: [t]}}
  - {name: r, function: f, source: {type: rabbitmq, url: "amqp://h/", queue: q}}
  - {name: s, function: f, source: {type: redis, url: "redis://h/0", streams: [s]}}
  - {name: q, function: f, source: {type: sqs, queue_url: "https://sqs.eu-west-1.amazonaws.com/1/q"}}
  - {name: b, function: f, source: {type: kombu, url: "amqp://h//", queue: q}}
''')
shape_for_event({"eventSource": "aws:rmq"})
shape_for_event({"Records": [{"eventSource": "aws:sqs"}]})
shape_for_event({"Records": [{"eventSource": "kombu:amqp"}]})
print(",".join(sorted(connectors())))
drivers = ("confluent_kafka", "pika", "redis", "boto3", "botocore", "kombu")
print(",".join(m for m in drivers if m in sys.modules))
"""


def test_connectors_are_registered_and_no_driver_is_imported_until_one_is_opened() -> None:
    # In a process of its own: the test process has imported every driver long before.
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    names, drivers = done.stdout.splitlines()
    assert names == "file,kafka,kombu,memory,rabbitmq,redis,sqs"
    assert drivers == ""  # a Kafka-only deployment needs neither pika nor redis-py
