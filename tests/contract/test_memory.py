"""The contract on the memory connector: its Kafka-like log (offsets) and its Redis-like log
(acks, pending entries), opened through the registry as `workers run` opens them. No broker, so
these run with the unit tests, in seconds."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from connectors.memory.broker import MemoryDestination, named_broker
from tests.contract import AckContract, OffsetContract, PauseContract, SourceContract
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

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        items = [item for stream in event["records"].values() for item in stream]
        return [base64.b64decode(item["fields"]["value"]) for item in items]
