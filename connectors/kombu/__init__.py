"""Queues of any kombu transport (amqp://, redis://, memory://, ...) in Lambda's SQS event shape."""

from __future__ import annotations

from typing import Any

from connectors.kombu import config
from connectors.kombu.shape import KombuShape
from workers.engine.ports import Connector, lazy

# kombu's transport aliases (kombu.transport.TRANSPORT_ALIASES, less its SQS ones): the
# `eventSource` of an event is "kombu:" and the scheme of the source's URL.
TRANSPORTS = (
    "amqp",
    "amqps",
    "pyamqp",
    "librabbitmq",
    "redis",
    "rediss",
    "sentinel",
    "memory",
    "filesystem",
    "mongodb",
    "sqla",
    "sqlalchemy",
    "zookeeper",
    "etcd",
    "consul",
    "qpid",
    "azureservicebus",
    "azurestoragequeues",
    "gcpubsub",
    "confluentkafka",
    "kafka",
    "pgmq",
    "pyro",
    "slmq",
)


def _shape(event: dict[str, Any]) -> KombuShape:
    return KombuShape.for_event(event)


CONNECTOR = Connector(
    name="kombu",
    source_settings=config.KombuSource,
    event_sources=tuple(f"kombu:{name}" for name in TRANSPORTS),
    shape_for_event=_shape,
    open_source=lazy("connectors.kombu.source", "KombuSource"),
    probe_source=lazy("connectors.kombu.source", "probe_kombu"),
)
