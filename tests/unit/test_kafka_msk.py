"""Amazon MSK's event: with a cluster ARN configured, the Kafka shape builds Lambda's MSK event
field for field, reads it back as the records it was built from, and the ARN is checked when the
configuration is read."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from aws_lambda_powertools.utilities.parser.models import KafkaMskEventModel
from pydantic import ValidationError

from connectors.kafka.config import KafkaSource
from connectors.kafka.shape import KafkaMeta, KafkaShape
from workers.app.registry import shape_for_event
from workers.engine.invoker import PackedEvent, unpack
from workers.engine.records import Record
from workers.events import records as event_records

ARN = (
    "arn:aws:kafka:us-east-1:123456789012:cluster/vpc-2priv-2pub/"
    "751d2973-a626-431c-9d4e-d7975eb44dd7-2"
)
SERVERS = (
    "b-2.demo-cluster-1.a1bcde.c1.kafka.us-east-1.amazonaws.com:9092,"
    "b-1.demo-cluster-1.a1bcde.c1.kafka.us-east-1.amazonaws.com:9092"
)

# Lambda's documented MSK event (https://docs.aws.amazon.com/lambda/latest/dg/with-msk.html),
# keys in its order. The documented key, "abcDEFghiJKLmnoPQRstuVWXyz1234==", is a placeholder
# that is not canonical base64 (no bytes encode to it), so a real one stands in for it.
DOCUMENTED: dict[str, Any] = {
    "eventSource": "aws:kafka",
    "eventSourceArn": ARN,
    "bootstrapServers": SERVERS,
    "records": {
        "mytopic-0": [
            {
                "topic": "mytopic",
                "partition": 0,
                "offset": 15,
                "timestamp": 1545084650987,
                "timestampType": "CREATE_TIME",
                "key": "cmVjb3JkS2V5",
                "value": "SGVsbG8sIHRoaXMgaXMgYSB0ZXN0Lg==",
                "headers": [{"headerKey": [104, 101, 97, 100, 101, 114, 86, 97, 108, 117, 101]}],
            }
        ]
    },
}


def documented_record() -> Record:
    return Record(
        "mytopic-0",
        15,
        b"Hello, this is a test.",
        key=b"recordKey",
        timestamp_ms=1545084650987,
        headers=[("headerKey", b"headerValue")],
        meta=KafkaMeta("mytopic", 0, "CREATE_TIME"),
    )


def key_orders(event: dict[str, Any]) -> list[list[str]]:
    return [list(event)] + [list(i) for items in event["records"].values() for i in items]


@pytest.mark.parametrize("packed", [False, True], ids=["built here", "built in the environment"])
def test_msk_event_is_lambdas_documented_example(packed: bool) -> None:
    shape = KafkaShape(SERVERS, ARN)
    records = [documented_record()]
    event = (
        unpack(PackedEvent(shape.unpacker, shape.pack(records))) if packed else shape.event(records)
    )

    assert event == DOCUMENTED
    assert key_orders(event) == key_orders(DOCUMENTED)


def test_without_an_arn_the_event_stays_self_managed_kafkas() -> None:
    event = KafkaShape(SERVERS).event([documented_record()])

    assert list(event) == ["eventSource", "bootstrapServers", "records"]
    assert event["eventSource"] == "SelfManagedKafka"
    assert event["records"] == DOCUMENTED["records"]


def test_the_documented_event_reads_back_as_its_records_and_builds_again_the_same() -> None:
    event = copy.deepcopy(DOCUMENTED)
    event["records"]["mytopic-1"] = [
        {
            "topic": "mytopic",
            "partition": 1,
            "offset": 3,
            "timestamp": 1545084650990,
            "timestampType": "LOG_APPEND_TIME",
            "value": "",
            "headers": [],
        }
    ]

    shape = shape_for_event(event)

    assert isinstance(shape, KafkaShape) and shape.event_source_arn == ARN
    read = shape.records(event)
    assert [(r.source, r.position, r.key, r.value, r.headers) for r in read] == [
        ("mytopic-0", 15, b"recordKey", b"Hello, this is a test.", [("headerKey", b"headerValue")]),
        ("mytopic-1", 3, None, b"", []),
    ]
    assert shape.event(read) == event  # a dead letter replayed to the function: MSK's again
    got = list(event_records(event))
    assert [(r.value, r.item_identifier) for r in got] == [
        (b"Hello, this is a test.", {"partition": "mytopic-0", "offset": 15}),
        (b"", {"partition": "mytopic-1", "offset": 3}),
    ]


def test_a_self_managed_event_reads_back_as_self_managed() -> None:
    event = KafkaShape(SERVERS).event([documented_record()])

    shape = shape_for_event(event)

    assert isinstance(shape, KafkaShape) and shape.event_source_arn is None
    assert shape.event(shape.records(event)) == event


def test_powertools_msk_model_accepts_the_event() -> None:
    parsed = KafkaMskEventModel.model_validate(
        KafkaShape(SERVERS, ARN).event([documented_record()])
    )

    assert parsed.eventSourceArn == ARN
    [record] = parsed.records["mytopic-0"]
    assert (record.key, record.value, record.headers) == (
        b"recordKey",
        "Hello, this is a test.",
        [{"headerKey": b"headerValue"}],
    )


def source(**fields: Any) -> KafkaSource:
    return KafkaSource.model_validate(
        {"type": "kafka", "bootstrap_servers": "h:9092", "topics": ["t"], **fields}
    )


@pytest.mark.parametrize(
    "arn",
    [
        ARN,
        "arn:aws:kafka:eu-central-1:123456789012:cluster/MyCluster/xyz789-1234-5678-90ab-cdef12345678-2",
        "arn:aws-cn:kafka:cn-north-1:123456789012:cluster/c/751d2973-a626-431c-9d4e-d7975eb44dd7-1",
        "arn:aws-us-gov:kafka:us-gov-west-1:123456789012:cluster/c/id-1",
        "arn:aws:kafka:local:000000000000:cluster/dev/1",
    ],
)
def test_cluster_arns_are_accepted(arn: str) -> None:
    assert source(event_source_arn=arn).event_source_arn == arn


def test_no_arn_by_default() -> None:
    assert source().event_source_arn is None


@pytest.mark.parametrize(
    "arn",
    [
        "",
        "SalesCluster",
        "arn:aws:mq:us-east-1:123456789012:broker:b:b-1",  # not Kafka
        "arn:aws:kafka:us-east-1:123456789012:topic/c/751d2973/t",  # not a cluster
        "arn:aws:kafka:us-east-1:123456789012:cluster/c",  # no cluster id
        "arn:aws:kafka:us-east-1:0123456789019:cluster/c/id-1",  # 13-digit account
        "arn:aws:kafka::123456789012:cluster/c/id-1",  # no region
        "arn:aws:kafka:us-east-1:123456789012:cluster/c/id-1/extra",
        " arn:aws:kafka:us-east-1:123456789012:cluster/c/id-1",
    ],
)
def test_other_arns_are_refused_naming_the_key(arn: str) -> None:
    with pytest.raises(ValidationError) as raised:
        source(event_source_arn=arn)

    [error] = raised.value.errors()
    assert error["loc"] == ("event_source_arn",)
    assert "must be an Amazon MSK cluster ARN" in error["msg"]
    assert repr(arn) in error["msg"]
