"""`workers dlq replay` to the handler keeps order only where the letter's source had one: an SQS
standard queue's or a RabbitMQ queue's records are retried alone, an SQS FIFO group's from its
first failed record; and a replay gets the mapping's retries afresh."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from typing import Any

from connectors.memory.broker import MemoryDestination
from tests.engine import DirectInvoker
from workers.app.dlq import Replayer
from workers.engine.clock import FakeClock
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy
from workers.engine.ports import StoredLetter
from workers.events import records


def sqs_item(body: str, group: str | None) -> dict[str, Any]:
    attributes = {"ApproximateReceiveCount": "4", "SentTimestamp": "1700000000000"}
    if group is not None:
        attributes["MessageGroupId"] = group
    queue = "orders.fifo" if group is not None else "orders"
    return {
        "messageId": f"id-{body}",
        "receiptHandle": "handle",
        "body": body,
        "attributes": attributes,
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{queue}",
        "awsRegion": "us-east-1",
    }


def rmq_event(bodies: list[str]) -> dict[str, Any]:
    return {
        "eventSource": "aws:rmq",
        "eventSourceArn": "arn:aws:mq:local:000000000000:broker:memory",
        "rmqMessagesByQueue": {
            "orders::/": [
                {
                    "basicProperties": {"headers": {"x-delivery-count": 3}},
                    "redelivered": True,
                    "data": base64.b64encode(b.encode()).decode(),
                    "deliveryTag": i + 1,
                }
                for i, b in enumerate(bodies)
            ]
        },
    }


class Store:
    def __init__(self, payload: dict[str, Any]) -> None:
        letter = {"requestContext": {"requestId": "r1"}, "replayCount": 0, "payload": payload}
        self.stored = StoredLetter("r1", letter)
        self.done_ids: list[str] = []

    def pending(self) -> Iterator[StoredLetter]:
        yield self.stored

    def done(self, stored: StoredLetter) -> None:
        self.done_ids.append(stored.id)

    def close(self) -> None:
        pass


def replay(payload: dict[str, Any]) -> tuple[list[list[str]], MemoryDestination, Store]:
    """Replays one letter to a handler that fails its first record once (a partial response)."""
    seen: list[list[str]] = []

    def handler(event: dict[str, Any], request: InvocationRequest) -> Any:
        got = list(records(copy.deepcopy(event)))
        seen.append([r.value.decode() for r in got])
        if len(seen) == 1:
            return {"batchItemFailures": [{"itemIdentifier": got[0].item_identifier}]}
        return None

    destination = MemoryDestination()
    store = Store(payload)
    summary = Replayer(
        mapping="m",
        function="f",
        store=store,
        to="handler",
        policy=Policy(maximum_retry_attempts=2, report_batch_item_failures=True),
        invoker=DirectInvoker(handler),
        destination=destination,
        clock=FakeClock(),
    ).run()
    assert summary.succeeded == 3 and summary.failed_again == 0
    return seen, destination, store


def test_a_standard_queues_letter_retries_only_the_failed_message() -> None:
    seen, destination, store = replay({"Records": [sqs_item(b, None) for b in "abc"]})
    # Retried alone; and though the letter's messages had been received four times, the replay
    # had the mapping's two retries to use.
    assert seen == [["a", "b", "c"], ["a"]]
    assert destination.letters == [] and store.done_ids == ["r1"]


def test_a_fifo_letter_keeps_its_groups_order() -> None:
    seen, _, _ = replay({"Records": [sqs_item(b, "g") for b in "abc"]})
    assert seen == [["a", "b", "c"], ["a", "b", "c"]]


def test_a_rabbitmq_letter_retries_only_the_failed_message() -> None:
    seen, _, _ = replay(rmq_event(["a", "b", "c"]))
    assert seen == [["a", "b", "c"], ["a"]]
