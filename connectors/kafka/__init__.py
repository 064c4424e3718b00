"""Kafka and Kafka-protocol brokers, through confluent-kafka (librdkafka)."""

from __future__ import annotations

from typing import Any

from connectors.kafka import config
from connectors.kafka.shape import MSK, SELF_MANAGED, KafkaShape
from workers.engine.ports import Connector, lazy


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
    open_source=lazy("connectors.kafka.source", "KafkaSource"),
    open_destination=lazy("connectors.kafka.destination", "KafkaDestination"),
    open_store=lazy("connectors.kafka.store", "KafkaDeadLetterStore"),
    open_publisher=lazy("connectors.kafka.publisher", "KafkaSourcePublisher"),
    probe_source=lazy("connectors.kafka.probe", "probe_kafka"),
    probe_destination=lazy("connectors.kafka.probe", "probe_destination"),
    open_rewinder=lazy("connectors.kafka.rewind", "KafkaRewinder"),
)
