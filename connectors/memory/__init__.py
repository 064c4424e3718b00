"""The in-process broker: for tests, trying things out and the engine's contract suite."""

from __future__ import annotations

from typing import Any

from connectors.memory import config
from workers.engine.ports import Connector, Source


def _source(mapping: Any, instance: int) -> Source:
    from connectors.memory.broker import MemoryBroker, MemoryLogSource

    src = mapping.source
    broker = MemoryBroker()
    broker.create_topic(src.topic, src.partitions)
    for i in range(src.generate):
        key = f"key-{i % src.keys}".encode() if src.keys else None
        value = b'{"id": %d, "kind": "%s"}' % (i, b"order" if i % 2 else b"refund")
        broker.produce(src.topic, value, key, partition=None if key else i % src.partitions)
    return MemoryLogSource(broker, src.topic, mapping.name)


CONNECTOR = Connector(name="memory", source_settings=config.MemorySource, open_source=_source)
