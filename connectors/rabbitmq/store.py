"""The RabbitMQ dead-letter queue read back for `workers dlq`: letters held unacked until
replayed, given back to the queue otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from connectors.rabbitmq import config as cfg
from connectors.rabbitmq.connection import (
    AUTH_ERRORS,
    RabbitMQConfigError,
    close_quietly,
    connection_parameters,
    log,
    queue_error,
)
from workers.engine.letters import parse_letter
from workers.engine.ports import StoredLetter
from workers.engine.redact import describe, redact_url

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping


class LetterNotSettled(RuntimeError):
    """A letter could not be acked; the broker keeps it and a later replay offers it again."""


class RabbitMQDeadLetterStore:
    """Reads the dead-letter queue back: `pending()` takes each letter with `basic_get` and holds
    it unacked, `done()` acks it, `close()` closes the connection so that the broker puts every
    letter still held back in the queue. Listing or showing letters therefore changes nothing,
    and a replay that stops halfway leaves what it did not finish.

    Holding a letter counts as a delivery on a quorum queue (its x-delivery-count rises each
    time); with a `delivery-limit` set, a letter read often enough is dropped or dead-lettered by
    the broker, so a classic queue (or a quorum queue without a limit) suits dead letters best.
    """

    def __init__(self, dst: cfg.RabbitMQDestination, mapping: EventSourceMapping) -> None:
        if not dst.letters_queue:
            raise RabbitMQConfigError(
                f"mapping {mapping.name}: dead letters go to exchange {dst.exchange!r} with"
                f" routing key {dst.routing_key!r}, so `workers dlq` cannot tell which queue holds"
                " them: set destination_config.on_failure.queue to that queue"
            )
        self.url = dst.url
        self.queue = dst.letters_queue
        self.mapping = mapping.name
        self._where = f"dead-letter queue {self.queue!r} at {redact_url(self.url)}"
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        # Letters offered and not yet acked, by delivery tag, on the current channel; and how
        # many messages that are no letters this channel holds unacked.
        self._held: dict[int, str] = {}
        self._skipped = 0

    def pending(self) -> Iterator[StoredLetter]:
        if self._held or self._skipped:
            # An earlier pending() left messages unsettled: they go back, to be offered again.
            # Not with basic.nack: its requeue may land after the count below is taken, while
            # a channel's close-ok comes once its messages are back in the queue.
            self._reset()
        channel = self._open_channel()
        try:
            declared = channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._reset()
            if exc.reply_code == 404:
                raise RabbitMQConfigError(f"{self._where} does not exist") from None
            raise queue_error(exc, self._where) from None
        # Only the letters ready now: letters a replay writes back land behind them, and those
        # this store holds unacked are not ready, so basic_get never offers one twice.
        for _ in range(declared.method.message_count):
            method, properties, body = channel.basic_get(self.queue, auto_ack=False)
            if method is None:
                return  # someone else consumed the rest
            tag: int = method.delivery_tag
            letter, problem = parse_letter(body)
            if letter is None:
                # Left unacked: closing puts it back, for whoever knows what it is.
                self._skipped += 1
                log.warning(
                    "mapping %s: %s: message %s (delivery tag %d) skipped, not a dead letter: %s",
                    self.mapping,
                    self._where,
                    properties.message_id or "without message id",
                    tag,
                    problem,
                )
                continue
            letter_id = str(letter["requestContext"]["requestId"])
            self._held[tag] = letter_id
            yield StoredLetter(letter_id, letter, handle=tag)

    def done(self, stored: StoredLetter) -> None:
        tag = stored.handle
        channel = self._channel
        if channel is None or not isinstance(tag, int) or self._held.get(tag) != stored.id:
            raise LetterNotSettled(
                f"letter {stored.id} is not held by this reader of {self._where}"
                " (offered before a reconnect, or already done)"
            )
        try:
            channel.basic_ack(tag)
            # basic.ack has no reply. A channel handles its methods in order and closes on an
            # ack it refuses, so once this declare answers the channel has taken the ack and
            # passed it on to the queue; after a refusal the declare raises instead.
            channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.AMQPError as exc:
            self._reset()
            raise LetterNotSettled(
                f"letter {stored.id} could not be marked replayed in {self._where}:"
                f" {describe(exc)}; the broker keeps it and the next replay offers it again"
            ) from None
        del self._held[tag]

    def close(self) -> None:
        self._reset()

    def _open_channel(self) -> BlockingChannel:
        if self._connection is not None and self._channel is not None:
            if self._connection.is_open and self._channel.is_open:
                return self._channel
            self._reset()
        params = connection_parameters(self.url, f"esm-workers {self.mapping} dlq reader")
        if "heartbeat" not in parse_qs(urlsplit(self.url).query):
            # pika's blocking connection answers heartbeats only while it is called, and this one
            # idles while a letter is replayed: a missed heartbeat would make the broker close it
            # and take back the letter in progress. The URL's own setting wins.
            params.heartbeat = 0
        try:
            connection = pika.BlockingConnection(params)
        except AUTH_ERRORS as exc:
            raise RabbitMQConfigError(f"cannot read {self._where}: {describe(exc)}") from None
        try:
            channel = connection.channel()
        except BaseException:
            close_quietly(connection)
            raise
        self._connection, self._channel = connection, channel
        return channel

    def _reset(self) -> None:
        """Close the connection: the broker requeues every letter held and not acked."""
        self._held.clear()
        self._skipped = 0
        connection, channel = self._connection, self._channel
        self._connection, self._channel = None, None
        if channel is not None and channel.is_open:
            try:
                # Close-ok comes once the channel has given its unacked letters back, so a reader
                # right after us sees them in the queue.
                channel.close()
            except Exception as exc:
                log.debug("closing the dead-letter channel failed: %s", describe(exc))
        close_quietly(connection)
