"""Builds a mapping's source and destination from its configuration, importing drivers lazily.

Only the connector a mapping uses is imported, so a deployment needs only its broker's extra.
"""

from __future__ import annotations

import logging

from connectors.base import DeadLetterStore, Destination, Source, SourcePublisher
from workers import config as cfg

log = logging.getLogger("connectors")


def open_source(mapping: cfg.EventSourceMapping, instance: int = 0) -> Source:
    src = mapping.source
    if isinstance(src, cfg.KafkaSource):
        from connectors.kafka import KafkaSource

        return KafkaSource(mapping, instance)
    if isinstance(src, cfg.RabbitMQSource):
        from connectors.rabbitmq import RabbitMQSource

        return RabbitMQSource(mapping, instance)
    if isinstance(src, cfg.RedisSource):
        from connectors.redis import RedisSource

        return RedisSource(mapping, instance)
    if isinstance(src, cfg.MemorySource):
        from connectors.memory import MemoryBroker, MemoryLogSource

        broker = MemoryBroker()
        broker.create_topic(src.topic, src.partitions)
        for i in range(src.generate):
            key = f"key-{i % src.keys}".encode() if src.keys else None
            value = b'{"id": %d, "kind": "%s"}' % (i, b"order" if i % 2 else b"refund")
            broker.produce(src.topic, value, key, partition=None if key else i % src.partitions)
        return MemoryLogSource(broker, src.topic, mapping.name)
    raise ValueError(f"mapping {mapping.name}: no connector for source type {src.type!r}")


def open_destination(mapping: cfg.EventSourceMapping) -> Destination | None:
    if mapping.destination_config is None:
        return None
    dst = mapping.destination_config.on_failure
    if isinstance(dst, cfg.FileDestination):
        from connectors.file import FileDestination

        return FileDestination(dst.path, mapping.name)
    if isinstance(dst, cfg.KafkaDestination):
        from connectors.kafka import KafkaDestination

        return KafkaDestination(dst, mapping)
    if isinstance(dst, cfg.RabbitMQDestination):
        from connectors.rabbitmq import RabbitMQDestination

        return RabbitMQDestination(dst, mapping)
    if isinstance(dst, cfg.RedisDestination):
        from connectors.redis import RedisDestination

        return RedisDestination(dst, mapping)
    raise ValueError(f"mapping {mapping.name}: no destination for type {dst.type!r}")


def probe(mapping: cfg.EventSourceMapping) -> list[str]:
    """Connect to the mapping's source and destination and disconnect (`validate --connect`);
    returns what was checked of the destination (nothing when there is none)."""
    checked = []
    if mapping.destination_config is not None:
        from connectors.probes import probe_destination

        checked.append(probe_destination(mapping.destination_config.on_failure))
    _probe_source(mapping)
    return checked


def _probe_source(mapping: cfg.EventSourceMapping) -> None:
    src = mapping.source
    if isinstance(src, cfg.KafkaSource):
        from connectors.kafka import probe_kafka

        probe_kafka(src)
    elif isinstance(src, cfg.RabbitMQSource):
        from connectors.rabbitmq import probe_rabbitmq

        probe_rabbitmq(src)
    elif isinstance(src, cfg.RedisSource):
        from connectors.redis import probe_redis

        probe_redis(src)


def open_dead_letter_store(mapping: cfg.EventSourceMapping) -> DeadLetterStore:
    """The mapping's on-failure destination, read back for `workers dlq`."""
    if mapping.destination_config is None:
        raise ValueError(f"mapping {mapping.name} has no on-failure destination")
    dst = mapping.destination_config.on_failure
    if isinstance(dst, cfg.FileDestination):
        from connectors.file import FileDeadLetterStore

        return FileDeadLetterStore(dst.path, mapping.name)
    if isinstance(dst, cfg.KafkaDestination):
        from connectors.kafka import KafkaDeadLetterStore

        return KafkaDeadLetterStore(dst, mapping)
    if isinstance(dst, cfg.RabbitMQDestination):
        from connectors.rabbitmq import RabbitMQDeadLetterStore

        return RabbitMQDeadLetterStore(dst, mapping)
    if isinstance(dst, cfg.RedisDestination):
        from connectors.redis import RedisDeadLetterStore

        return RedisDeadLetterStore(dst, mapping)
    raise ValueError(f"mapping {mapping.name}: cannot read back destination type {dst.type!r}")


def open_source_publisher(mapping: cfg.EventSourceMapping) -> SourcePublisher:
    """Publishes records back onto the mapping's source (`dlq replay --to source`)."""
    src = mapping.source
    if isinstance(src, cfg.KafkaSource):
        from connectors.kafka import KafkaSourcePublisher

        return KafkaSourcePublisher(src)
    if isinstance(src, cfg.RabbitMQSource):
        from connectors.rabbitmq import RabbitMQSourcePublisher

        return RabbitMQSourcePublisher(src)
    if isinstance(src, cfg.RedisSource):
        from connectors.redis import RedisSourcePublisher

        return RedisSourcePublisher(src)
    raise ValueError(f"mapping {mapping.name}: cannot publish to a {src.type} source")
