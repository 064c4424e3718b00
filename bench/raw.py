"""The physical limit: each broker's client library in a tight loop that parses every value with
orjson and checkpoints every batch. Run as `python -m bench.raw SPEC_JSON`; prints one JSON line.

The clock starts when the first batch arrives and stops after the last checkpoint is sent, as
the engine's measurement runs from its first invocation to its last.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import sys
import time
from typing import Any

import orjson

from bench.common import BATCH, PREFETCH

TIMEOUT_S = 120.0


def raw_kafka(spec: dict[str, Any]) -> dict[str, Any]:
    from confluent_kafka import Consumer

    n = spec["records"]
    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": spec["session_ms"],
            "heartbeat.interval.ms": 500,
            # librdkafka's 1 s fetch backoff once its local queue is full would make the
            # ceiling depend on luck (see bench/README.md).
            "fetch.queue.backoff.ms": 10,
        }
    )
    consumer.subscribe([spec["topic"]])
    with_event = spec.get("event", False)
    loads = orjson.loads
    count = 0
    first = 0.0
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while count < n and time.monotonic() < deadline:
            messages = consumer.consume(BATCH, 1.0)
            if not messages:
                continue
            if not first:
                first = time.time()
            for m in messages:
                if m.error() is None:
                    loads(m.value() or b"")
                    count += 1
            if with_event:
                _noop(kafka_event(messages, spec["bootstrap"]), None)
            consumer.commit(asynchronous=True)
        last = time.time()
    finally:
        consumer.close()
    return {"records": count, "first": first, "last": last}


def raw_redis(spec: dict[str, Any]) -> dict[str, Any]:
    import redis

    n = spec["records"]
    stream, group = spec["stream"], spec["group"]
    client = redis.Redis.from_url(spec["url"], socket_timeout=30)
    client.xgroup_create(stream, group, id="0")
    with_event = spec.get("event", False)
    loads = orjson.loads
    count = 0
    first = 0.0
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while count < n and time.monotonic() < deadline:
            reply: Any = client.xreadgroup(group, "raw", {stream: ">"}, count=BATCH, block=1000)
            if not reply:
                continue
            if not first:
                first = time.time()
            ids = []
            for _name, entries in reply:
                for entry_id, fields in entries:
                    loads(fields[b"v"])
                    ids.append(entry_id)
            if with_event:
                _noop(redis_event(reply), None)
            count += len(ids)
            client.xack(stream, group, *ids)
        last = time.time()
    finally:
        client.close()
    return {"records": count, "first": first, "last": last}


def raw_rabbitmq(spec: dict[str, Any]) -> dict[str, Any]:
    import pika

    n = spec["records"]
    params = pika.URLParameters(spec["url"])
    params.client_properties = {"connection_name": "esm-bench raw"}
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=PREFETCH)
    loads = orjson.loads
    state = {"count": 0, "first": 0.0}

    with_event = spec.get("event", False)
    held: list[tuple[Any, Any, bytes]] = []

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        if not state["first"]:
            state["first"] = time.time()
        loads(body)
        state["count"] += 1
        if with_event:
            held.append((method, properties, body))
        if state["count"] % BATCH == 0 or state["count"] == n:
            if with_event:
                _noop(rabbitmq_event(held, spec["queue"]), None)
                held.clear()
            ch.basic_ack(method.delivery_tag, multiple=True)

    channel.basic_consume(spec["queue"], on_message)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while state["count"] < n and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.5)
        last = time.time()
    finally:
        connection.close()
    return {"records": state["count"], "first": state["first"], "last": last}


def raw_kombu(spec: dict[str, Any]) -> dict[str, Any]:
    from kombu.connection import Connection
    from kombu.entity import Queue
    from kombu.messaging import Consumer

    n = spec["records"]
    loads = orjson.loads
    state = {"count": 0, "first": 0.0}

    def on_message(message: Any) -> None:
        if not state["first"]:
            state["first"] = time.time()
        loads(message.body)
        state["count"] += 1
        if state["count"] % BATCH == 0 or state["count"] == n:
            message.ack(multiple=True)

    deadline = time.monotonic() + TIMEOUT_S
    with Connection(spec["url"]) as connection:
        channel = connection.channel()
        # The queue exists (filled by the bench): declaring it with kombu's defaults would fail.
        queue = Queue(spec["queue"], no_declare=True)
        consumer = Consumer(channel, queues=[queue], on_message=on_message, prefetch_count=PREFETCH)
        consumer.consume()
        while state["count"] < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):  # nothing arrived within 0.5 s
                connection.drain_events(timeout=0.5)
        last = time.time()
    return {"records": state["count"], "first": state["first"], "last": last}


def raw_sqs(spec: dict[str, Any]) -> dict[str, Any]:
    import boto3

    n = spec["records"]
    url = spec["queue_url"]
    client = boto3.client("sqs", endpoint_url=spec["endpoint"], region_name=spec["region"])
    loads = orjson.loads
    count = 0
    first = 0.0
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while count < n and time.monotonic() < deadline:
            reply = client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            messages = reply.get("Messages", [])
            if not messages:
                continue
            if not first:
                first = time.time()
            for m in messages:
                loads(m["Body"])
            done = client.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)
                ],
            )
            if done.get("Failed"):
                raise RuntimeError(f"DeleteMessageBatch failed: {done['Failed'][:2]}")
            count += len(messages)
        last = time.time()
    finally:
        client.close()
    return {"records": count, "first": first, "last": last}


# --- the least a Lambda-compatible runtime must do per batch: Lambda's event and a call ------


def _noop(event: dict[str, Any], context: Any) -> None:
    return None


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def kafka_event(messages: list[Any], bootstrap: str) -> dict[str, Any]:
    records: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        if m.error() is not None:
            continue
        topic, partition = m.topic(), m.partition()
        ts_type, ts = m.timestamp()
        key = m.key()
        item = {
            "topic": topic,
            "partition": partition,
            "offset": m.offset(),
            "timestamp": ts,
            "timestampType": "CREATE_TIME" if ts_type == 1 else "LOG_APPEND_TIME",
            "value": _b64(m.value() or b""),
            "headers": [{k: list(v or b"")} for k, v in m.headers() or []],
        }
        if key is not None:
            item["key"] = _b64(key)
        records.setdefault(f"{topic}-{partition}", []).append(item)
    return {"eventSource": "SelfManagedKafka", "bootstrapServers": bootstrap, "records": records}


def redis_event(reply: Any) -> dict[str, Any]:
    records: dict[str, list[dict[str, Any]]] = {}
    for raw_stream, entries in reply:
        stream = raw_stream.decode()
        items = records.setdefault(stream, [])
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            items.append(
                {
                    "stream": stream,
                    "id": entry_id,
                    "timestamp": int(entry_id.partition("-")[0]),
                    "fields": {k.decode(): _b64(v) for k, v in fields.items()},
                }
            )
    return {"eventSource": "redis:streams", "records": records}


def rabbitmq_event(held: list[tuple[Any, Any, bytes]], queue: str) -> dict[str, Any]:
    items = []
    for method, props, body in held:
        items.append(
            {
                "basicProperties": {
                    "contentType": props.content_type,
                    "contentEncoding": props.content_encoding,
                    "headers": props.headers,
                    "deliveryMode": props.delivery_mode,
                    "priority": props.priority,
                    "correlationId": props.correlation_id,
                    "replyTo": props.reply_to,
                    "expiration": props.expiration,
                    "messageId": props.message_id,
                    "timestamp": props.timestamp,
                    "type": props.type,
                    "userId": props.user_id,
                    "appId": props.app_id,
                    "clusterId": props.cluster_id,
                    "bodySize": len(body),
                },
                "redelivered": method.redelivered,
                "data": _b64(body),
                "deliveryTag": method.delivery_tag,
            }
        )
    return {"eventSource": "aws:rmq", "rmqMessagesByQueue": {f"{queue}::/": items}}


LOOPS = {
    "kafka": raw_kafka,
    "redis": raw_redis,
    "rabbitmq": raw_rabbitmq,
    "kombu": raw_kombu,
    "sqs": raw_sqs,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(LOOPS[spec["broker"]](spec)))


if __name__ == "__main__":
    main()
