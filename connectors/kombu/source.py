"""The kombu source: one queue of any kombu transport, consumed with manual acks from the poller's
loop thread, its raw message bodies handed over as the publisher wrote them."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import kombu.exceptions
from kombu.connection import Connection
from kombu.message import Message as KombuMessage
from kombu.transport import virtual

from connectors.kombu import config as cfg
from connectors.kombu.shape import (
    KombuMeta,
    KombuShape,
    attributes_of,
    epoch_s,
    message_attributes,
    record_headers,
)
from workers.engine.acks import AckCoalescer, settled_tags
from workers.engine.ports import (
    AssignmentListener,
    Capabilities,
    ConnectorConfigError,
    SourceBase,
    prefetch_window,
    undecodable,
)
from workers.engine.records import Record
from workers.engine.redact import describe, redact_url
from workers.engine.shapes import encoded_size

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

log = logging.getLogger("connectors.kombu")

# Bytes the attributes add to a record in the event, beyond the record overhead.
_ATTRIBUTES_BYTES = 400
# The shortest wait handed to a transport: some read a timeout of 0 as "block".
_MIN_WAIT_S = 0.001
CONNECT_TIMEOUT_S = 10.0


class KombuConfigError(ConnectorConfigError):
    """The transport, queue or credentials cannot work as configured; reconnecting will not help."""


# AMQP reply codes of a refusal: access refused, not found (queue, vhost), not allowed.
_REFUSED_CODES = (403, 404, 530)
# Error classes of the transports' clients that mean the same (names: the clients are optional).
_REFUSED_NAMES = (
    "AuthenticationError",
    "AuthenticationWrongNumberOfArgsError",
    "NoPermissionError",
)


def refused(exc: BaseException) -> bool:
    """The broker refused the login, the vhost or the queue: retrying will not help."""
    return getattr(exc, "code", None) in _REFUSED_CODES or type(exc).__name__ in _REFUSED_NAMES


def prefetch_for(mapping: EventSourceMapping) -> int:
    src = mapping.source
    assert isinstance(src, cfg.KombuSource)
    if src.prefetch_count is not None:
        return src.prefetch_count
    return prefetch_window(mapping.batch_size, mapping.parallelization_factor)


def open_connection(src: cfg.KombuSource) -> Connection:
    """A kombu connection (not yet connected) for the source's URL and transport options."""
    try:
        return Connection(
            src.url,
            transport_options=dict(src.transport_options),
            connect_timeout=CONNECT_TIMEOUT_S,
        )
    except (ImportError, KeyError, ValueError) as exc:
        # An unknown scheme, or a transport whose client library is not installed.
        raise KombuConfigError(
            f"cannot use {redact_url(src.url)} through kombu: {describe(exc)}"
        ) from None


def raw_body(raw: Any, message: KombuMessage) -> bytes:
    """The body as the publisher wrote it: before kombu decompresses it (`compression` header),
    and, on kombu's virtual transports, only unwrapped from the transport's own encoding."""
    payload = getattr(message, "_raw", None)
    body: Any
    if isinstance(payload, dict):  # a virtual transport (redis, memory, ...): its stored payload
        body = payload.get("body") or b""
        if body:
            encoding = (payload.get("properties") or {}).get("body_encoding")
            body = message.channel.decode_body(body, encoding)
    elif raw is not message:  # an AMQP message, read with auto_decode off
        body = raw.body
    else:
        body = message.body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body or b"")


