"""`workers validate --connect` for RabbitMQ: the source queue exists; the dead-letter exchange
and queue exist and can be written, so a mapping never starts with letters that nothing can
store (they would stall their partition until it is fixed)."""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from connectors.rabbitmq import config as cfg
from connectors.rabbitmq.connection import (
    RabbitMQConfigError,
    close_quietly,
    connection_parameters,
    queue_error,
)
from workers.engine.probing import CONNECT_TIMEOUT_S, DestinationUnusable
from workers.engine.redact import describe, redact_url


def _connect(url: str) -> BlockingConnection:
    """A connection that gives up within the probe's time; raises pika's AMQPError."""
    params = connection_parameters(url, "esm-workers validate")
    params.socket_timeout = CONNECT_TIMEOUT_S
    params.stack_timeout = 2 * CONNECT_TIMEOUT_S
    return pika.BlockingConnection(params)


def probe_rabbitmq(src: cfg.RabbitMQSource) -> None:
    """Connect, check that the queue exists, disconnect; raises with a readable message."""
    where = f"queue {src.queue!r} in vhost {src.virtual_host!r} at {redact_url(src.url)}"
    try:
        connection = _connect(src.url)
    except pika.exceptions.AMQPError as exc:
        raise RabbitMQConfigError(f"cannot connect for {where}: {describe(exc)}") from None
    try:
        channel = connection.channel()
        try:
            channel.queue_declare(src.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise queue_error(exc, where) from None
    finally:
        close_quietly(connection)


def probe_destination(dst: cfg.RabbitMQDestination) -> str:
    where = redact_url(dst.url)
    try:
        connection = _connect(dst.url)
    except pika.exceptions.AMQPError as exc:
        raise DestinationUnusable(f"cannot connect to {where}: {exc!r}") from None
    checked = []
    try:
        # Passive declarations: each checks that the object exists without creating it, and a
        # refusal closes only that channel.
        if dst.exchange:
            _passive(connection, lambda ch: ch.exchange_declare(dst.exchange, passive=True))
            checked.append(f"exchange {dst.exchange!r}")
        queue = dst.letters_queue
        if queue:
            _passive(connection, lambda ch: ch.queue_declare(queue, passive=True))
            checked.append(f"queue {queue!r}")
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise DestinationUnusable(
            f"{where}: {exc.reply_text} (esm-workers does not create dead-letter queues or"
            " exchanges)"
        ) from None
    finally:
        close_quietly(connection)
    return f"{' and '.join(checked) or 'the default exchange'} at {where} exist"


def _passive(connection: Any, declare: Any) -> None:
    channel = connection.channel()
    declare(channel)
    channel.close()
