"""The contract on the memory connector: its Kafka-like log (offsets) and its Redis-like log
(acks, pending entries), opened through the registry as `workers run` opens them. No broker, so
these run with the unit tests, in seconds."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from connectors.memory.broker import MemoryDestination, MemoryLogSource, named_broker
from connectors.memory.stream import MemoryStreamSource
from tests.contract import (
    AckContract,
    OffsetContract,
    PauseContract,
    RecordingListener,
    SourceContract,
)
from tests.engine import kafka_items, value_of
from workers.app import config as cfg
from workers.app import registry
from workers.engine.ports import Destination, Source


class MemoryContract(SourceContract):
    checkpoint = "offset"
    # Nothing to join and no network: records are there at once, and absent ones are absent.
    join_timeout_s = 0.3
    quiet_s = 0.2
    idle_s = 0.2

    @pytest.fixture(autouse=True)
    def _broker(self) -> None:
        self.broker_name = f"contract-{uuid.uuid4().hex[:10]}"
        self.broker = named_broker(self.broker_name)
        self.destinations: dict[str, MemoryDestination] = {}

    def make_source(self, name: str) -> Source:
        mapping = cfg.EventSourceMapping.model_validate(
            {
                "name": name,
                "function": "f",
                "source": {
                    "type": "memory",
                    "topic": name,
                    "partitions": 3,
                    "broker": self.broker_name,
                    "checkpoint": self.checkpoint,
                },
            }
        )
        return registry.open_source(mapping)

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        self.broker.create_topic(name, 3)
        for i, (value, key) in enumerate(zip(values, keys, strict=True)):
            self.broker.produce(name, value, key, partition=None if key else i % 3)

    def make_destination(self, name: str) -> Destination:
        return self.destinations.setdefault(name, MemoryDestination())

    def dead_letter_values(self, name: str) -> list[bytes]:
        letters = self.destinations[name].letters if name in self.destinations else []
        return [v for letter in letters for v in self.event_values(letter["payload"])]


class TestMemoryLogContract(MemoryContract, OffsetContract, PauseContract):
    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        return [value_of(item) for item in kafka_items(event)]


class TestMemoryStreamContract(MemoryContract, AckContract, PauseContract):
    checkpoint = "ack"
    delivery_counts = True  # the group's pending entries count them

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        items = [item for stream in event["records"].values() for item in stream]
        return [base64.b64decode(item["fields"]["value"]) for item in items]


def memory_mapping(**source: Any) -> cfg.EventSourceMapping:
    return cfg.EventSourceMapping.model_validate(
        {"name": "m", "function": "f", "source": {"type": "memory", "topic": "t", **source}}
    )


def test_sources_have_brokers_of_their_own_unless_they_name_a_shared_one() -> None:
    listener = RecordingListener()
    own = [registry.open_source(memory_mapping(generate=5), i) for i in (0, 1)]
    for source in own:
        source.open(listener)
        assert len(source.poll(10, 0)) == 5  # each its own broker, filled with samples
    assert isinstance(own[0], MemoryLogSource)
    name = f"shared-{uuid.uuid4().hex[:10]}"
    shared = [
        registry.open_source(memory_mapping(generate=5, broker=name, checkpoint="ack"), i)
        for i in (0, 1)
    ]
    assert isinstance(shared[0], MemoryStreamSource)
    shared[0].open(listener)
    records = shared[0].poll(10, 0)
    assert len(records) == 5  # filled once, by the first source opened
    shared[0].ack(records)
    shared[1].open(listener)
    assert shared[1].poll(10, 0) == []  # the same group, on the same broker