class KombuSource(SourceBase):
    """Consumes one queue through kombu with manual acks.

    The kombu connection belongs to the poller's loop thread: `poll` drives it with
    `drain_events`, `ack` acks each settled message by its delivery tag. Nothing is ever
    rejected or requeued: a record the engine retries stays unacked in its hands, and what is
    unacked when the connection goes is delivered again by the broker (AMQP) or restored by
    kombu (its virtual transports restore unacked messages on close, and a dead consumer's after
    `visibility_timeout`).
    """

    capabilities = Capabilities(
        ordered=False,
        checkpoint="ack",
        pausable=False,
        stable_positions=False,
    )

    def __init__(self, mapping: EventSourceMapping, instance: int) -> None:
        src = mapping.source
        if not isinstance(src, cfg.KombuSource):
            raise TypeError(f"mapping {mapping.name}: not a kombu source")
        self.mapping = mapping.name
        self.settings = src
        self.queue = src.queue
        self.prefetch_count = prefetch_for(mapping)
        self.consumer_tag = f"esm-workers {mapping.name}#{instance} {uuid.uuid4().hex[:8]}"
        self.shape = KombuShape(src.transport, cfg.broker_address(src.url))
        self._where = f"queue {self.queue!r} at {redact_url(src.url)}"
        probe = open_connection(src)
        # What the transport declares as its connection and channel errors (kombu's
        # `connection_errors`), and kombu's own wrapping of them.
        self.retryable_errors = (
            *probe.connection_errors,
            *probe.channel_errors,
            kombu.exceptions.OperationalError,
            ConnectionError,
        )
        probe.release()

        self._listener: AssignmentListener | None = None
        self._connection: Connection | None = None
        self._channel: Any = None
        self._virtual = False
        self._ever_connected = False
        self._assigned = False
        # Position is ours, unique across reconnects (delivery tags restart on a new channel).
        self._positions = itertools.count(1)
        # Messages received but not yet handed to the engine (loop thread only).
        self._pending: deque[Any] = deque()
        # Position -> delivery tag of this channel's records not yet settled.
        self._live: dict[int, Any] = {}
        # On AMQP, delivery tags acked in as few frames as they can be; kombu's virtual
        # transports ack one message at a time (their basic_ack ignores `multiple`).
        self._acks = AckCoalescer(self.prefetch_count)
        self._ready = 0
        self._ready_at = float("-inf")
        self.dropped_acks = 0  # settled records of a lost channel (delivered again)

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self, listener: AssignmentListener) -> None:
        self._listener = listener
        if self._channel is None:
            self._connect()

    def _connect(self) -> None:
        connection = open_connection(self.settings)
        try:
            try:
                # One attempt: the engine backs off and tries again.
                connection.ensure_connection(max_retries=0)
                channel = connection.channel()
            except Exception as exc:
                # Credentials refused, a bad vhost: not worth retrying, unless the broker took
                # them before (more likely a broker still booting).
                if self._ever_connected or (
                    isinstance(exc, self.retryable_errors) and not refused(exc)
                ):
                    raise
                raise KombuConfigError(f"cannot consume {self._where}: {describe(exc)}") from None
            self._virtual = isinstance(channel, virtual.Channel)
            if not self._virtual:
                # py-amqp decodes bodies by their content_encoding unless told not to.
                channel.auto_decode = False
            self._ready = self._queue_size(channel)
            channel.basic_qos(0, self.prefetch_count, False)
            channel.basic_consume(
                queue=self.queue,
                no_ack=False,
                callback=self._on_message,
                consumer_tag=self.consumer_tag,
            )
        except BaseException:
            _close_quietly(connection)
            raise
        self._connection, self._channel = connection, channel
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

    def _queue_size(self, channel: Any) -> int:
        """Messages ready in the queue. On AMQP a passive declare, which fails for a queue that
        does not exist (esm-workers never creates it); a virtual transport's queue is a key or a
        table that exists only while it holds messages, so it is declared (a no-op there)."""
        try:
            declared = channel.queue_declare(queue=self.queue, passive=not self._virtual)
        except self.retryable_errors as exc:
            if refused(exc) and not self._ever_connected:
                raise KombuConfigError(f"cannot consume {self._where}: {describe(exc)}") from None
            raise
        return int(declared.message_count or 0)

    def _drop(self, reason: BaseException | None) -> None:
        """Forget the connection: its unacked messages are delivered again."""
        self._live.clear()
        self._acks.reset()
        self._pending.clear()
        channel = self._channel
        connection, self._connection, self._channel = self._connection, None, None
        if self._virtual and channel is not None and not getattr(channel, "do_restore", True):
            # A virtual transport that does not restore unacked messages when its channel
            # closes (memory://) would lose them: put them back first.
            try:
                channel.basic_recover(requeue=True)
            except Exception as exc:
                log.warning(
                    "mapping %s: unacked messages not restored: %s", self.mapping, describe(exc)
                )
        _close_quietly(connection)
        if reason is not None:
            log.warning("mapping %s: lost %s: %s", self.mapping, self._where, describe(reason))
        if self._assigned:
            self._assigned = False
            # Records of the lost connection can no longer be acked: the engine forgets them.
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

    def _on_message(self, raw: Any) -> None:
        if not self._virtual:
            self._acks.delivered(raw.delivery_tag)
        self._pending.append(raw)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._channel is None:
            self._connect()
        connection = self._connection
        assert connection is not None
        try:
            self._flush_acks()  # acks held back long enough
            if not self._pending or max_records == 0:
                # Nothing to hand out: wait here, so an idle or full engine does not spin.
                self._drain(connection, timeout_s)
            while len(self._pending) < max_records:
                before = len(self._pending)
                self._drain(connection, 0.0)
                if len(self._pending) == before:
                    break
            return self._take(max_records)
        except self.retryable_errors as exc:
            self._drop(exc)
            raise

    @staticmethod
    def _drain(connection: Connection, timeout_s: float) -> None:
        # socket.timeout (TimeoutError): nothing arrived in time.
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=max(timeout_s, _MIN_WAIT_S))

    def _take(self, max_records: int) -> list[Record]:
        n = min(max_records, len(self._pending))
        out: list[Record] = []
        for _ in range(n):
            raw = self._pending.popleft()
            position = next(self._positions)
            tag: Any = None
            try:
                message = (
                    raw if isinstance(raw, KombuMessage) else self._channel.message_to_python(raw)
                )
                tag = message.delivery_tag
                record = self._record(position, raw, message)
            except Exception as exc:  # no message may stop the queue: it becomes a letter
                tag = tag if tag is not None else getattr(raw, "delivery_tag", None)
                record = self._undecodable(position, tag, raw, exc)
            if tag is not None:
                self._live[position] = tag
            out.append(record)
        return out

    def _record(self, position: int, raw: Any, message: KombuMessage) -> Record:
        body = raw_body(raw, message)
        now_ms = int(time.time() * 1000)
        properties: dict[str, Any] = dict(message.properties or {})
        properties.setdefault("content_type", message.content_type)
        properties.setdefault("content_encoding", message.content_encoding)
        delivery: Mapping[str, Any] = message.delivery_info or {}
        payload = getattr(message, "_raw", None)
        # kombu's virtual transports mark a restored message in its delivery_info (redis) or in
        # the payload itself (the others).
        redelivered = bool(delivery.get("redelivered")) or (
            isinstance(payload, dict) and bool(payload.get("redelivered"))
        )
        headers = dict(message.headers or {})
        if self._virtual and redelivered and headers.get("redelivered") is True:
            # kombu's redis transport marks a restored message with this header; the publisher
            # did not write it.
            del headers["redelivered"]
        attempts = 1 if redelivered else 0
        # Quorum queues count deliveries: https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling
        count = headers.get("x-delivery-count")
        if isinstance(count, int) and not isinstance(count, bool):
            attempts = count
        seconds = epoch_s(properties.get("timestamp"))
        sent_ms = seconds * 1000 if seconds is not None and seconds > 0 else now_ms
        attrs = message_attributes(headers)
        meta = KombuMeta(
            queue=self.queue,
            message_id=str(uuid.uuid4()),
            receipt_handle=str(message.delivery_tag),
            attributes=attributes_of(
                properties,
                delivery,
                attempts=attempts,
                redelivered=redelivered,
                sent_ms=sent_ms,
                received_ms=now_ms,
            ),
            message_attributes=attrs,
        )
        extra = _ATTRIBUTES_BYTES + sum(len(k) + len(str(v)) for k, v in attrs.items())
        # Positional: keyword arguments cost a dataclass __init__ twice as much.
        return Record(
            self.queue,
            position,
            body,
            None,
            sent_ms,
            record_headers(attrs),
            attempts,
            redelivered,
            encoded_size(body, extra=extra),
            meta,
        )

    def _undecodable(self, position: int, tag: Any, raw: Any, exc: Exception) -> Record:
        log.error(
            "mapping %s: message with delivery tag %s cannot be read (%s: %s); it goes to the"
            " on-failure destination",
            self.mapping,
            tag,
            type(exc).__name__,
            exc,
        )
        body = getattr(raw, "body", b"")
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        elif not isinstance(body, bytes):
            body = b""
        return undecodable(
            self.queue,
            position,
            body,
            exc,
            size=encoded_size(body, extra=_ATTRIBUTES_BYTES),
            meta=KombuMeta(self.queue, str(uuid.uuid4()), str(tag)),
        )

    def fingerprint(self, record: Record) -> str:
        """Delivery tags and our messageIds change on redelivery: the message is known by its
        body and the properties a publisher sets. CRC-32s: this runs for every record invoked."""
        meta = record.meta
        attrs = meta.attributes if isinstance(meta, KombuMeta) else {}
        stamp = (
            attrs.get("publisherMessageId", ""),
            attrs.get("timestamp", ""),
            attrs.get("correlationId", ""),
        )
        marks = _NO_STAMP if stamp == ("", "", "") else _stamp(stamp)
        body = record.value
        return f"{record.source}:{len(body)}:{zlib.crc32(body):08x}{marks}"

    # --- acks ------------------------------------------------------------------------------------

    def ack(self, records: Sequence[Record]) -> None:
        tags, gone = settled_tags(self._live, [r.position for r in records])
        self.dropped_acks += gone  # their connection is gone (they come again) or acked before
        if not tags:
            return
        try:
            if not self._virtual:
                self._acks.settled(tags)
                self._flush_acks()
            elif self._channel is None:
                self.dropped_acks += len(tags)
            else:
                for tag in tags:
                    self._channel.basic_ack(tag)
        except self.retryable_errors as exc:
            self._drop(exc)
            raise

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
        except self.retryable_errors as exc:
            self._drop(exc)  # poll() reconnects
            return False
        return self._ready == 0 and not self._pending

    def lag(self) -> dict[str, int]:
        if self._channel is None:
            return {}
        if time.monotonic() - self._ready_at >= 1.0:
            try:
                self._refresh_ready()
            except self.retryable_errors as exc:
                self._drop(exc)
                raise
        return {self.queue: self._ready + len(self._pending)}

    def _refresh_ready(self) -> None:
        self._ready = self._queue_size(self._channel)
        self._ready_at = time.monotonic()


def _stamp(parts: tuple[str, str, str]) -> str:
    """The fingerprint's part from the properties a publisher sets, as eight hex digits."""
    return f"{zlib.crc32('|'.join(parts).encode()):08x}"


# Most messages set none of them.
_NO_STAMP = _stamp(("", "", ""))


def _close_quietly(connection: Connection | None) -> None:
    if connection is None:
        return
    try:
        connection.release()
    except Exception as exc:  # closing a broken connection has nothing left to report
        log.debug("closing a kombu connection failed: %s", describe(exc))


def probe_kombu(src: cfg.KombuSource) -> None:
    """Connect, look at the queue and disconnect (`workers validate --connect`)."""
    where = f"queue {src.queue!r} at {redact_url(src.url)}"
    connection = open_connection(src)
    try:
        try:
            connection.ensure_connection(max_retries=0)
            channel = connection.channel()
            if not isinstance(channel, virtual.Channel):
                channel.queue_declare(queue=src.queue, passive=True)
        except Exception as exc:
            raise KombuConfigError(f"cannot consume {where}: {describe(exc)}") from None
    finally:
        _close_quietly(connection)
