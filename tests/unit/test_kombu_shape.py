"""The kombu connector without a broker: its SQS-shaped event read back through `records()`,
base64 bodies, messageAttributes as SQS writes them, and its settings."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from connectors.kombu.config import KombuSource, broker_address, transport_name
from connectors.kombu.shape import (
    KombuMeta,
    KombuShape,
    attributes_of,
    message_attributes,
    record_headers,
)
from workers.app import registry
from workers.engine.records import Record
from workers.events import batch_response
from workers.events import records as event_records


def record(position: int, value: bytes, headers: dict[str, Any] | None = None) -> Record:
    attrs = message_attributes(headers or {})
    return Record(
        source="orders",
        position=position,
        value=value,
        timestamp_ms=1_700_000_000_000 + position,
        headers=record_headers(attrs),
        attempts=position % 2,
        redelivered=position % 2 == 1,
        meta=KombuMeta(
            queue="orders",
            message_id=f"id-{position}",
            receipt_handle=str(position),
            attributes=attributes_of(
                {"content_type": "text/plain", "message_id": "pub", "timestamp": 1_700_000_000},
                {"routing_key": "orders"},
                attempts=position % 2,
                redelivered=position % 2 == 1,
                sent_ms=1_700_000_000_000 + position,
                received_ms=1_700_000_001_000,
            ),
            message_attributes=attrs,
        ),
    )


SHAPE = KombuShape("amqp", "rabbit:5672")


def test_event_is_lambdas_sqs_event() -> None:
    event = SHAPE.event([record(0, b'{"a": 1}', {"tenant": "acme"})])
    (item,) = event["Records"]
    assert set(event) == {"Records"}
    assert item["messageId"] == "id-0" and item["receiptHandle"] == "0"
    assert item["body"] == '{"a": 1}'
    assert item["md5OfBody"] == hashlib.md5(b'{"a": 1}').hexdigest()
    assert item["eventSource"] == "kombu:amqp"
    assert item["eventSourceARN"] == "arn:kombu:amqp:rabbit:5672:queue/orders"
    assert item["awsRegion"] == "local"
    assert item["attributes"] == {
        "ApproximateReceiveCount": "1",
        "SentTimestamp": "1700000000000",
        "ApproximateFirstReceiveTimestamp": "1700000001000",
        "contentType": "text/plain",
        "publisherMessageId": "pub",
        "timestamp": "1700000000",
        "routingKey": "orders",
        "redelivered": "false",
    }
    assert item["messageAttributes"] == {
        "tenant": {
            "stringValue": "acme",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        }
    }


def test_body_that_is_not_utf8_is_base64_and_says_so() -> None:
    raw = b"\xff\x00\xfe"
    event = SHAPE.event([record(0, raw), record(1, "h\u00e9".encode())])
    binary, text = event["Records"]
    assert binary["body"] == base64.b64encode(raw).decode()
    assert binary["attributes"]["bodyEncoding"] == "base64"
    assert text["body"] == "h\u00e9" and "bodyEncoding" not in text["attributes"]


def test_records_round_trip_through_the_event() -> None:
    headers = {"s": "x", "n": 7, "f": 1.5, "d": Decimal("2.50"), "b": False, "raw": b"\xff"}
    originals = [record(0, b"plain", headers), record(1, b"\x80\x81"), record(2, b"")]
    event = orjson.loads(orjson.dumps(SHAPE.event(originals)))
    back = SHAPE.records(event)
    assert [r.value for r in back] == [r.value for r in originals]
    for r, o in zip(back, originals, strict=True):
        assert r.source == "orders"
        assert list(r.headers) == list(o.headers)
        assert r.timestamp_ms == o.timestamp_ms
        assert r.attempts == o.attempts and r.redelivered == o.redelivered
        assert SHAPE.item_key(r) == SHAPE.item_key(o)
        assert r.meta.attributes == o.meta.attributes  # bodyEncoding follows from the body
    # The event built again from what was read back is the same event.
    assert orjson.loads(orjson.dumps(SHAPE.event(back))) == event
    # The registry finds the shape from the records' eventSource.
    found = registry.shape_for_event(event)
    assert isinstance(found, KombuShape)
    assert (found.transport, found.broker) == ("amqp", "rabbit:5672")
    assert [r.value for r in event_records(event)] == [r.value for r in originals]


def test_headers_as_sqs_message_attributes() -> None:
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    attrs = message_attributes(
        {"n": 7, "b": True, "bin": b"\x00", "at": when, "t": {"k": [1, "v"]}, "none": None}
    )
    assert attrs["n"]["dataType"] == "Number" and attrs["n"]["stringValue"] == "7"
    assert attrs["b"] == {
        "stringValue": "true",
        "dataType": "String.Boolean",
        "stringListValues": [],
        "binaryListValues": [],
    }
    assert attrs["bin"]["dataType"] == "Binary" and attrs["bin"]["binaryValue"] == "AA=="
    assert "stringValue" not in attrs["bin"]
    assert attrs["at"] == {
        "stringValue": "2026-01-01T00:00:00+00:00",
        "dataType": "String.Timestamp",
        "stringListValues": [],
        "binaryListValues": [],
    }
    assert orjson.loads(attrs["t"]["stringValue"]) == {"k": [1, "v"]}
    assert attrs["t"]["dataType"] == "String.Json"
    # The engine's headers: the scalars, as bytes.
    assert record_headers(attrs) == [
        ("n", b"7"),
        ("b", b"true"),
        ("bin", b"\x00"),
        ("at", when.isoformat().encode()),
    ]


def test_item_identifiers_are_message_ids() -> None:
    r = record(3, b"x")
    assert SHAPE.item_identifier(r) == "id-3"
    assert SHAPE.parse_item("id-3") == SHAPE.item_key(r)
    for bad in ("", None, 3, {"messageId": "id-3"}):
        assert SHAPE.parse_item(bad) is None
    (failed,) = [r for r in event_records(SHAPE.event([record(0, b"a"), r])) if r.value == b"x"]
    assert batch_response([failed]) == {"batchItemFailures": [{"itemIdentifier": "id-3"}]}


def test_event_items_are_fresh_for_every_event() -> None:
    r = record(0, b"x", {"h": "v"})
    first = SHAPE.event([r])
    first["Records"][0]["attributes"]["contentType"] = "changed"
    first["Records"][0]["messageAttributes"]["h"]["stringListValues"].append("y")
    again = SHAPE.event([r])["Records"][0]
    assert again["attributes"]["contentType"] == "text/plain"
    assert again["messageAttributes"]["h"]["stringListValues"] == []


def test_batch_info_and_filter_view() -> None:
    records = [record(0, b'{"a": 1}'), record(1, b"text")]
    info = SHAPE.batch_info(records)
    assert SHAPE.batch_info_name == "KombuBatchInfo"
    assert info["transport"] == "amqp" and info["broker"] == "rabbit:5672"
    assert info["batchSize"] == 2
    assert info["queues"]["orders"]["messageIds"] == ["id-0", "id-1"]
    assert info["queues"]["orders"]["firstRecordTimestamp"] == "2023-11-14T22:13:20.000Z"
    assert SHAPE.filter_view(records[0])["body"] == {"a": 1}
    assert SHAPE.filter_view(records[1])["body"] == "text"
    assert SHAPE.filter_view(records[0])["attributes"]["contentType"] == "text/plain"


# --- settings ----------------------------------------------------------------------------------


def settings(url: str, **extra: Any) -> KombuSource:
    return KombuSource.model_validate({"type": "kombu", "url": url, "queue": "q", **extra})


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:guest@h:5672//", "redis://h:6379/0", "memory://", "sqla+postgresql://u@h/db"],
)
def test_any_kombu_url_is_accepted(url: str) -> None:
    assert settings(url, transport_options={"visibility_timeout": 60}).url == url


@pytest.mark.parametrize("url", ["sqs://", "sqs://key:secret@", "SQS://x"])
def test_sqs_urls_point_to_the_sqs_source(url: str) -> None:
    with pytest.raises(ValidationError, match="use `type: sqs`") as caught:
        settings(url)
    # What the configuration's error says (pydantic's own repr of the input is not shown).
    assert "secret" not in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize("url", ["", "localhost:5672", "amqp://h:port/"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="bad URL"):
        settings(url)


def test_transport_and_broker_of_a_url() -> None:
    assert transport_name("sqla+postgresql://u:p@h/db") == "sqla"
    assert transport_name("Redis://h") == "redis"
    assert broker_address("amqp://u:secret@rabbit:5672//") == "rabbit:5672"
    assert broker_address("redis://cache/0") == "cache"
    assert broker_address("memory://") == ""
