"""The RabbitMQ source: a queue consumer with manual acks, reconnecting after connection or
channel loss, acking settled deliveries in contiguous runs."""

from __future__ import annotations

import contextlib
import itertools
import time
import zlib
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from connectors.rabbitmq import config as cfg
from connectors.rabbitmq.connection import (
    AUTH_ERRORS,
    RETRYABLE_ERRORS,
    ConsumerCancelled,
    RabbitMQConfigError,
    broker_address,
    close_quietly,
    connection_parameters,
    log,
    queue_error,
)
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape, basic_properties, record_headers
from workers.engine.acks import AckCoalescer, settled_tags
from workers.engine.ports import (
    AssignmentListener,
    Capabilities,
    SourceBase,
    prefetch_window,
    undecodable,
)
from workers.engine.records import Record
from workers.engine.redact import describe, redact_url
from workers.engine.shapes import encoded_size

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping


def _stamp(message_id: Any, timestamp: Any, correlation_id: Any) -> str:
    """The fingerprint's part from the properties a publisher sets, as eight hex digits."""
    return f"{zlib.crc32(f'{message_id}|{timestamp}|{correlation_id}'.encode()):08x}"


# Most messages set none of them.
_NO_STAMP = _stamp(None, None, None)

# Bytes the basicProperties object adds to a record in the event, beyond the record overhead.
_PROPERTIES_BYTES = 300


def prefetch_for(mapping: EventSourceMapping) -> int:
    src = mapping.source
    assert isinstance(src, cfg.RabbitMQSource)
    if src.prefetch_count is not None:
        return src.prefetch_count
    return prefetch_window(mapping.batch_size, mapping.parallelization_factor)


