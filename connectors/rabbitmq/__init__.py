"""RabbitMQ queues, through pika."""

from __future__ import annotations

from typing import Any

from connectors.rabbitmq import config
from connectors.rabbitmq.shape import RabbitShape
from workers.engine.ports import Connector, lazy


def _shape(event: dict[str, Any]) -> RabbitShape:
    arn = str(event.get("eventSourceArn", ""))
    return RabbitShape(arn.rsplit(":", 1)[-1] if arn else "")


CONNECTOR = Connector(
    name="rabbitmq",
    source_settings=config.RabbitMQSource,
    destination_settings=config.RabbitMQDestination,
    event_sources=("aws:rmq",),
    shape_for_event=_shape,
    open_source=lazy("connectors.rabbitmq.source", "RabbitMQSource"),
    open_destination=lazy("connectors.rabbitmq.destination", "RabbitMQDestination"),
    open_store=lazy("connectors.rabbitmq.store", "RabbitMQDeadLetterStore"),
    open_publisher=lazy("connectors.rabbitmq.publisher", "RabbitMQSourcePublisher"),
    probe_source=lazy("connectors.rabbitmq.probe", "probe_rabbitmq"),
    probe_destination=lazy("connectors.rabbitmq.probe", "probe_destination"),
)
