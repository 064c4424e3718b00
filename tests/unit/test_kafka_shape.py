"""The Kafka event takes the items the connector built while reading without changing its
records, and shares nothing mutable with them: what a handler does to its event never reaches a
retry of the same records."""

from __future__ import annotations

import copy
from typing import Any

from connectors.kafka.shape import KafkaMeta, KafkaShape, kafka_item
from connectors.memory.broker import MemoryDestination, MemoryLogSource
from tests.engine import DirectInvoker, fake_broker, kafka_items, value_of
from workers.engine.batcher import BatchLimits
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.records import Record


def with_item(r: Record) -> Record:
    """The record as the Kafka connector hands it out: its event item built while reading."""
    meta: KafkaMeta = r.meta
    r.item = kafka_item(
        meta.topic,
        meta.partition,
        r.position,
        r.timestamp_ms,
        meta.timestamp_type,
        r.key,
        r.value,
        r.headers,
    )
    return r


def read(n: int) -> list[Record]:
    meta = KafkaMeta("t", 0)
    return [
        with_item(
            Record("t-0", i, b"v%d" % i, b"k", 1_700_000_000_000 + i, [("h", b"ab")], meta=meta)
        )
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
    before = [(r.item, copy.deepcopy(r.item)) for r in records]

    event = KafkaShape("b").event(records)

    assert [(r.item, copy.deepcopy(r.item)) for r in records] == before
    assert all(r.item is item for r, (item, _) in zip(records, before, strict=True))
    assert kafka_items(event) == [snapshot for _, snapshot in before]


def test_a_changed_event_does_not_reach_the_next_event_of_the_same_records() -> None:
    shape = KafkaShape("b")
    records = read(3)
    first = shape.event(records)
    expected = copy.deepcopy(first)

    mangle(first)

    assert shape.event(records) == expected
    rebuilt = [
        Record(r.source, r.position, r.value, r.key, r.timestamp_ms, r.headers, meta=r.meta)
        for r in records
    ]
    assert shape.event(rebuilt) == expected  # the same event as one built without items


class ItemSource(MemoryLogSource):
    """The memory log, handing out records with their items built as the Kafka connector does."""

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        return [with_item(r) for r in super().poll(max_records, timeout_s)]


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
        source=ItemSource(broker, "t", "g"),
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
