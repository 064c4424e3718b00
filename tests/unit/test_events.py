"""`workers.events`: one way to read records of every event shape, and partial responses."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest

from connectors.kafka.shape import KafkaMeta, KafkaShape
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape, basic_properties, record_headers
from connectors.redis.shape import (
    RedisShape,
    entry_value,
    field_bytes,
    field_name,
)
from connectors.redis.source import RedisSource
from workers.app import config as cfg
from workers.engine.outcomes import PartialFailure
from workers.engine.records import Record
from workers.engine.responses import interpret
from workers.events import EventRecord, batch_response, records
from workers.invoke.loading import load_handler

ROOT = Path(__file__).resolve().parents[2]


def test_kafka_records_decoded_and_identified() -> None:
    shape = KafkaShape("b")
    built = [
        Record(
            "t-0",
            4,
            b'{"a": 1}',
            key=b"k",
            timestamp_ms=7,
            headers=[("h", b"1"), ("h", b"2")],
            meta=KafkaMeta("t", 0),
        ),
        Record("t-0", 5, b"plain", meta=KafkaMeta("t", 0)),
    ]
    event = shape.event(built)
    got = list(records(event))
    assert [r.json() if r.key else r.text() for r in got] == [{"a": 1}, "plain"]
    assert got[0].key == b"k" and got[0].header("h") == b"2" and got[0].timestamp_ms == 7
    response = batch_response([got[1]])
    assert response == {
        "batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": 5}}]
    }
    # The engine reads the helper's response back as naming exactly that record.
    assert interpret(response, built, shape, True) == PartialFailure(frozenset({("t-0", 5)}))


NOW_MS = 1_790_000_000_000


def rabbit_delivery(tag: int, body: bytes, props: pika.BasicProperties) -> Record:
    """A record as the RabbitMQ source makes it of a delivery (`RabbitMQSource._take`)."""
    ts = props.timestamp
    return Record(
        "q",
        tag,
        body,
        timestamp_ms=ts * 1000 if isinstance(ts, int) and ts > 0 else NOW_MS,
        headers=record_headers(props.headers or {})[0],
        meta=RabbitMeta("q", "/", tag, basic_properties(props, len(body))),
    )


def rabbit_event(built: list[Record]) -> dict[str, Any]:
    """The event of `built` as a handler receives it: through JSON."""
    return dict(orjson.loads(orjson.dumps(RabbitShape("h:5672").event(built))))


def test_rabbitmq_records() -> None:
    rmq = rabbit_event(
        [rabbit_delivery(3, b'{"n": 2}', pika.BasicProperties(headers={"x": "y"}, timestamp=9))]
    )
    (r,) = records(rmq)
    assert r.json() == {"n": 2} and r.item_identifier == {"queue": "q", "deliveryTag": 3}
    assert r.header("x") == b"y" and r.timestamp_ms == 9000


def test_rabbitmq_headers_of_every_type_and_the_timestamp_read_back() -> None:
    headers: dict[str, Any] = {
        "text": "value1",
        "utf8": "h\u00e9llo \u2603",
        "empty": "",
        "raw": b"\xff\x00\x80",
        "rawtext": b"plain",
        "yes": True,
        "no": False,
        "n": 10,
        "negative": -3,
        "long": 2**40,
        "double": 1.5,
        "x-delivery-count": 2,
        # Not scalars: the source hands none of these to the engine as a record header.
        "when": dt.datetime(2026, 1, 1, 12, 30, tzinfo=dt.UTC),
        "table": {"a": "b", "n": 1},
        "array": [1, "x", True],
        "void": None,
    }
    timestamp_s = 1_700_000_000
    built = rabbit_delivery(
        1, b"{}", pika.BasicProperties(headers=headers, timestamp=timestamp_s, message_id="m")
    )
    (r,) = records(rabbit_event([built]))
    assert r.headers == list(built.headers)
    assert r.headers == [
        ("text", b"value1"),
        ("utf8", "h\u00e9llo \u2603".encode()),
        ("empty", b""),
        ("raw", b"\xff\x00\x80"),
        ("rawtext", b"plain"),
        ("yes", b"True"),
        ("no", b"False"),
        ("n", b"10"),
        ("negative", b"-3"),
        ("long", str(2**40).encode()),
        ("double", b"1.5"),
        ("x-delivery-count", b"2"),
    ]
    assert r.timestamp_ms == built.timestamp_ms == timestamp_s * 1000
    # Lambda's form of the timestamp read back around 12 AM and 12 PM, on a leap day and at the
    # ends of the range a date shows (AMQP timestamps are whole seconds).
    for seconds in [0, 1, 2021, 43_199, 43_200, 86_399, 951_782_400, 253_402_300_799]:
        (r,) = records(
            rabbit_event([rabbit_delivery(1, b"", pika.BasicProperties(timestamp=seconds))])
        )
        assert r.timestamp_ms == seconds * 1000
    # A decimal shows as a number in the event, as a double does: read back, it is one.
    decimal = rabbit_delivery(1, b"", pika.BasicProperties(headers={"d": Decimal("2.5")}))
    (r,) = records(rabbit_event([decimal]))
    assert r.headers == [("d", b"2.5")]
    # Without a timestamp the source stamps the record when it arrives; the event cannot say when.
    (r,) = records(rabbit_event([rabbit_delivery(1, b"", pika.BasicProperties())]))
    assert r.timestamp_ms == 0 and r.headers == []


def redis_source(partition_key_field: str | None = None) -> RedisSource:
    """A source that is never opened: `_records` makes records of XREADGROUP entries."""
    source: dict[str, Any] = {"type": "redis", "url": "redis://127.0.0.1:1/0", "streams": ["s"]}
    if partition_key_field is not None:
        source["partition_key_field"] = partition_key_field
    mapping = cfg.EventSourceMapping.model_validate(
        {"name": "events", "function": "f", "source": source}
    )
    return RedisSource(mapping, 0)


def as_sent(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[bytes, list[bytes]]]:
    """Entries as the server sends them: each one's fields a list of names and values in turn."""
    return [
        (entry_id, [x for pair in fields.items() for x in pair]) for entry_id, fields in entries
    ]


