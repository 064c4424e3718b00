"""Under process isolation the poller ships a batch packed in columns, and the environment
builds the event from them: the handler must get exactly the event the shape builds itself."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pika
import pytest

from connectors.kafka.shape import KafkaMeta, KafkaShape
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape, basic_properties
from connectors.redis.shape import RedisMeta, RedisShape
from workers.engine.invoker import PackedEvent, unpack
from workers.engine.ports import PackingShape
from workers.engine.records import Record


def kafka_records() -> list[Record]:
    a, b = KafkaMeta("orders", 0), KafkaMeta("orders", 3, "LOG_APPEND_TIME")
    return [
        Record("orders-0", 7, b'{"n": 1}', b"k1", 1_700_000_000_001, [("h", b"\x00\xff")], meta=a),
        Record("orders-3", 2, b"", None, 1_700_000_000_002, (), meta=b),
        Record("orders-0", 8, b"\xff\xfe binary", b"", 0, [("a", b""), ("a", b"x")], meta=a),
    ]


def one_partition() -> list[Record]:
    """A batch as the poller makes them: one partition, one metadata object."""
    meta = KafkaMeta("orders", 1)
    return [
        Record("orders-1", n, b'{"n": %d}' % n, b"k", 1_700_000_000_000 + n, (), meta=meta)
        for n in range(5)
    ]


def one_partition_keyed_with_headers() -> list[Record]:
    """Every record keyed (an empty key too), some with headers."""
    meta = KafkaMeta("orders", 2)
    return [
        Record("orders-2", 1, b"a", b"k1", 1, [("h", b"\x00\xff"), ("h", b"")], meta=meta),
        Record("orders-2", 2, b"", b"", 2, (), meta=meta),
        Record("orders-2", 3, b"\xff", b"k3", 3, [("trace", b"abc")], meta=meta),
    ]


def mixed_timestamp_types() -> list[Record]:
    """One partition whose records change timestamp type midway (a topic reconfigured)."""
    create, append = KafkaMeta("orders", 1), KafkaMeta("orders", 1, "LOG_APPEND_TIME")
    return [
        Record("orders-1", 1, b"a", None, 1, (), meta=create),
        Record("orders-1", 2, b"b", None, 2, (), meta=append),
        Record("orders-1", 3, b"c", None, 3, (), meta=create),
    ]


def redis_records() -> list[Record]:
    def entry(stream: str, entry_id: str, fields: dict[str, bytes]) -> Record:
        ms = int(entry_id.split("-")[0])
        return Record(stream, ms, b"", timestamp_ms=ms, meta=RedisMeta(stream, entry_id, fields))

    return [
        entry("s1", "1700000000000-0", {"k": b"1", "v": b'{"n": 1}'}),
        entry("s2", "1700000000001-5", {"b64:/w==": b"\xff", "empty": b""}),
        entry("s1", "1700000000002-0", {}),
    ]


def redis_one_stream() -> list[Record]:
    """One stream, fields as the source keeps them (flat) and by name, as the poller batches."""

    def entry(entry_id: str, flat: list[bytes] | None, fields: dict[str, bytes] | None) -> Record:
        ms = int(entry_id.split("-")[0])
        meta = RedisMeta("s1", entry_id, fields, flat)
        return Record("s1", ms, b"", timestamp_ms=ms, meta=meta)

    return [
        entry("1700000000000-0", [b"k", b"1", b"v", b'{"n": 1}'], None),
        entry("1700000000001-0", [b"\xff", b"x", b"v", b"2", b"extra", b""], None),
        entry("1700000000002-0", [], None),
        entry("1700000000003-0", None, {"k": b"4", "v": b"\x00"}),
    ]


def rabbitmq_records(queues: tuple[tuple[str, str], ...]) -> list[Record]:
    """Deliveries with and without properties, nested and odd headers, redelivered or not."""
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    headers = {"s": "é", "b": b"\xff", "n": 7, "f": Decimal("1.5"), "t": when, "d": {"x": [1, "y"]}}
    props = [
        pika.BasicProperties(),
        pika.BasicProperties(content_type="application/json", message_id="m1", timestamp=1),
        pika.BasicProperties(headers=headers, delivery_mode=2, priority=3, app_id="app"),
    ]
    out = []
    for n, (queue, vhost) in enumerate(queues):
        body = b'{"n": %d}' % n if n % 2 else b"\x00\xff binary"
        meta = RabbitMeta(queue, vhost, n + 1, basic_properties(props[n % 3], len(body)))
        out.append(Record(queue, n, body, redelivered=n == 1, meta=meta))
    return out


@pytest.mark.parametrize(
    ("shape", "records"),
    [
        (KafkaShape("127.0.0.1:9092"), kafka_records()),
        (KafkaShape("b:9092", "arn:aws:kafka:us-east-1:1:cluster/c/u"), kafka_records()),
        (KafkaShape("127.0.0.1:9092"), one_partition()),
        (KafkaShape("127.0.0.1:9092"), mixed_timestamp_types()),
        (KafkaShape("127.0.0.1:9092"), one_partition_keyed_with_headers()),
        (RedisShape("127.0.0.1:6379/0"), redis_records()),
        (RedisShape("127.0.0.1:6379/0"), redis_one_stream()),
        (RabbitShape("127.0.0.1:5672"), rabbitmq_records((("q", "/"),) * 4)),
        (RabbitShape("127.0.0.1:5672"), rabbitmq_records((("a", "/"), ("b", "/"), ("a", "v")))),
    ],
    ids=[
        "kafka",
        "msk",
        "kafka-one-partition",
        "kafka-timestamp-types",
        "kafka-keyed-headers",
        "redis",
        "redis-one-stream",
        "rabbitmq-one-queue",
        "rabbitmq-queues",
    ],
)
def test_the_environment_builds_the_event_the_shape_builds(
    shape: PackingShape, records: list[Record]
) -> None:
    built = unpack(PackedEvent(shape.unpacker, shape.pack(records)))
    assert built == shape.event(records)  # type: ignore[attr-defined]
    # Unpacking twice gives two events that share nothing a handler could change.
    again = unpack(PackedEvent(shape.unpacker, shape.pack(records)))
    items = "rmqMessagesByQueue" if isinstance(shape, RabbitShape) else "records"
    first = next(iter(built[items].values()))[0]
    first["changed"] = True
    assert "changed" not in next(iter(again[items].values()))[0]
    if isinstance(shape, RabbitShape):
        first["basicProperties"]["changed"] = True
        assert "changed" not in next(iter(again[items].values()))[0]["basicProperties"]


def test_a_batch_of_one_record_per_unit_keeps_record_order_within_each_unit() -> None:
    shape = KafkaShape("127.0.0.1:9092")
    records = kafka_records()
    event = unpack(PackedEvent(shape.unpacker, shape.pack(records)))
    assert [item["offset"] for item in event["records"]["orders-0"]] == [7, 8]
    assert [item["offset"] for item in event["records"]["orders-3"]] == [2]
