"""The SQS connector's settings and event shape, without a server."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from connectors.sqs.config import SQSSource
from connectors.sqs.shape import SQSShape
from workers.app.registry import shape_for_event
from workers.events import records

# Lambda's documented SQS event (https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html),
# one standard and one FIFO record.
EVENT: dict[str, Any] = {
    "Records": [
        {
            "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
            "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
            "body": "test",
            "attributes": {
                "ApproximateReceiveCount": "1",
                "SentTimestamp": "1545082649183",
                "SenderId": "AIDAIENQZJOLO23YVJ4VO",
                "ApproximateFirstReceiveTimestamp": "1545082649185",
            },
            "messageAttributes": {
                "myAttribute": {
                    "stringValue": "myValue",
                    "stringListValues": [],
                    "binaryListValues": [],
                    "dataType": "String",
                }
            },
            "md5OfBody": "098f6bcd4621d373cade4e832627b4f6",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue",
            "awsRegion": "us-east-2",
        },
        {
            "messageId": "11d6ee51-4cc7-4302-9e22-7cd8afdaadf5",
            "receiptHandle": "AQEBBX8nesZEXmkhsmZeyIE8iQAMig7qw...",
            "body": '{"n": 2}',
            "attributes": {
                "ApproximateReceiveCount": "3",
                "SentTimestamp": "1573251510774",
                "SequenceNumber": "18849496460467696128",
                "MessageGroupId": "1",
                "SenderId": "AIDAIO23YVJENQZJOL4VO",
                "MessageDeduplicationId": "1",
                "ApproximateFirstReceiveTimestamp": "1573251510774",
            },
            "messageAttributes": {},
            "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:fifo.fifo",
            "awsRegion": "us-east-2",
        },
    ]
}


def settings(**source: Any) -> SQSSource:
    return SQSSource.model_validate({"type": "sqs", **source})


def test_region_and_endpoint_come_from_the_queue_url() -> None:
    aws = settings(queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/q")
    assert (aws.client_region, aws.client_endpoint, aws.fifo) == ("eu-west-1", None, False)
    local = settings(queue_url="http://127.0.0.1:4566/000000000000/q.fifo")
    assert local.client_region is None and local.client_endpoint == "http://127.0.0.1:4566"
    assert local.fifo and local.queue_name == "q.fifo"
    told = settings(
        queue_url="http://localhost:9324/000000000000/q",
        endpoint_url="http://elsewhere:9324",
        region="eu-central-1",
    )
    assert (told.client_region, told.client_endpoint) == ("eu-central-1", "http://elsewhere:9324")


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ({"queue_url": "https://sqs.eu-west-1.amazonaws.com/q"}, "must be a queue URL"),
        ({"queue_url": "sqs://q"}, "scheme must be"),
        (
            {"queue_url": "https://h/1/q", "client_config": {"aws_secret_access_key": "x"}},
            "never from this file",
        ),
        ({"queue_url": "https://h/1/q", "aws_access_key_id": "x"}, "Extra inputs"),
    ],
)
def test_bad_settings(source: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        settings(**source)


def test_lambdas_event_reads_back_and_rebuilds_exactly() -> None:
    shape = shape_for_event(EVENT)
    assert isinstance(shape, SQSShape)
    got = shape.records(copy.deepcopy(EVENT))
    assert shape.event(got) == EVENT
    standard, fifo = got
    assert (standard.source, standard.value, standard.key) == ("my-queue", b"test", None)
    assert standard.headers == [("myAttribute", b"myValue")]
    assert (standard.attempts, standard.timestamp_ms) == (0, 1545082649183)
    assert (fifo.key, fifo.attempts, fifo.redelivered) == (b"1", 2, True)
    # A FIFO group keeps its order (in a replay too); a standard queue has none to keep.
    assert not shape.ordered([standard]) and shape.ordered([fifo])
    assert [shape.item_identifier(r) for r in got] == [r["messageId"] for r in EVENT["Records"]]
    assert shape.parse_item({"messageId": "x"}) is None and shape.parse_item("") is None
    assert shape.filter_view(fifo)["body"] == {"n": 2}
    info = shape.batch_info(got)
    assert info["batchSize"] == 2 and info["firstMessageId"] == EVENT["Records"][0]["messageId"]
    assert [r.item_identifier for r in records(EVENT)] == [r["messageId"] for r in EVENT["Records"]]


def test_letters_are_bodies_sqs_takes() -> None:
    from connectors.sqs.letters import header_attributes, letter_body, sqs_text

    plain = {"payload": {"text": "é\u2028"}}
    assert letter_body(plain) == '{"payload":{"text":"é\u2028"}}'
    refused = {"payload": {"text": "\ufffe\x00"}}
    body = letter_body(refused)
    assert sqs_text(body) and body.isascii() and orjson.loads(body) == refused
    assert header_attributes([("a", b"text"), ("b", b"\xff"), ("c", b"")]) == {
        "a": {"DataType": "String", "StringValue": "text"},
        "b": {"DataType": "Binary", "BinaryValue": b"\xff"},
    }
