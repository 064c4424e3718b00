"""The event of a kombu queue: Lambda's SQS event (`Records[]`), built from engine records and
read back from one, and the message's properties and headers in SQS's `attributes` and
`messageAttributes` forms.

https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from workers.engine.letters import iso_ms
from workers.engine.records import Record
from workers.engine.shapes import decoded as _decoded
from workers.engine.shapes import int_or_none

# The `attributes` key that says `body` is the base64 of a body that is not UTF-8 (SQS bodies
# are text; Lambda's SQS event has no such key, as an SQS message cannot carry such a body).
BODY_ENCODING = "bodyEncoding"
BASE64 = "base64"
# kombu's (and AMQP 0-9-1's) message properties -> their names in `attributes`. The publisher's
# message_id is `publisherMessageId`: the record's `messageId` is ours, unique per delivery.
PROPERTY_NAMES = {
    "content_type": "contentType",
    "content_encoding": "contentEncoding",
    "delivery_mode": "deliveryMode",
    "priority": "priority",
    "correlation_id": "correlationId",
    "reply_to": "replyTo",
    "expiration": "expiration",
    "message_id": "publisherMessageId",
    "timestamp": "timestamp",
    "type": "type",
    "user_id": "userId",
    "app_id": "appId",
    "cluster_id": "clusterId",
}
# dataType of header values SQS has no type for (SQS allows such custom suffixes).
BOOLEAN = "String.Boolean"
TIMESTAMP = "String.Timestamp"
JSON = "String.Json"
REGION = "local"


def body_text(value: bytes) -> tuple[str, bool]:
    """The record's `body`: its UTF-8 text, or its base64 (True) when it is not UTF-8."""
    try:
        return value.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(value).decode(), True


def epoch_s(value: Any) -> int | None:
    """An AMQP timestamp property (seconds, or a datetime as py-amqp reads it) in seconds."""
    if isinstance(value, datetime):
        when = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(when.timestamp())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def attributes_of(
    properties: Mapping[str, Any],
    delivery: Mapping[str, Any],
    *,
    attempts: int,
    redelivered: bool,
    sent_ms: int,
    received_ms: int,
) -> dict[str, str]:
    """`attributes` of a message: SQS's system attributes (receive count, sent and receive times
    in epoch milliseconds), then the message's properties and delivery details, all strings as
    SQS's attributes are."""
    out = {
        "ApproximateReceiveCount": str(attempts + 1),
        "SentTimestamp": str(sent_ms),
        "ApproximateFirstReceiveTimestamp": str(received_ms),
    }
    for name, key in PROPERTY_NAMES.items():
        value = properties.get(name)
        if value is None or value == "":
            continue
        if name == "timestamp":
            seconds = epoch_s(value)
            if seconds is None:
                continue
            value = seconds
        out[key] = _text(value)
    for name, key in (("exchange", "exchange"), ("routing_key", "routingKey")):
        value = delivery.get(name)
        if value:
            out[key] = _text(value)
    out["redelivered"] = _text(redelivered)
    return out


def _attribute(value: Any) -> dict[str, Any]:
    out: dict[str, Any]
    if isinstance(value, bytes | bytearray | memoryview):
        out = {"binaryValue": base64.b64encode(bytes(value)).decode(), "dataType": "Binary"}
    elif isinstance(value, str):
        out = {"stringValue": value, "dataType": "String"}
    elif isinstance(value, bool):
        out = {"stringValue": "true" if value else "false", "dataType": BOOLEAN}
    elif isinstance(value, int | float | Decimal):
        out = {"stringValue": str(value), "dataType": "Number"}
    elif isinstance(value, datetime):
        when = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        out = {"stringValue": when.isoformat(), "dataType": TIMESTAMP}
    else:  # tables, arrays, null
        text = orjson.dumps(value, default=_json_default).decode()
        out = {"stringValue": text, "dataType": JSON}
    out["stringListValues"] = []
    out["binaryListValues"] = []
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def message_attributes(headers: Mapping[Any, Any]) -> dict[str, dict[str, Any]]:
    """Message headers as SQS writes `messageAttributes`: `stringValue` or `binaryValue` (base64),
    empty list fields and a `dataType` (String, Number, Binary, or String.Boolean,
    String.Timestamp, String.Json for what SQS has no type for)."""
    return {_text(name): _attribute(value) for name, value in headers.items()}


