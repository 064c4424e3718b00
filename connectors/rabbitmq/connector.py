"""RabbitMQ on pika: a queue consumer with manual acks (source) and confirmed dead-lettering
(destination), both reconnecting after connection or channel loss; the dead-letter queue read
back and records published back onto the source queue, for `workers dlq`."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pika
import pika.data
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

import connectors.rabbitmq.pika_compat as pika_compat
from connectors.rabbitmq import config as cfg
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape
from workers.engine.letters import REPLAY_HEADER, parse_letter, utc_datetime
from workers.engine.ports import (
    AssignmentListener,
    Capabilities,
    ConnectorConfigError,
    LetterTooLarge,
    SourceBase,
    StoredLetter,
    undecodable,
)
from workers.engine.records import Record
from workers.engine.redact import describe, redact_url
from workers.engine.shapes import encoded_size

log = logging.getLogger("connectors.rabbitmq")
# pika logs each failure it then raises (with tracebacks, on every reconnect attempt); the
# engine logs the raised error once. Left alone if the application configured pika itself.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)
# A header field pika cannot decode would drop the connection in a loop (see pika_compat).
pika_compat.install()

# Prefetch sized from the engine's appetite when the mapping does not set one: two rounds of
# batches in flight keep the consumer busy while a round settles.
MIN_PREFETCH = 100
MAX_PREFETCH = 5000
# Settled tags that do not extend the contiguous run from the lowest unacked tag are held back
# this long (or until this share of the prefetch window is held), hoping that the run catches
# up and one multiple-ack covers them; then they are acked one by one.
ACK_HOLD_S = 0.5
ACK_HOLD_SHARE = 0.5

# Bytes the basicProperties object adds to a record in the event, beyond the record overhead.
_PROPERTIES_BYTES = 300
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


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

_AUTH_ERRORS = (
    pika.exceptions.AuthenticationError,
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
)

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping


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


def prefetch_for(mapping: EventSourceMapping) -> int:
    src = mapping.source
    assert isinstance(src, cfg.RabbitMQSource)
    if src.prefetch_count is not None:
        return src.prefetch_count
    wanted = 2 * mapping.batch_size * mapping.parallelization_factor
    # Never below one full batch, or a batch could only ever fill up by its window running out.
    return max(min(max(wanted, MIN_PREFETCH), MAX_PREFETCH), mapping.batch_size)


def _close_quietly(connection: BlockingConnection | None) -> None:
    if connection is None or not connection.is_open:
        return
    try:
        connection.close()
    except Exception as exc:  # closing a broken connection has nothing left to report
        log.debug("closing a RabbitMQ connection failed: %s", describe(exc))


# --- Lambda's basicProperties ------------------------------------------------------------------


def java_date(epoch_s: int) -> str:
    """An AMQP timestamp as Lambda's Java runtime prints it ("Jan 1, 1970, 12:33:41 AM", UTC);
    outside years 1-9999 (AMQP's 64 bits allow any), the nearest instant within."""
    dt = utc_datetime(epoch_s * 1000)
    hour = dt.hour % 12 or 12
    half = "AM" if dt.hour < 12 else "PM"
    clock = f"{hour}:{dt.minute:02d}:{dt.second:02d} {half}"
    return f"{_MONTHS[dt.month - 1]} {dt.day}, {dt.year}, {clock}"


_JAVA_DATE = re.compile(r"([A-Z][a-z]{2}) (\d{1,2}), (\d{4}), (\d{1,2}):(\d{2}):(\d{2}) ([AP]M)")


def parse_java_date(text: str) -> datetime | None:
    """The inverse of `java_date` (UTC), or None when `text` is not such a date."""
    match = _JAVA_DATE.fullmatch(text)
    if match is None or match[1] not in _MONTHS:
        return None
    month, day, year, hour, minute, second, half = match.groups()
    hour24 = int(hour) % 12 + (12 if half == "PM" else 0)
    try:
        return datetime(
            int(year),
            _MONTHS.index(month) + 1,
            int(day),
            hour24,
            int(minute),
            int(second),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _java_bytes(data: bytes) -> list[int]:
    # Java bytes are signed; Lambda's JSON shows them as the Java client holds them.
    return [b - 256 if b > 127 else b for b in data]


def header_json(value: Any) -> Any:
    """A header value as Lambda's event shows it: strings as {"bytes": [...]}, as the Java
    client's LongString serialises; numbers, booleans, tables and arrays as themselves."""
    if isinstance(value, str):
        return {"bytes": _java_bytes(value.encode())}
    if isinstance(value, bytes | bytearray):
        return {"bytes": _java_bytes(bytes(value))}
    if isinstance(value, dict):
        return {str(k): header_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [header_json(v) for v in value]
    if isinstance(value, datetime):
        return java_date(int(value.timestamp()))
    if isinstance(value, Decimal):
        return float(value)
    return value


def header_value(value: Any) -> Any:
    """A header value from Lambda's JSON form back to one pika publishes (`header_json`'s
    inverse): {"bytes": [...]} is a string again (bytes when it is not UTF-8), a plain string is
    a timestamp, a float a decimal (pika cannot send doubles)."""
    if isinstance(value, dict):
        raw = value.get("bytes")
        if len(value) == 1 and isinstance(raw, list) and all(isinstance(b, int) for b in raw):
            data = bytes(b & 0xFF for b in raw)
            try:
                return data.decode()
            except UnicodeDecodeError:
                return data
        return {str(k): header_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [header_value(v) for v in value]
    if isinstance(value, str):
        # header_json turns only timestamps into plain strings; strings are {"bytes": [...]}.
        when = parse_java_date(value)
        return value if when is None else when
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def basic_properties(props: pika.spec.BasicProperties, body_size: int) -> dict[str, Any]:
    """Lambda's `basicProperties` object: every field, null where the message has none.

    https://docs.aws.amazon.com/lambda/latest/dg/with-mq.html
    """
    headers = props.headers
    return {
        "contentType": props.content_type,
        "contentEncoding": props.content_encoding,
        "headers": None if headers is None else header_json(headers),
        "deliveryMode": props.delivery_mode,
        "priority": props.priority,
        "correlationId": props.correlation_id,
        "replyTo": props.reply_to,
        "expiration": props.expiration,
        "messageId": props.message_id,
        "timestamp": None if props.timestamp is None else java_date(props.timestamp),
        "type": props.type,
        "userId": props.user_id,
        "appId": props.app_id,
        "clusterId": props.cluster_id,
        "bodySize": body_size,
    }


def _record_headers(headers: dict[str, Any]) -> tuple[list[tuple[str, bytes]], int]:
    """Scalar headers as (name, bytes) for the engine, and their approximate size in the event."""
    out: list[tuple[str, bytes]] = []
    size = 0
    for name, value in headers.items():
        if isinstance(value, str):
            raw = value.encode()
        elif isinstance(value, bytes):
            raw = value
        elif isinstance(value, bool | int | float):
            raw = str(value).encode()
        else:
            size += 200
            continue
        out.append((name, raw))
        # {"bytes": [118, 97, ...]}: about five characters per byte.
        size += len(name) + 5 * len(raw) + 16
    return out, size


# --- source ------------------------------------------------------------------------------------


class RabbitMQSource(SourceBase):
    """Consumes one queue with manual acks; acks arrive from worker threads.

    pika's BlockingConnection belongs to the poller's loop thread. `ack()` only records the
    delivery tags and asks the connection (`add_callback_threadsafe`) to send them from its own
    thread; `poll()` sends whatever is left at its start and end.
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
        # Delivery tags of this channel not yet acked to the broker, in delivery order; tags
        # acked one by one stay here (and in `_sent`) until the run from the lowest passes them.
        self._unacked: deque[int] = deque()
        self._sent: set[int] = set()
        self._held: set[int] = set()
        self._held_since: float | None = None
        self._ready = 0  # messages ready in the queue at the last look
        self._ready_at = float("-inf")
        # Shared with worker threads, under `_lock`: positions of this channel's records not yet
        # settled, and settled tags not yet sent.
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}
        self._done: list[int] = []
        self._flush_scheduled = False
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
        except _AUTH_ERRORS as exc:
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
                raise _queue_error(exc, self._where) from None
            channel.basic_qos(prefetch_count=self.prefetch_count)
            # https://www.rabbitmq.com/docs/consumer-cancel: sent when the queue goes away.
            channel.add_on_cancel_callback(self._on_cancel)
            channel.basic_consume(self.queue, self._on_message, auto_ack=False)
        except BaseException:
            _close_quietly(connection)
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
        with self._lock:
            self.dropped_acks += len(self._done)
            self._live.clear()
            self._done = []
            self._flush_scheduled = False
        self._pending.clear()
        self._unacked.clear()
        self._sent.clear()
        self._held.clear()
        self._held_since = None
        connection, self._connection, self._channel = self._connection, None, None
        _close_quietly(connection)
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
        self._unacked.append(method.delivery_tag)

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
                record_headers: list[tuple[str, bytes]] = []
                if headers:
                    # Quorum queues count deliveries: https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling
                    count = headers.get("x-delivery-count")
                    if isinstance(count, int) and not isinstance(count, bool):
                        attempts = count
                    record_headers, size = _record_headers(headers)
                    extra += size
                ts = props.timestamp
                out.append(
                    Record(
                        source=queue,
                        position=position,
                        value=body,
                        # AMQP timestamps are whole seconds; without one, the time it reached us.
                        timestamp_ms=ts * 1000 if isinstance(ts, int) and ts > 0 else now_ms,
                        headers=record_headers,
                        attempts=attempts,
                        redelivered=bool(method.redelivered),
                        size=encoded_size(body, extra=extra),
                        meta=RabbitMeta(queue, vhost, tag, basic_properties(props, len(body))),
                    )
                )
            except Exception as exc:  # no message may stop the queue: it becomes a letter
                out.append(self._undecodable(position, tag, method, body, exc))
            live.append((position, tag))
        with self._lock:
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
        stamp = f"{props.get('messageId')}|{props.get('timestamp')}|{props.get('correlationId')}"
        body = record.value
        return f"{record.source}:{len(body)}:{zlib.crc32(body):08x}{zlib.crc32(stamp.encode()):08x}"

    # --- acks ------------------------------------------------------------------------------------

    def ack(self, records: Sequence[Record]) -> None:
        """Thread-safe: record the tags, wake the connection's thread to send them."""
        with self._lock:
            live = self._live
            for r in records:
                tag = live.pop(r.position, None)
                if tag is None:
                    # Its channel is gone (the broker redelivers it) or it was acked before.
                    self.dropped_acks += 1
                else:
                    self._done.append(tag)
            if not self._done or self._flush_scheduled:
                return
            self._flush_scheduled = True
            connection = self._connection
        if connection is None:
            return
        try:
            connection.add_callback_threadsafe(self._flush_acks)
        except pika.exceptions.AMQPError:
            # Closed or closing: the loop thread finds out on its next call and drops the tags.
            with self._lock:
                self._flush_scheduled = False

    def _flush_acks(self, final: bool = False) -> None:
        """Send settled tags (connection thread): one multiple-ack for the contiguous run from
        the lowest unacked tag, single acks for the rest once held long enough."""
        with self._lock:
            self._flush_scheduled = False
            done, self._done = self._done, []
        held = self._held
        if not done and not held:
            return
        channel = self._channel
        if channel is None:
            return
        held.update(done)
        unacked, sent = self._unacked, self._sent
        last = 0
        while unacked and (unacked[0] in held or unacked[0] in sent):
            tag = unacked.popleft()
            if tag in held:
                held.discard(tag)
                last = tag
            else:
                sent.discard(tag)
        if last:
            # https://www.rabbitmq.com/docs/confirms#consumer-acks-multiple-parameter
            channel.basic_ack(last, multiple=True)
        if not held:
            self._held_since = None
            return
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        if (
            final
            or now - self._held_since >= ACK_HOLD_S
            or len(held) >= self.prefetch_count * ACK_HOLD_SHARE
        ):
            for tag in sorted(held):
                channel.basic_ack(tag)
            sent.update(held)
            held.clear()
            self._held_since = None

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
                raise _queue_error(exc, self._where) from None
            raise
        self._ready = declared.method.message_count
        self._ready_at = time.monotonic()
        # Deliveries that arrived during the declare wait in pika until dispatched.
        connection.process_data_events(time_limit=0)


def _queue_error(exc: pika.exceptions.ChannelClosedByBroker, where: str) -> Exception:
    if exc.reply_code == 404:
        return QueueNotFound(f"{where} does not exist (esm-workers does not create source queues)")
    if exc.reply_code == 403:
        return RabbitMQConfigError(f"access to {where} refused: {exc.reply_text}")
    error: Exception = exc
    return error


# --- destination -------------------------------------------------------------------------------


# RabbitMQ (3.8+) closes the channel of a publish whose body is over `max_message_size`
# (128 MiB by default, 16 MiB from 4.0) with 406 and this text (rabbit_channel:check_msg_size).
_SIZE_REFUSAL = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def size_refusal_limit(reply_code: int, reply_text: str) -> int | None:
    """The broker's max message size when a channel close refused a message for its size."""
    if reply_code != 406:
        return None
    found = _SIZE_REFUSAL.search(reply_text or "")
    return int(found.group(2)) if found else None


class _ConfirmedChannel:
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
        except _AUTH_ERRORS as exc:
            raise RabbitMQConfigError(f"cannot publish to {self.where}: {describe(exc)}") from None
        try:
            channel = connection.channel()
            channel.confirm_delivery()
        except BaseException:
            _close_quietly(connection)
            raise
        self._connection, self._channel = connection, channel
        return channel

    def reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        _close_quietly(connection)


class RabbitMQDestination:
    """Publishes dead letters with publisher confirms; `deliver` returns once the broker has
    taken responsibility for the letter (https://www.rabbitmq.com/docs/confirms)."""

    def __init__(self, dst: cfg.RabbitMQDestination, mapping: EventSourceMapping) -> None:
        self.url = dst.url
        self.exchange = dst.exchange
        self.routing_key = dst.routing_key
        self.mapping = mapping.name
        self._where = (
            f"exchange {self.exchange or '(default)'!r} routing key {self.routing_key!r}"
            f" at {redact_url(self.url)}"
        )
        self._lock = threading.Lock()
        self._channel = _ConfirmedChannel(
            self.url, f"esm-workers {self.mapping} dead letters", self._where
        )

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        body = orjson.dumps(letter)
        request = letter.get("requestContext") or {}
        error = letter.get("error") or {}
        headers: dict[str, Any] = {
            "esm-mapping": self.mapping,
            "esm-condition": str(request.get("condition", "")),
            "esm-batch-size": len(records),
        }
        if error.get("errorType"):
            headers["esm-error-type"] = str(error["errorType"])
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent.value,
            headers=headers,
            message_id=request.get("requestId"),
            timestamp=int(time.time()),
            app_id="esm-workers",
        )
        with self._lock:
            self._channel.publish(
                [(self.exchange, self.routing_key, body, properties)],
                "the dead letter",
                f"no queue bound for {self._where}",
            )

    def close(self) -> None:
        with self._lock:
            self._channel.reset()


# --- workers dlq -------------------------------------------------------------------------------


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
            raise _queue_error(exc, self._where) from None
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
        except _AUTH_ERRORS as exc:
            raise RabbitMQConfigError(f"cannot read {self._where}: {describe(exc)}") from None
        try:
            channel = connection.channel()
        except BaseException:
            _close_quietly(connection)
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
        _close_quietly(connection)


# Headers the broker sets on delivery: publishing them again would be a lie (x-death says the
# message was dead-lettered by a policy) or meaningless (counts of the old message's deliveries).
_BROKER_HEADERS = frozenset(
    {"x-delivery-count", "x-acquired-count", "x-death", "x-received-from", "x-stream-offset"}
)
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-", "x-opt-")


def _broker_header(name: str) -> bool:
    return name in _BROKER_HEADERS or name.startswith(_BROKER_HEADER_PREFIXES)


def _optional(value: Any, kind: type) -> Any:
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def replay_properties(
    record: Record, replay_count: int, user: str | None, now_s: int
) -> pika.BasicProperties:
    """The properties a replayed record is published with: its original ones as Lambda's
    basicProperties recorded them, persistent, timestamped now, with the replay header."""
    props: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    if isinstance(record.meta, RabbitMeta):
        props = record.meta.properties
        stored = props.get("headers")
        if isinstance(stored, dict):
            headers = {
                str(k): header_value(v) for k, v in stored.items() if not _broker_header(str(k))
            }
    else:
        # A letter written while the mapping read another broker: its record headers.
        for name, raw in record.headers:
            try:
                headers[name] = raw.decode()
            except UnicodeDecodeError:
                headers[name] = raw
    headers.pop(REPLAY_HEADER, None)
    for name in list(headers):
        try:
            pika.data.encode_value([], headers[name])
        except Exception:
            log.warning(
                "replayed message %s: header %r cannot be sent again, left out",
                props.get("messageId"),
                name,
            )
            del headers[name]
    # A number, so that the source hands it on as b"<n>" and the event shows it as a number.
    headers[REPLAY_HEADER] = replay_count
    priority = _optional(props.get("priority"), int)
    user_id = _optional(props.get("userId"), str)
    return pika.BasicProperties(
        content_type=_optional(props.get("contentType"), str),
        content_encoding=_optional(props.get("contentEncoding"), str),
        headers=headers,
        delivery_mode=pika.DeliveryMode.Persistent.value,
        priority=priority if priority is not None and 0 <= priority <= 255 else None,
        correlation_id=_optional(props.get("correlationId"), str),
        reply_to=_optional(props.get("replyTo"), str),
        expiration=_optional(props.get("expiration"), str),
        message_id=_optional(props.get("messageId"), str),
        # The replay is a new publish: its age (maximum_record_age_s) starts now, or a replayed
        # record would be too old before its first invocation.
        timestamp=now_s,
        type=_optional(props.get("type"), str),
        # The broker refuses a user id other than the publishing connection's own.
        user_id=user_id if user_id is not None and user_id == user else None,
        app_id=_optional(props.get("appId"), str),
    )


class RabbitMQSourcePublisher:
    """Publishes replayed records onto the source queue (default exchange, routing key = queue)
    with publisher confirms; `publish` returns once the broker has taken every one."""

    def __init__(self, src: cfg.RabbitMQSource) -> None:
        self.url = src.url
        self.queue = src.queue
        self._where = (
            f"queue {self.queue!r} in vhost {src.virtual_host!r} at {redact_url(self.url)}"
        )
        self._channel = _ConfirmedChannel(self.url, "esm-workers dlq replay", self._where)

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        if not records:
            return
        now_s = int(time.time())
        channel = self._channel

        def messages() -> Iterator[tuple[str, str, bytes, pika.BasicProperties]]:
            for record in records:
                properties = replay_properties(record, replay_count, channel.user, now_s)
                yield "", self.queue, record.value, properties

        channel.publish(messages(), "a replayed record", f"{self._where} does not exist")

    def close(self) -> None:
        self._channel.reset()


# --- validate --connect ------------------------------------------------------------------------


def probe_rabbitmq(src: cfg.RabbitMQSource) -> None:
    """Connect, check that the queue exists, disconnect; raises with a readable message."""
    where = f"queue {src.queue!r} in vhost {src.virtual_host!r} at {redact_url(src.url)}"
    params = connection_parameters(src.url, "esm-workers validate")
    params.socket_timeout = 5.0
    params.stack_timeout = 10.0
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise RabbitMQConfigError(f"cannot connect for {where}: {describe(exc)}") from None
    try:
        channel = connection.channel()
        try:
            channel.queue_declare(src.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise _queue_error(exc, where) from None
    finally:
        _close_quietly(connection)
