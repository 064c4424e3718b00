"""The SQS source against moto's SQS server: the source contract (acks), then what only SQS
does: Lambda's event, visibility kept while messages are held, deletes retried, FIFO groups."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
from botocore.exceptions import EndpointConnectionError

from connectors.memory.broker import MemoryDestination
from connectors.sqs.source import SQSSource
from tests import brokers
from tests.contract import AckContract, RecordingListener, SourceContract, poll_n
from tests.contract.harness import poll_for
from tests.engine import DirectInvoker
from workers.app import config as cfg
from workers.app import registry
from workers.engine.batcher import BatchLimits
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.ports import ConnectorConfigError, Destination, Source
from workers.events import batch_response, records

pytestmark = [pytest.mark.integration, pytest.mark.sqs]


def mapping_for(queue_url: str, name: str = "orders", **extra: Any) -> cfg.EventSourceMapping:
    return cfg.EventSourceMapping.model_validate(
        {"name": name, "function": "f", "source": {"type": "sqs", "queue_url": queue_url}, **extra}
    )


def send(server: brokers.MotoServer, url: str, bodies: Sequence[str], **fields: Any) -> None:
    client = server.client()
    for i in range(0, len(bodies), 10):
        entries = [
            {"Id": str(j), "MessageBody": body, **fields}
            for j, body in enumerate(bodies[i : i + 10])
        ]
        reply = client.send_message_batch(QueueUrl=url, Entries=entries)
        assert not reply.get("Failed"), reply


class TestSQSContract(SourceContract, AckContract):
    join_timeout_s = 5.0
    delivery_counts = True  # ApproximateReceiveCount

    @pytest.fixture(autouse=True)
    def _server(self, sqs_server: brokers.MotoServer) -> None:
        self.server = sqs_server
        self.urls: dict[str, str] = {}
        self.destinations: dict[str, MemoryDestination] = {}

    def fresh(self) -> str:
        name = super().fresh()
        self.urls[name] = self.server.create_queue(name)
        return name

    def make_source(self, name: str) -> Source:
        return registry.open_source(mapping_for(self.urls[name], name))

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        send(self.server, self.urls[name], [v.decode() for v in values])

    def make_destination(self, name: str) -> Destination:
        return self.destinations.setdefault(name, MemoryDestination())

    def dead_letter_values(self, name: str) -> list[bytes]:
        letters = self.destinations[name].letters if name in self.destinations else []
        return [v for letter in letters for v in self.event_values(letter["payload"])]

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        return [item["body"].encode() for item in event["Records"]]


# --- SQS specifics ---------------------------------------------------------------------------


@pytest.fixture
def queue(sqs_server: brokers.MotoServer) -> str:
    return sqs_server.create_queue(brokers.unique_name("sqs"))


@pytest.fixture
def opened(queue: str) -> Iterator[SQSSource]:
    source = registry.open_source(mapping_for(queue))
    assert isinstance(source, SQSSource)
    source.open(RecordingListener())
    yield source
    source.close()


def test_the_event_is_lambdas_sqs_event(
    sqs_server: brokers.MotoServer, queue: str, opened: SQSSource
) -> None:
    body = '{"order": 1, "text": "é"}'
    sqs_server.client().send_message(
        QueueUrl=queue,
        MessageBody=body,
        MessageAttributes={
            "tenant": {"DataType": "String", "StringValue": "acme"},
            "n": {"DataType": "Number", "StringValue": "7"},
            "raw": {"DataType": "Binary", "BinaryValue": b"\xff\x00"},
        },
    )
    (record,) = poll_n(opened, 1, 5)
    event = opened.shape.event([record])
    assert list(event) == ["Records"]
    (item,) = event["Records"]
    arn = sqs_server.client().get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    assert list(item) == [
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "md5OfMessageAttributes",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
    ]
    assert item["body"] == body
    assert item["md5OfBody"] == hashlib.md5(body.encode()).hexdigest()
    assert item["eventSource"] == "aws:sqs"
    assert item["eventSourceARN"] == arn["Attributes"]["QueueArn"]
    assert item["awsRegion"] == "us-east-1"
    attributes = item["attributes"]
    assert attributes["ApproximateReceiveCount"] == "1"
    assert {"SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp"} <= set(attributes)
    assert item["messageAttributes"] == {
        "tenant": {
            "stringValue": "acme",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
        "n": {
            "stringValue": "7",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Number",
        },
        "raw": {
            "binaryValue": base64.b64encode(b"\xff\x00").decode(),
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Binary",
        },
    }
    assert record.value == body.encode() and record.key is None
    assert record.attempts == 0 and not record.redelivered
    assert record.timestamp_ms == int(attributes["SentTimestamp"])
    assert record.headers == [("tenant", b"acme"), ("n", b"7"), ("raw", b"\xff\x00")]
    # A handler's reading of it, and what it answers to fail it: the messageId.
    (back,) = records(orjson.loads(orjson.dumps(event)))
    assert back.value == body.encode() and back.item_identifier == item["messageId"]
    assert batch_response([back]) == {"batchItemFailures": [{"itemIdentifier": item["messageId"]}]}
    assert opened.shape.parse_item(item["messageId"]) == opened.shape.item_key(record)
    # What the handler does to its event does not reach the record's next event.
    item["messageAttributes"]["tenant"]["stringListValues"].append("x")
    item["attributes"]["SentTimestamp"] = "0"
    assert (
        opened.shape.event([record])["Records"][0]["messageAttributes"]["tenant"][
            "stringListValues"
        ]
        == []
    )
    opened.ack([record])


def test_held_messages_stay_invisible_past_the_visibility_timeout(
    sqs_server: brokers.MotoServer,
) -> None:
    url = sqs_server.create_queue(brokers.unique_name("sqs"), VisibilityTimeout="2")
    send(sqs_server, url, ["slow"])
    source = registry.open_source(mapping_for(url))
    source.open(RecordingListener())
    try:
        (record,) = poll_n(source, 1, 5)
        # A long batch: the loop keeps polling (without room for more) while it runs.
        other = sqs_server.client()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            source.poll(0, 0.1)
            seen = other.receive_message(QueueUrl=url, WaitTimeSeconds=0)
            assert "Messages" not in seen, "a held message was delivered to another consumer"
            time.sleep(0.2)
        source.ack([record])
        source.poll(0, 0)
    finally:
        source.close()
    # Deleted, not only invisible (a held message is invisible for up to 2 s more).
    attributes = sqs_server.client().get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert attributes == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }


def test_a_failed_delete_is_retried_on_the_next_poll(
    sqs_server: brokers.MotoServer, queue: str, opened: SQSSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    send(sqs_server, queue, ["a", "b", "c"])
    got = poll_n(opened, 3, 5)
    client = opened._client
    assert client is not None
    real = client.delete_message_batch
    calls = []

    def flaky(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url=sqs_server.endpoint_url)
        return real(**kwargs)

    monkeypatch.setattr(client, "delete_message_batch", flaky)
    opened.ack(got)  # fails: kept to be deleted
    assert len(calls) == 1 and not opened.caught_up()
    deadline = time.monotonic() + 5
    while not opened.caught_up() and time.monotonic() < deadline:
        opened.poll(0, 0.1)  # deletes, a little later
    assert len(calls) == 2 and opened.caught_up()
    attributes = sqs_server.client().get_queue_attributes(
        QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_messages_in_flight_elsewhere_are_not_idle(
    sqs_server: brokers.MotoServer, queue: str, opened: SQSSource
) -> None:
    send(sqs_server, queue, ["taken"])
    taken = sqs_server.client().receive_message(QueueUrl=queue, VisibilityTimeout=30)
    assert len(taken["Messages"]) == 1
    assert poll_for(opened, 1.0) == []
    assert not opened.caught_up()
    sqs_server.client().delete_message(
        QueueUrl=queue, ReceiptHandle=taken["Messages"][0]["ReceiptHandle"]
    )
    time.sleep(0.6)  # past the counts' time to live
    assert opened.caught_up()


def test_redelivered_messages_count_their_receives(
    sqs_server: brokers.MotoServer, queue: str
) -> None:
    send(sqs_server, queue, ["again"])
    for expected in (0, 1, 2):
        source = registry.open_source(mapping_for(queue))
        source.open(RecordingListener())
        try:
            (record,) = poll_n(source, 1, 5)
            assert record.attempts == expected and record.redelivered == (expected > 0)
            assert source.fingerprint(record).endswith(record.meta.message_id)
        finally:
            source.close()  # unsettled: visible again at once


def test_a_fifo_queue_keeps_each_group_in_order(sqs_server: brokers.MotoServer) -> None:
    url = sqs_server.create_queue(brokers.unique_name("sqs") + ".fifo")
    client = sqs_server.client()
    for i in range(30):
        client.send_message(
            QueueUrl=url,
            MessageBody=str(i),
            MessageGroupId=f"g{i % 3}",
            MessageDeduplicationId=f"d{i}",
        )
    seen: dict[str, list[int]] = {}
    lock = threading.Lock()
    failed_once: set[int] = set()

    def handler(event: dict[str, Any], request: InvocationRequest) -> Any:
        failures: list[dict[str, str]] = []
        with lock:
            for item in event["Records"]:
                n = int(item["body"])
                if (n == 10 and n not in failed_once) or failures:
                    # As Lambda asks of FIFO handlers (and Powertools' SqsFifoPartialProcessor
                    # does): the first failure and everything after it is reported.
                    failed_once.add(n)
                    failures.append({"itemIdentifier": item["messageId"]})
                    continue
                seen.setdefault(item["attributes"]["MessageGroupId"], []).append(n)
        return {"batchItemFailures": failures}

    mapping = mapping_for(url, batch_size=10, parallelization_factor=3)
    source = registry.open_source(mapping)
    assert source.capabilities.ordered
    poller = Poller(
        PollerSettings(
            mapping="fifo",
            function="f",
            limits=BatchLimits(batch_size=10, maximum_batching_window_s=0.05),
            parallelization_factor=3,
        ),
        source=source,
        invoker=DirectInvoker(handler),
        policy=Policy(report_batch_item_failures=True, retry_backoff_base_s=0.01),
        destination=MemoryDestination(),
    )
    poller.run(until_idle_s=1.0)
    for g in range(3):
        assert seen[f"g{g}"] == list(range(g, 30, 3)), seen
    assert 10 in failed_once


def test_fifo_batches_are_at_most_ten(sqs_server: brokers.MotoServer) -> None:
    url = sqs_server.create_queue(brokers.unique_name("sqs") + ".fifo")
    with pytest.raises(ConnectorConfigError, match="batch_size 11"):
        registry.open_source(mapping_for(url, batch_size=11))


def test_a_missing_queue_is_a_configuration_error(sqs_server: brokers.MotoServer) -> None:
    url = f"{sqs_server.endpoint_url}/123456789012/{brokers.unique_name('missing')}"
    source = registry.open_source(mapping_for(url))
    with pytest.raises(ConnectorConfigError, match="does not exist"):
        source.open(RecordingListener())
    source.close()