def read_back(
    entries: list[tuple[bytes, dict[bytes, bytes]]], partition_key_field: str | None = None
) -> tuple[list[Record], list[EventRecord]]:
    """The source's records of `entries`, and what a handler reads of the event they make."""
    built = redis_source(partition_key_field)._records("s", as_sent(entries), 0.0)
    event = orjson.loads(orjson.dumps(RedisShape("h").event(built)))
    return built, list(records(event))


def test_redis_records_read_as_the_source_made_them() -> None:
    entries = [
        (b"1700000000000-0", {b"body": b"[1]"}),
        (b"1700000000000-1", {b"a": b"1", b"b": b"x"}),
        # Replayed onto the source: the value is what it was before, the count stays a field.
        (b"1700000000000-2", {b"body": b"[2]", b"esm-replay-count": b"1"}),
        (b"1700000000000-3", {b"a": b"\xff", b"b": b"2", b"esm-replay-count": b"3"}),
        (b"1700000000000-4", {b"\xff": b"bin"}),
    ]
    built, got = read_back(entries)
    # What the handler's helper says each value is, the source said too.
    assert [r.value for r in got] == [r.value for r in built]
    assert [r.fields for r in got] == [
        {k.decode("utf-8", "surrogateescape"): v for k, v in fields.items()}
        for _, fields in entries
    ]
    assert got[0].json() == [1] and got[0].field("body") == b"[1]"
    assert got[1].json() == {"a": "1", "b": "x"}
    assert got[2].json() == [2] and got[2].field("esm-replay-count") == b"1"
    assert got[3].json() == {"a": "\ufffd", "b": "2"}
    assert got[4].value == b"bin" and got[4].field(b"\xff") == b"bin"
    assert [r.item_identifier for r in got] == [
        {"stream": "s", "id": entry_id.decode()} for entry_id, _ in entries
    ]


