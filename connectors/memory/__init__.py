"""The in-process broker: for tests, trying things out and the engine's contract suite."""

from __future__ import annotations

from typing import Any

from connectors.memory import config
from workers.engine.ports import Connector, Source


def _source(mapping: Any, instance: int) -> Source:
    from connectors.memory.broker import MemoryBroker, MemoryLogSource, named_broker
    from connectors.memory.stream import MemoryStreamSource

    src = mapping.source
    broker = MemoryBroker() if src.broker is None else named_broker(src.broker)
    if broker.create_topic(src.topic, src.partitions):  # a shared broker's topic is filled once
        for i in range(src.generate):
            key = f"key-{i % src.keys}".encode() if src.keys else None
            value = b'{"id": %d, "kind": "%s"}' % (i, b"order" if i % 2 else b"refund")
            broker.produce(src.topic, value, key, partition=None if key else i % src.partitions)
    if src.checkpoint == "ack":
        return MemoryStreamSource(broker, src.topic, mapping.name)
    return MemoryLogSource(broker, src.topic, mapping.name)


CONNECTOR = Connector(name="memory", source_settings=config.MemorySource, open_source=_source)
