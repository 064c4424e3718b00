"""What the RabbitMQ source, destination, dead-letter store and publisher share: pika's setup,
the connector's errors, connection parameters and a confirmed publishing channel."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

import connectors.rabbitmq.pika_compat as pika_compat
from workers.engine.ports import ConnectorConfigError, LetterTooLarge
from workers.engine.redact import describe

log = logging.getLogger("connectors.rabbitmq")
# pika logs each failure it then raises (with tracebacks, on every reconnect attempt); the
# engine logs the raised error once. Left alone if the application configured pika itself.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)
# A header field pika cannot decode would drop the connection in a loop (see pika_compat).
pika_compat.install()


class RabbitMQConfigError(ConnectorConfigError):
    """A problem that reconnecting will not fix: bad credentials, vhost, permissions."""


class QueueNotFound(RabbitMQConfigError):
    """The source queue does not exist; esm-workers never creates it."""


class ConsumerCancelled(ConnectionError):
    """The broker cancelled our consumer (queue deleted, quorum leader lost); reconnect."""


class DeliveryRefused(RuntimeError):
    """The broker did not take a dead letter (unroutable, nacked or missing exchange)."""


RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    ConsumerCancelled,
)

AUTH_ERRORS = (
    pika.exceptions.AuthenticationError,
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
)


def broker_address(url: str) -> str:
    """host:port of an AMQP URL (never its credentials)."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{parts.hostname}:{port}"


def connection_parameters(url: str, name: str) -> pika.URLParameters:
    """pika's parameters for `url`; amqps:// gets a default (verifying) TLS context from pika."""
    params = pika.URLParameters(url)
    if params.client_properties is None:
        # Shown by `rabbitmqctl list_connections client_properties` and the management UI.
        params.client_properties = {"connection_name": name, "product": "esm-workers"}
    return params


def close_quietly(connection: BlockingConnection | None) -> None:
    if connection is None or not connection.is_open:
        return
    try:
        connection.close()
    except Exception as exc:  # closing a broken connection has nothing left to report
        log.debug("closing a RabbitMQ connection failed: %s", describe(exc))


def queue_error(exc: pika.exceptions.ChannelClosedByBroker, where: str) -> Exception:
    if exc.reply_code == 404:
        return QueueNotFound(f"{where} does not exist (esm-workers does not create source queues)")
    if exc.reply_code == 403:
        return RabbitMQConfigError(f"access to {where} refused: {exc.reply_text}")
    error: Exception = exc
    return error


# RabbitMQ (3.8+) closes the channel of a publish whose body is over `max_message_size`
# (128 MiB by default, 16 MiB from 4.0) with 406 and this text (rabbit_channel:check_msg_size).
_SIZE_REFUSAL = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def size_refusal_limit(reply_code: int, reply_text: str) -> int | None:
    """The broker's max message size when a channel close refused a message for its size."""
    if reply_code != 406:
        return None
    found = _SIZE_REFUSAL.search(reply_text or "")
    return int(found.group(2)) if found else None


class ConfirmedChannel:
    """One connection and channel in confirm mode for a publisher, reopened when lost.

    `basic_publish` on a confirm-mode channel returns once the broker took the message, and
    `mandatory` makes an unroutable message come back (Basic.Return) instead of vanishing.
    https://www.rabbitmq.com/docs/confirms
    """

    def __init__(self, url: str, connection_name: str, where: str) -> None:
        self.url = url
        self.connection_name = connection_name
        self.where = where
        self.user: str | None = None  # who publishes: the broker refuses any other user-id
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def publish(
        self,
        messages: Iterable[tuple[str, str, bytes, pika.BasicProperties]],
        what: str,
        unroutable: str,
    ) -> None:
        """Publish (exchange, routing key, body, properties) tuples; raises unless all confirmed."""
        channel = self._open()
        try:
            for exchange, routing_key, body, properties in messages:
                channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            raise DeliveryRefused(f"{what} unroutable: {unroutable}") from None
        except pika.exceptions.NackError:
            raise DeliveryRefused(f"the broker refused (nack) {what} for {self.where}") from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            self.reset()
            limit = size_refusal_limit(exc.reply_code, exc.reply_text)
            if limit is not None:
                raise LetterTooLarge(
                    f"publishing {what} to {self.where}: {exc.reply_text}", limit
                ) from None
            raise DeliveryRefused(f"publishing {what} to {self.where}: {exc.reply_text}") from None
        except pika.exceptions.AMQPError:
            self.reset()
            raise

    def _open(self) -> BlockingChannel:
        if self._connection is not None and self._channel is not None:
            try:
                # Answers heartbeats and notices a connection the broker closed while idle.
                self._connection.process_data_events(time_limit=0)
                if self._channel.is_open:
                    return self._channel
            except pika.exceptions.AMQPError as exc:
                log.info("connection to %s lost: %s", self.where, describe(exc))
            self.reset()
        params = connection_parameters(self.url, self.connection_name)
        if params.blocked_connection_timeout is None:
            # A broker under a resource alarm blocks publishers; fail and retry instead of hanging.
            params.blocked_connection_timeout = 30.0
        self.user = getattr(params.credentials, "username", None)
        try:
            connection = pika.BlockingConnection(params)
        except AUTH_ERRORS as exc:
            raise RabbitMQConfigError(f"cannot publish to {self.where}: {describe(exc)}") from None
        try:
            channel = connection.channel()
            channel.confirm_delivery()
        except BaseException:
            close_quietly(connection)
            raise
        self._connection, self._channel = connection, channel
        return channel

    def reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)
