"""Lambda's Amazon MQ for RabbitMQ event, built from engine records and read back from one, and
the `basicProperties` object in it: written from a message's properties, read back to them."""

from __future__ import annotations

import base64
import binascii
import marshal
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from workers.engine.letters import iso_ms, utc_datetime
from workers.engine.records import Record
from workers.engine.shapes import decoded as _decoded
from workers.engine.shapes import encoded_size
from workers.engine.shapes import int_or_none as _int_or_none

_b64 = base64.b64encode
_b2a = binascii.b2a_base64
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


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


def basic_properties(props: Any, body_size: int) -> dict[str, Any]:
    """Lambda's `basicProperties` object of a message with pika's BasicProperties `props`:
    every field, null where the message has none.

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


def record_headers(headers: dict[str, Any]) -> tuple[list[tuple[str, bytes]], int]:
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


def _rmq_timestamp_ms(props: dict[str, Any]) -> int:
    """The record's timestamp from `basicProperties.timestamp`: the date `java_date` wrote (whole
    seconds), or a number of milliseconds in an event written by hand; 0 without either."""
    value = props.get("timestamp")
    if isinstance(value, str):
        when = parse_java_date(value)
        return 0 if when is None else int(when.timestamp()) * 1000
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _rmq_headers(props: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The record headers the source handed to the engine, from `basicProperties.headers` in
    `header_json`'s form. A number with a fraction stays a float: on the wire it was a double (or
    a decimal, which the source leaves out and which reads back the same)."""
    headers = props.get("headers") or {}
    if not isinstance(headers, dict):
        return []
    values = {
        str(name): value if isinstance(value, float) else header_value(value)
        for name, value in headers.items()
    }
    return record_headers(values)[0]


def unpack_event(payload: bytes) -> dict[str, Any]:
    """The event `RabbitShape.pack` packed, built where the handler runs."""
    source_arn, keys, properties, redelivered, bodies, tags = marshal.loads(payload)
    b2a = _b2a
    items = [
        {
            "basicProperties": props,
            "redelivered": again,
            "data": b2a(body, newline=False).decode(),
            "deliveryTag": tag,
        }
        for props, again, body, tag in zip(properties, redelivered, bodies, tags, strict=True)
    ]
    by_queue: dict[str, list[dict[str, Any]]] = {}
    if keys and keys.count(keys[0]) == len(keys):
        by_queue[keys[0]] = items  # one queue, as in every batch the poller makes
    else:
        for key, item in zip(keys, items, strict=True):
            by_queue.setdefault(key, []).append(item)
    return {"eventSource": "aws:rmq", "eventSourceArn": source_arn, "rmqMessagesByQueue": by_queue}


# Not frozen: one is built per message, and a frozen dataclass's __init__ costs four times as
# much (each field set through object.__setattr__). Nothing changes one once built.
@dataclass(slots=True)
class RabbitMeta:
    queue: str
    vhost: str
    delivery_tag: int
    # Lambda's `basicProperties` object, already in its JSON form.
    properties: dict[str, Any] = field(default_factory=dict)


class RabbitShape:
    """Lambda's Amazon MQ for RabbitMQ event (`"eventSource": "aws:rmq"`).

    https://docs.aws.amazon.com/lambda/latest/dg/with-mq.html
    """

    batch_info_name = "RabbitMQBatchInfo"

    def ordered(self, records: Sequence[Record]) -> bool:
        return False  # a requeued message goes back; the others keep flowing

    def __init__(self, broker: str) -> None:
        self.broker = broker  # host:port, never credentials
        self.source_arn = f"arn:aws:mq:local:000000000000:broker:{broker}"

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        by_queue: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            meta: RabbitMeta = r.meta
            by_queue.setdefault(f"{meta.queue}::{meta.vhost}", []).append(
                {
                    "basicProperties": meta.properties,
                    "redelivered": r.redelivered,
                    "data": _b64(r.value).decode(),
                    "deliveryTag": meta.delivery_tag,
                }
            )
        return {
            "eventSource": "aws:rmq",
            "eventSourceArn": self.source_arn,
            "rmqMessagesByQueue": by_queue,
        }

    unpacker = "connectors.rabbitmq.shape:unpack_event"

    def pack(self, records: Sequence[Record]) -> bytes:
        """The batch as columns in record order (see `unpack_event`): the properties as their
        JSON form, the bodies as they are."""
        metas: list[RabbitMeta] = [r.meta for r in records]
        return marshal.dumps(
            (
                self.source_arn,
                [f"{m.queue}::{m.vhost}" for m in metas],
                [m.properties for m in metas],
                [r.redelivered for r in records],
                [r.value for r in records],
                [m.delivery_tag for m in metas],
            )
        )

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for queue_vhost, items in event.get("rmqMessagesByQueue", {}).items():
            queue, _, vhost = queue_vhost.rpartition("::")
            for position, item in enumerate(items):
                value = _unb64(item.get("data") or "")
                props = item.get("basicProperties") or {}
                out.append(
                    Record(
                        source=queue,
                        position=position,
                        value=value,
                        timestamp_ms=_rmq_timestamp_ms(props),
                        headers=_rmq_headers(props),
                        redelivered=bool(item.get("redelivered")),
                        size=encoded_size(value),
                        meta=RabbitMeta(queue, vhost, int(item.get("deliveryTag", 0)), props),
                    )
                )
        return out

    def item_key(self, record: Record) -> Hashable:
        meta: RabbitMeta = record.meta
        return (meta.queue, meta.delivery_tag)

    def item_identifier(self, record: Record) -> dict[str, Any]:
        meta: RabbitMeta = record.meta
        return {"queue": meta.queue, "deliveryTag": meta.delivery_tag}

    def parse_item(self, identifier: Any) -> Hashable | None:
        if not isinstance(identifier, dict):
            return None
        queue = identifier.get("queue")
        tag = _int_or_none(identifier.get("deliveryTag"))
        if not isinstance(queue, str) or not queue or tag is None:
            return None
        return (queue, tag)

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        queues: dict[str, dict[str, Any]] = {}
        for r in records:
            meta: RabbitMeta = r.meta
            entry = queues.setdefault(
                f"{meta.queue}::{meta.vhost}",
                {"deliveryTags": [], "firstRecordTimestamp": iso_ms(r.timestamp_ms)},
            )
            entry["deliveryTags"].append(meta.delivery_tag)
            entry["lastRecordTimestamp"] = iso_ms(r.timestamp_ms)
        return {"broker": self.broker, "queues": queues}

    def filter_view(self, record: Record) -> dict[str, Any]:
        meta: RabbitMeta = record.meta
        return {
            "basicProperties": meta.properties,
            "redelivered": record.redelivered,
            "data": _decoded(record.value),
        }
