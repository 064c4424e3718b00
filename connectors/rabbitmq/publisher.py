"""Records replayed by `workers dlq` published back onto the RabbitMQ source queue, with the
properties they were first delivered with."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import pika
import pika.data

from connectors.rabbitmq import config as cfg
from connectors.rabbitmq.connection import ConfirmedChannel, log
from connectors.rabbitmq.shape import RabbitMeta, header_value
from workers.engine.letters import REPLAY_HEADER
from workers.engine.records import Record
from workers.engine.redact import redact_url

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
        self._channel = ConfirmedChannel(self.url, "esm-workers dlq replay", self._where)

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
