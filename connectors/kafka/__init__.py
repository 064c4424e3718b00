"""Kafka and Kafka-protocol brokers, through confluent-kafka (librdkafka)."""

from __future__ import annotations

from typing import Any

from connectors.kafka import config
from connectors.kafka.shape import MSK, SELF_MANAGED, KafkaShape
from workers.engine.ports import Connector, DeadLetterStore, Destination, Source, SourcePublisher


def _source(mapping: Any, instance: int) -> Source:
    from connectors.kafka.source import KafkaSource

    return KafkaSource(mapping, instance)


def _destination(dst: Any, mapping: Any) -> Destination:
    from connectors.kafka.destination import KafkaDestination

    return KafkaDestination(dst, mapping)


def _store(dst: Any, mapping: Any) -> DeadLetterStore:
    from connectors.kafka.store import KafkaDeadLetterStore

    return KafkaDeadLetterStore(dst, mapping)


def _publisher(src: Any) -> SourcePublisher:
    from connectors.kafka.publisher import KafkaSourcePublisher

    return KafkaSourcePublisher(src)


def _probe_source(src: Any) -> None:
    from connectors.kafka.probe import probe_kafka

    probe_kafka(src)


def _probe_destination(dst: Any) -> str:
    from connectors.kafka.probe import probe_destination

    return probe_destination(dst)


def _shape(event: dict[str, Any]) -> KafkaShape:
    # An MSK event read back (a dead letter replayed to the function) is built again as MSK's.
    arn = str(event.get("eventSourceArn", "")) if event.get("eventSource") == MSK else None
    return KafkaShape(str(event.get("bootstrapServers", "")), arn)


CONNECTOR = Connector(
    name="kafka",
    source_settings=config.KafkaSource,
    destination_settings=config.KafkaDestination,
    event_sources=(SELF_MANAGED, MSK),
    shape_for_event=_shape,
    open_source=_source,
    open_destination=_destination,
    open_store=_store,
    open_publisher=_publisher,
    probe_source=_probe_source,
    probe_destination=_probe_destination,
)
