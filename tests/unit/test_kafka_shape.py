"""The Kafka event is built anew for every invocation and shares nothing mutable with its
records: what a handler does to its event never reaches a retry of the same records."""

from __future__ import annotations

import copy
from typing import Any

from connectors.kafka.shape import KafkaMeta, KafkaShape
from connectors.memory.broker import MemoryDestination, MemoryLogSource
from tests.engine import DirectInvoker, fake_broker, kafka_items, value_of
from workers.engine.batcher import BatchLimits
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.records import Record


def read(n: int) -> list[Record]:
    meta = KafkaMeta("t", 0)
    return [
        Record("t-0", i, b"v%d" % i, b"k", 1_700_000_000_000 + i, [("h", b"ab")], meta=meta)
        for i in range(n)
    ]


def mangle(event: dict[str, Any]) -> None:
    """What a handler given the event itself (thread isolation) might do to it."""
    for item in kafka_items(event):
        item["value"] = "changed"
        item["offset"] = -1
        item.pop("key", None)
        item["headers"][0]["h"].append(0)
        item["headers"].append({"added": [1]})
    for items in event["records"].values():
        items.reverse()


def test_event_leaves_its_records_as_they_are() -> None:
    records = read(3)
    before = copy.deepcopy([(r.value, r.key, r.headers, r.meta) for r in records])

    event = KafkaShape("b").event(records)
    mangle(event)

    assert [(r.value, r.key, r.headers, r.meta) for r in records] == before


def test_a_changed_event_does_not_reach_the_next_event_of_the_same_records() -> None:
    shape = KafkaShape("b")
    records = read(3)
    first = shape.event(records)
    expected = copy.deepcopy(first)

    mangle(first)

    assert shape.event(records) == expected


def test_a_retried_batch_gets_the_event_its_first_attempt_got_before_the_handler_changed_it() -> (
    None
):
    broker = fake_broker()
    broker.create_topic("t")
    for i in range(3):
        broker.produce("t", b"%d" % i, b"k", headers=[("h", b"ab")])
    seen: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], request: Any) -> None:
        seen.append(copy.deepcopy(event))
        if len(seen) == 1:
            mangle(event)
            raise RuntimeError("failed after changing its event")

    invoker = DirectInvoker(handler)
    poller = Poller(
        PollerSettings(mapping="m", function="f", limits=BatchLimits(batch_size=10)),
        source=MemoryLogSource(broker, "t", "g"),
        invoker=invoker,
        policy=Policy(maximum_retry_attempts=1),
        destination=MemoryDestination(),
        clock=broker.clock,
    )
    poller.run(until_idle_s=1.0)

    assert len(seen) == 2
    assert seen[1] == seen[0]
    assert [value_of(i) for i in kafka_items(seen[1])] == [b"0", b"1", b"2"]
    assert [i["headers"] for i in kafka_items(seen[1])] == [[{"h": [97, 98]}]] * 3