def record_headers(attributes: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The engine's headers of a record from its `messageAttributes`: every scalar one, as the
    bytes of its binary value or of its string value."""
    out: list[tuple[str, bytes]] = []
    for name, attribute in attributes.items():
        if not isinstance(attribute, Mapping):
            continue
        kind = str(attribute.get("dataType", ""))
        if kind.startswith("Binary"):
            raw = attribute.get("binaryValue")
            if isinstance(raw, str):
                try:
                    out.append((name, base64.b64decode(raw, validate=True)))
                except binascii.Error:
                    continue
        elif not kind.startswith(JSON):
            text = attribute.get("stringValue")
            if isinstance(text, str):
                out.append((name, text.encode()))
    return out


def _copy_attributes(attributes: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            **value,
            "stringListValues": list(value.get("stringListValues", [])),
            "binaryListValues": list(value.get("binaryListValues", [])),
        }
        for name, value in attributes.items()
    }


# Not frozen, like RabbitMeta: one is built per message.
@dataclass(slots=True)
class KombuMeta:
    queue: str
    # Unique per delivery: the record's `messageId` and its `itemIdentifier`.
    message_id: str
    # The transport's delivery tag (an int on AMQP, a uuid on kombu's virtual transports).
    receipt_handle: str
    # `attributes` without `bodyEncoding` (which follows from the body).
    attributes: dict[str, str] = field(default_factory=dict)
    message_attributes: dict[str, dict[str, Any]] = field(default_factory=dict)


class KombuShape:
    """Lambda's SQS event, for a queue read through kombu (`"eventSource": "kombu:<transport>"`)."""

    batch_info_name = "KombuBatchInfo"

    def __init__(self, transport: str, broker: str) -> None:
        self.transport = transport
        self.broker = broker  # host:port, never credentials
        self.event_source = f"kombu:{transport}"
        self.arn_prefix = f"arn:kombu:{transport}:{broker}:queue/"

    @classmethod
    def for_event(cls, event: Mapping[str, Any]) -> KombuShape:
        """The shape that built `event` (its transport and broker from the first record)."""
        first: Mapping[str, Any] = next(iter(event.get("Records") or [{}]), {})
        source = str(first.get("eventSource", ""))
        arn = str(first.get("eventSourceARN", ""))
        transport = source.partition(":")[2]
        head = arn.partition(":queue/")[0]
        prefix = f"arn:kombu:{transport}:"
        return cls(transport, head[len(prefix) :] if head.startswith(prefix) else "")

    def item(self, record: Record) -> dict[str, Any]:
        meta: KombuMeta = record.meta
        body, encoded = body_text(record.value)
        attributes = dict(meta.attributes)
        if encoded:
            attributes[BODY_ENCODING] = BASE64
        return {
            "messageId": meta.message_id,
            "receiptHandle": meta.receipt_handle,
            "body": body,
            "attributes": attributes,
            "messageAttributes": _copy_attributes(meta.message_attributes),
            "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
            "eventSource": self.event_source,
            "eventSourceARN": self.arn_prefix + meta.queue,
            "awsRegion": REGION,
        }

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        return {"Records": [self.item(r) for r in records]}

    def ordered(self, records: Sequence[Record]) -> bool:
        return False  # acked one by one; a message retried does not hold up the others

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for position, item in enumerate(event.get("Records") or []):
            attributes = {str(k): str(v) for k, v in (item.get("attributes") or {}).items()}
            body = str(item.get("body") or "")
            if attributes.pop(BODY_ENCODING, None) == BASE64:
                value = base64.b64decode(body)
            else:
                value = body.encode()
            message_attrs = item.get("messageAttributes") or {}
            queue = str(item.get("eventSourceARN", "")).partition(":queue/")[2]
            receives = int_or_none(attributes.get("ApproximateReceiveCount")) or 1
            out.append(
                Record(
                    source=queue,
                    position=position,
                    value=value,
                    timestamp_ms=int_or_none(attributes.get("SentTimestamp")) or 0,
                    headers=record_headers(message_attrs),
                    attempts=receives - 1,
                    redelivered=attributes.get("redelivered") == "true",
                    size=len(body) + 300,
                    meta=KombuMeta(
                        queue,
                        str(item.get("messageId", "")),
                        str(item.get("receiptHandle", "")),
                        attributes,
                        _copy_attributes(message_attrs),
                    ),
                )
            )
        return out

    def item_key(self, record: Record) -> Hashable:
        meta: KombuMeta = record.meta
        return meta.message_id

    def item_identifier(self, record: Record) -> Any:
        # As for SQS: the messageId itself.
        # https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-errorhandling.html
        meta: KombuMeta = record.meta
        return meta.message_id

    def parse_item(self, identifier: Any) -> Hashable | None:
        return identifier if isinstance(identifier, str) and identifier else None

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        queues: dict[str, dict[str, Any]] = {}
        for r in records:
            meta: KombuMeta = r.meta
            entry = queues.setdefault(
                meta.queue, {"messageIds": [], "firstRecordTimestamp": iso_ms(r.timestamp_ms)}
            )
            entry["messageIds"].append(meta.message_id)
            entry["lastRecordTimestamp"] = iso_ms(r.timestamp_ms)
        return {
            "transport": self.transport,
            "broker": self.broker,
            "batchSize": len(records),
            "queues": queues,
        }

    def filter_view(self, record: Record) -> dict[str, Any]:
        # Lambda's SQS filter patterns see `body` (as JSON when it is), `attributes` and
        # `messageAttributes`: https://docs.aws.amazon.com/lambda/latest/dg/with-sqs-filtering.html
        meta: KombuMeta = record.meta
        return {
            "body": _decoded(record.value),
            "attributes": meta.attributes,
            "messageAttributes": meta.message_attributes,
        }
