"""`workers validate --connect` for a RabbitMQ dead-letter exchange and queue: it exists and can be
written, so a mapping never starts with letters that nothing can store (they would stall their
partition until it is fixed)."""

from __future__ import annotations

from typing import Any

from connectors.rabbitmq import config as cfg
from workers.engine.probing import CONNECT_TIMEOUT_S, DestinationUnusable
from workers.engine.redact import redact_url


def probe_destination(dst: cfg.RabbitMQDestination) -> str:
    import pika
    import pika.exceptions

    from connectors.rabbitmq.connector import _close_quietly, connection_parameters

    where = redact_url(dst.url)
    params = connection_parameters(dst.url, "esm-workers validate")
    params.socket_timeout = CONNECT_TIMEOUT_S
    params.stack_timeout = 2 * CONNECT_TIMEOUT_S
    try:
        connection = pika.BlockingConnection(params)
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
        _close_quietly(connection)
    return f"{' and '.join(checked) or 'the default exchange'} at {where} exist"


def _passive(connection: Any, declare: Any) -> None:
    channel = connection.channel()
    declare(channel)
    channel.close()