class RabbitMQSource(SourceBase):
    """Consumes one queue with manual acks.

    pika's BlockingConnection belongs to the poller's loop thread, the only thread the engine
    calls a source from. Settled delivery tags are acked with one multiple-ack for the
    contiguous run from the lowest unacked tag, and one by one once held long enough (the
    engine's `AckCoalescer`).
    """

    capabilities = Capabilities(
        ordered=False,
        checkpoint="ack",
        pausable=False,
        stable_positions=False,
    )
    retryable_errors = RETRYABLE_ERRORS

    def __init__(self, mapping: EventSourceMapping, instance: int) -> None:
        src = mapping.source
        if not isinstance(src, cfg.RabbitMQSource):
            raise TypeError(f"mapping {mapping.name}: not a rabbitmq source")
        self.mapping = mapping.name
        self.url = src.url
        self.queue = src.queue
        self.vhost = src.virtual_host
        self.prefetch_count = prefetch_for(mapping)
        self.connection_name = f"esm-workers {mapping.name}#{instance}"
        self.shape = RabbitShape(broker_address(src.url))
        self._where = f"queue {self.queue!r} in vhost {self.vhost!r} at {redact_url(self.url)}"

        self._listener: AssignmentListener | None = None
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._ever_connected = False
        self._assigned = False
        self._cancelled = False
        # Position is ours, unique across reconnects: delivery tags restart at 1 on every channel.
        self._positions = itertools.count(1)
        # Deliveries received but not yet handed to the engine (loop thread only).
        self._pending: deque[tuple[Any, pika.spec.BasicProperties, bytes]] = deque()
        # Delivery tags of this channel, acked in as few frames as they can be.
        self._acks = AckCoalescer(self.prefetch_count)
        self._ready = 0  # messages ready in the queue at the last look
        self._ready_at = float("-inf")
        # Position -> delivery tag of this channel's records not yet settled.
        self._live: dict[int, int] = {}
        self.dropped_acks = 0  # settled records of a lost channel (the broker redelivers them)

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self, listener: AssignmentListener) -> None:
        self._listener = listener
        if self._channel is None:
            self._connect()

    def _connect(self) -> None:
        params = connection_parameters(self.url, self.connection_name)
        try:
            connection = pika.BlockingConnection(params)
        except AUTH_ERRORS as exc:
            if not self._ever_connected:
                raise RabbitMQConfigError(
                    f"cannot consume {self._where}: {describe(exc)}"
                ) from None
            raise  # after a good start: more likely a broker still booting
        try:
            channel = connection.channel()
            try:
                declared = channel.queue_declare(self.queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise queue_error(exc, self._where) from None
            channel.basic_qos(prefetch_count=self.prefetch_count)
            # https://www.rabbitmq.com/docs/consumer-cancel: sent when the queue goes away.
            channel.add_on_cancel_callback(self._on_cancel)
            channel.basic_consume(self.queue, self._on_message, auto_ack=False)
        except BaseException:
            close_quietly(connection)
            raise
        self._connection, self._channel = connection, channel
        self._cancelled = False
        self._ready = declared.method.message_count
        self._ready_at = time.monotonic()
        reconnected = self._ever_connected
        self._ever_connected = True
        log.info(
            "mapping %s: %s %s (prefetch %d)",
            self.mapping,
            "reconnected to" if reconnected else "consuming",
            self._where,
            self.prefetch_count,
        )
        self._assigned = True
        if self._listener is not None:
            self._listener.on_assigned([self.queue])

    def _drop(self, reason: BaseException | None) -> None:
        """Forget the channel: its unacked deliveries go back to the queue on the broker."""
        self._live.clear()
        self._pending.clear()
        self._acks.reset()
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)
        if reason is not None:
            log.warning("mapping %s: lost %s: %s", self.mapping, self._where, describe(reason))
        if self._assigned:
            self._assigned = False
            # Records of the dead channel still in the engine can no longer be acked; the
            # engine stops their batches and forgets them, the broker delivers them again.
            if self._listener is not None:
                self._listener.on_revoked([self.queue])

    def close(self) -> None:
        if self._channel is not None:
            try:
                self._flush_acks(final=True)
            except Exception as exc:
                log.warning("mapping %s: final acks not sent: %s", self.mapping, describe(exc))
        self._assigned = False  # a closing poller needs no revoke
        self._drop(None)

    # --- consuming -------------------------------------------------------------------------------

    def _on_message(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        self._pending.append((method, properties, body))
        self._acks.delivered(method.delivery_tag)

    def _on_cancel(self, frame: Any) -> None:
        self._cancelled = True

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._channel is None:
            self._connect()
        connection, channel = self._connection, self._channel
        assert connection is not None and channel is not None
        try:
            self._flush_acks()
            if not self._pending or max_records == 0:
                # Nothing to hand out: wait here, so an idle or full engine does not spin.
                connection.process_data_events(time_limit=max(timeout_s, 0.0))
            # Drain what the socket already holds (one read is at most one chunk of frames).
            while len(self._pending) < max_records:
                before = len(self._pending)
                connection.process_data_events(time_limit=0)
                if len(self._pending) == before:
                    break
            self._check(channel)
            records = self._take(max_records)
            self._flush_acks()
        except RETRYABLE_ERRORS as exc:
            self._drop(exc)
            raise
        return records

    def _check(self, channel: BlockingChannel) -> None:
        if self._cancelled:
            raise ConsumerCancelled(f"the broker cancelled the consumer of {self._where}")
        if not channel.is_open:
            reason = getattr(channel, "_closing_reason", None)
            if isinstance(reason, BaseException):
                raise reason
            raise pika.exceptions.ChannelWrongStateError(f"channel to {self._where} closed")

    def _take(self, max_records: int) -> list[Record]:
        n = min(max_records, len(self._pending))
        if n == 0:
            return []
        now_ms = int(time.time() * 1000)
        pending = self._pending
        queue, vhost = self.queue, self.vhost
        out: list[Record] = []
        live: list[tuple[int, int]] = []
        for _ in range(n):
            method, props, body = pending.popleft()
            tag: int = method.delivery_tag
            position = next(self._positions)
            try:
                headers = props.headers
                extra = _PROPERTIES_BYTES
                attempts = 1 if method.redelivered else 0
                engine_headers: list[tuple[str, bytes]] = []
                if headers:
                    # Quorum queues count deliveries: https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling
                    count = headers.get("x-delivery-count")
                    if isinstance(count, int) and not isinstance(count, bool):
                        attempts = count
                    engine_headers, size = record_headers(headers)
                    extra += size
                ts = props.timestamp
                # Positional: keyword arguments cost a dataclass __init__ twice as much.
                out.append(
                    Record(
                        queue,
                        position,
                        body,
                        None,
                        # AMQP timestamps are whole seconds; without one, the time it reached us.
                        ts * 1000 if isinstance(ts, int) and ts > 0 else now_ms,
                        engine_headers,
                        attempts,
                        bool(method.redelivered),
                        encoded_size(body, extra=extra),
                        RabbitMeta(queue, vhost, tag, basic_properties(props, len(body))),
                    )
                )
            except Exception as exc:  # no message may stop the queue: it becomes a letter
                out.append(self._undecodable(position, tag, method, body, exc))
            live.append((position, tag))
        self._live.update(live)
        return out

    def _undecodable(
        self, position: int, tag: int, method: Any, body: bytes, exc: Exception
    ) -> Record:
        log.error(
            "mapping %s: message with delivery tag %d cannot be read (%s: %s); it goes to the"
            " on-failure destination",
            self.mapping,
            tag,
            type(exc).__name__,
            exc,
        )
        return undecodable(
            self.queue,
            position,
            body,
            exc,
            redelivered=bool(method.redelivered),
            size=encoded_size(body, extra=_PROPERTIES_BYTES),
            meta=RabbitMeta(self.queue, self.vhost, tag, {"bodySize": len(body)}),
        )

    def fingerprint(self, record: Record) -> str:
        """Delivery tags change on redelivery: the message is known by its body and the
        properties a publisher sets (not headers, which quorum queues change on redelivery).
        CRC-32s rather than a cryptographic hash: this runs for every record invoked."""
        meta = record.meta
        props = meta.properties if isinstance(meta, RabbitMeta) else {}
        stamp = (props.get("messageId"), props.get("timestamp"), props.get("correlationId"))
        marks = _NO_STAMP if stamp == (None, None, None) else _stamp(*stamp)
        body = record.value
        return f"{record.source}:{len(body)}:{zlib.crc32(body):08x}{marks}"

    # --- acks ------------------------------------------------------------------------------------

    def ack(self, records: Sequence[Record]) -> None:
        tags, gone = settled_tags(self._live, [r.position for r in records])
        self.dropped_acks += gone
        if tags:
            self._acks.settled(tags)
            self._flush_acks()

    def wake(self) -> None:
        """Any thread: return from a `poll` waiting in `process_data_events` (a callback added
        thread-safely ends the wait), so settled records are acked without waiting for its
        timeout. The broker sends no more than the prefetch window until they are."""
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(Exception):  # closed or closing: the loop finds out itself
            connection.add_callback_threadsafe(_nothing)

    def _flush_acks(self, final: bool = False) -> None:
        if self._channel is not None:
            self._acks.flush(self._channel.basic_ack, final)

    # --- state -----------------------------------------------------------------------------------

    def assignment(self) -> frozenset[str]:
        return frozenset([self.queue]) if self._assigned else frozenset()

    def caught_up(self) -> bool:
        """Consuming, nothing buffered, and the queue had no ready message just now."""
        if self._channel is None or self._pending:
            return False
        try:
            self._refresh_ready()
        except RETRYABLE_ERRORS as exc:
            self._drop(exc)  # poll() reconnects
            return False
        return self._ready == 0 and not self._pending

    def lag(self) -> dict[str, int]:
        if self._channel is None:
            return {}
        if time.monotonic() - self._ready_at >= 1.0:
            try:
                self._refresh_ready()
            except RETRYABLE_ERRORS as exc:
                self._drop(exc)
                raise
        return {self.queue: self._ready + len(self._pending)}

    def _refresh_ready(self) -> None:
        connection, channel = self._connection, self._channel
        assert connection is not None and channel is not None
        try:
            declared = channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code in (403, 404):
                self._drop(exc)
                raise queue_error(exc, self._where) from None
            raise
        self._ready = declared.method.message_count
        self._ready_at = time.monotonic()
        # Deliveries that arrived during the declare wait in pika until dispatched.
        connection.process_data_events(time_limit=0)


def _nothing() -> None:
    pass
