"""RabbitMQ queues, through pika."""

from __future__ import annotations

from typing import Any

from connectors.rabbitmq import config
from connectors.rabbitmq.shape import RabbitShape
from workers.engine.ports import Connector, DeadLetterStore, Destination, Source, SourcePublisher


def _source(mapping: Any, instance: int) -> Source:
    from connectors.rabbitmq.source import RabbitMQSource

    return RabbitMQSource(mapping, instance)


def _destination(dst: Any, mapping: Any) -> Destination:
    from connectors.rabbitmq.destination import RabbitMQDestination

    return RabbitMQDestination(dst, mapping)


def _store(dst: Any, mapping: Any) -> DeadLetterStore:
    from connectors.rabbitmq.store import RabbitMQDeadLetterStore

    return RabbitMQDeadLetterStore(dst, mapping)


def _publisher(src: Any) -> SourcePublisher:
    from connectors.rabbitmq.publisher import RabbitMQSourcePublisher

    return RabbitMQSourcePublisher(src)


def _probe_source(src: Any) -> None:
    from connectors.rabbitmq.probe import probe_rabbitmq

    probe_rabbitmq(src)


def _probe_destination(dst: Any) -> str:
    from connectors.rabbitmq.probe import probe_destination

    return probe_destination(dst)


def _shape(event: dict[str, Any]) -> RabbitShape:
    arn = str(event.get("eventSourceArn", ""))
    return RabbitShape(arn.rsplit(":", 1)[-1] if arn else "")


CONNECTOR = Connector(
    name="rabbitmq",
    source_settings=config.RabbitMQSource,
    destination_settings=config.RabbitMQDestination,
    event_sources=("aws:rmq",),
    shape_for_event=_shape,
    open_source=_source,
    open_destination=_destination,
    open_store=_store,
    open_publisher=_publisher,
    probe_source=_probe_source,
    probe_destination=_probe_destination,
)