def test_redis_partition_key_field_is_part_of_the_value_the_handler_reads() -> None:
    # The event does not say which field is the partition key: the source's record has a key
    # and the other field as its value, the handler reads both fields as the value.
    built, got = read_back([(b"1-0", {b"k": b"a", b"v": b"1"}), (b"1-1", {b"v": b"2"})], "k")
    assert [(r.key, r.value) for r in built] == [(b"a", b"1"), (None, b"2")]
    assert got[0].json() == {"k": "a", "v": "1"} and got[0].field("k") == b"a"
    assert got[1].value == b"2"
    assert got[0].value == entry_value({"k": b"a", "v": b"1"})
    assert built[0].value == entry_value({"k": b"a", "v": b"1"}, "k")


def test_redis_field_names_that_are_not_utf8_keep_their_identity() -> None:
    raw = {b"\xff": b"1", b"\xfe": b"2", b"ok": b"3", b"b64:eA==": b"4", "é".encode(): b"5"}
    names = {field_name(name): value for name, value in raw.items()}
    assert len(names) == len(raw)
    assert names["ok"] == b"3" and names["é"] == b"5"
    assert names["b64:/w=="] == b"1" and names["b64:/g=="] == b"2"
    assert names["b64:YjY0OmVBPT0="] == b"4"  # a UTF-8 name starting with b64: is encoded too
    assert {field_bytes(name): value for name, value in names.items()} == raw
    # A b64: name that is no base64 (an event written by hand) is taken as written.
    assert field_bytes("b64:not base64!") == b"b64:not base64!"

    _, [r] = read_back([(b"1-1", raw)])
    assert r.fields == {k.decode("utf-8", "surrogateescape"): v for k, v in raw.items()}
    assert r.field(b"\xff") == b"1" and r.field(b"\xfe") == b"2" and r.field("ok") == b"3"
    assert r.field("b64:eA==") == b"4"


def test_the_example_configs_handler_reads_every_broker_it_is_fed_from(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # config/example.yaml feeds one function from Kafka, RabbitMQ and Redis; its handler is
    # imported from the repository's root, as `workers validate config/example.yaml` does there.
    monkeypatch.syspath_prepend(str(ROOT))
    config = cfg.load_config(ROOT / "config" / "example.yaml", environ={})
    config.check_handlers()
    assert {m.source.type for m in config.event_source_mappings} == {"kafka", "rabbitmq", "redis"}
    assert all(m.function == "orders" for m in config.event_source_mappings)
    handler = load_handler(config.function_spec("orders").handler)

    good, bad = b'{"id": 1, "amount": 12.5}', b'{"id": 2, "amount": -1}'
    redis_built = redis_source()._records(
        "s", as_sent([(b"1-0", {b"order": good}), (b"1-1", {b"id": b"2", b"amount": b"-1"})]), 0.0
    )
    batches: list[tuple[Any, list[Record]]] = [
        (
            KafkaShape("b"),
            [
                Record("orders-0", 0, good, meta=KafkaMeta("orders", 0)),
                Record("orders-0", 1, bad, meta=KafkaMeta("orders", 0)),
            ],
        ),
        (
            RabbitShape("h:5672"),
            [
                rabbit_delivery(1, good, pika.BasicProperties()),
                rabbit_delivery(2, bad, pika.BasicProperties()),
            ],
        ),
        (RedisShape("h"), redis_built),
    ]
    for shape, built in batches:
        event = orjson.loads(orjson.dumps(shape.event(built)))
        response = handler(event, None)
        # The engine reads the response as naming the second record only, whatever the broker.
        failed = frozenset({built[1].ident})
        assert interpret(response, built, shape, True) == PartialFailure(failed), event
    printed = capsys.readouterr().out
    assert printed.count("order 1 from ") == 3 and printed.count("negative amount") == 3
