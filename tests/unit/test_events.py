"""`workers.events`: one way to read records of every event shape, and partial responses."""

from __future__ import annotations

from connectors.kafka.shape import KafkaMeta, KafkaShape
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape
from connectors.redis.shape import RedisMeta, RedisShape, field_bytes, field_name, parse_stream_id
from workers.engine.policy import PartialFailure, interpret
from workers.engine.records import Record
from workers.events import batch_response, records


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


def test_rabbitmq_and_redis_records() -> None:
    rmq = RabbitShape("h").event(
        [Record("q", 1, b'{"n": 2}', meta=RabbitMeta("q", "/", 3, {"headers": {"x": "y"}}))]
    )
    (r,) = records(rmq)
    assert r.json() == {"n": 2} and r.item_identifier == {"queue": "q", "deliveryTag": 3}
    entry = "1700000000000-0"
    one = RedisShape("h").event(
        [Record("s", parse_stream_id(entry), b"", meta=RedisMeta("s", entry, {"body": b"[1]"}))]
    )
    (r,) = records(one)
    assert r.json() == [1] and r.fields == {"body": b"[1]"}
    assert r.item_identifier == {"stream": "s", "id": entry}
    many = RedisShape("h").event(
        [Record("s", 1, b"", meta=RedisMeta("s", "0-1", {"a": b"1", "b": b"x"}))]
    )
    (r,) = records(many)
    assert r.fields == {"a": b"1", "b": b"x"} and r.json() == {"a": "1", "b": "x"}


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

    entry = "1-1"
    [r] = records(
        RedisShape("").event(
            [Record("s", parse_stream_id(entry), b"", meta=RedisMeta("s", entry, names))]
        )
    )
    assert r.fields == {k.decode("utf-8", "surrogateescape"): v for k, v in raw.items()}
    assert r.field(b"\xff") == b"1" and r.field(b"\xfe") == b"2" and r.field("ok") == b"3"
    assert r.field("b64:eA==") == b"4"
