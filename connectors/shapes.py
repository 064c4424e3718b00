"""Lambda's event shapes for Kafka, RabbitMQ and Redis Streams, built from engine records.

Pure functions of `Record`s: the broker modules fill `Record.meta` with the metadata below and
hand the matching shape to the engine. Kept apart from the drivers so the memory connector can
speak every shape and tests need no broker client.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from workers.deadletter import iso_ms
from workers.records import Record

_b64 = base64.b64encode
_b2a = binascii.b2a_base64

# Bytes of JSON punctuation and coordinates each record adds to an event, besides its payload.
RECORD_OVERHEAD_BYTES = 160


def encoded_size(value: bytes, key: bytes | None = None, extra: int = 0) -> int:
    """Approximate bytes a record adds to an event: base64 grows its payload by 4/3."""
    raw = len(value) + (len(key) if key else 0)
    return (raw + 2) // 3 * 4 + RECORD_OVERHEAD_BYTES + extra


def _decoded(data: bytes) -> Any:
    """What filter patterns see of a payload: its JSON if it is JSON, else its text."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _rmq_timestamp_ms(props: dict[str, Any]) -> int:
    value = props.get("timestamp")
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _rmq_headers(props: dict[str, Any]) -> list[tuple[str, bytes]]:
    headers = props.get("headers") or {}
    if not isinstance(headers, dict):
        return []
    out = []
    for name, value in headers.items():
        if isinstance(value, str):
            out.append((name, value.encode()))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((name, str(value).encode()))
    return out


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            return int(value)
        except ValueError:  # digits int() does not read, such as "²"
            return None
    return None


# --- Kafka -------------------------------------------------------------------------------------

TIMESTAMP_TYPES = {0: "NO_TIMESTAMP_TYPE", 1: "CREATE_TIME", 2: "LOG_APPEND_TIME"}


@dataclass(frozen=True, slots=True)
class KafkaMeta:
    topic: str
    partition: int
    timestamp_type: str = "CREATE_TIME"


def kafka_item(
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    timestamp_type: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, bytes]],
) -> dict[str, Any]:
    """One record of Lambda's Kafka event; the connector calls it once per message it reads.

    One dict literal per case: building the dict at its final size is the cheapest way CPython
    has, and this runs for every record.
    """
    encoded = _b2a(value, newline=False).decode()
    listed = [{name: list(data)} for name, data in headers] if headers else []
    if key is None:
        return {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "timestamp": timestamp_ms,
            "timestampType": timestamp_type,
            "value": encoded,
            "headers": listed,
        }
    return {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": timestamp_ms,
        "timestampType": timestamp_type,
        "key": _b2a(key, newline=False).decode(),
        "value": encoded,
        "headers": listed,
    }


class KafkaShape:
    """Lambda's self-managed Kafka event (`"eventSource": "SelfManagedKafka"`).

    https://docs.aws.amazon.com/lambda/latest/dg/with-kafka.html
    """

    batch_info_name = "KafkaBatchInfo"

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        # The hot path of every invocation: items the connector built are taken, not rebuilt.
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            item = r.item
            if item is None:
                meta: KafkaMeta = r.meta
                item = kafka_item(
                    meta.topic,
                    meta.partition,
                    r.position,
                    r.timestamp_ms,
                    meta.timestamp_type,
                    r.key,
                    r.value,
                    r.headers,
                )
            else:
                r.item = None
            items = by_partition.get(r.source)
            if items is None:
                items = by_partition[r.source] = []
            items.append(item)
        return {
            "eventSource": "SelfManagedKafka",
            "bootstrapServers": self.bootstrap_servers,
            "records": by_partition,
        }

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for unit, items in event.get("records", {}).items():
            for item in items:
                key = _unb64(item["key"]) if item.get("key") is not None else None
                value = _unb64(item.get("value") or "")
                headers = [
                    (name, bytes(v)) for h in item.get("headers", []) for name, v in h.items()
                ]
                out.append(
                    Record(
                        source=unit,
                        position=int(item["offset"]),
                        value=value,
                        key=key,
                        timestamp_ms=int(item.get("timestamp", 0)),
                        headers=headers,
                        size=encoded_size(value, key, sum(len(v) for _, v in headers)),
                        meta=KafkaMeta(
                            item["topic"],
                            int(item["partition"]),
                            item.get("timestampType", "CREATE_TIME"),
                        ),
                    )
                )
        return out

    def item_key(self, record: Record) -> Hashable:
        return record.ident

    def item_identifier(self, record: Record) -> dict[str, Any]:
        return {"partition": record.source, "offset": record.position}

    def parse_item(self, identifier: Any) -> Hashable | None:
        if not isinstance(identifier, dict):
            return None
        partition = identifier.get("partition")
        offset = _int_or_none(identifier.get("offset"))
        if not isinstance(partition, str) or not partition or offset is None:
            return None
        return (partition, offset)

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        info: dict[str, dict[str, str]] = {}
        for r in records:
            entry = info.get(r.source)
            if entry is None:
                info[r.source] = {
                    "firstRecordOffset": str(r.position),
                    "lastRecordOffset": str(r.position),
                    "firstRecordTimestamp": iso_ms(r.timestamp_ms),
                    "lastRecordTimestamp": iso_ms(r.timestamp_ms),
                }
            else:
                entry["lastRecordOffset"] = str(r.position)
                entry["lastRecordTimestamp"] = iso_ms(r.timestamp_ms)
        return {"bootstrapServers": self.bootstrap_servers, "recordsInfo": info}

    def filter_view(self, record: Record) -> dict[str, Any]:
        meta: KafkaMeta = record.meta
        return {
            "topic": meta.topic,
            "partition": meta.partition,
            "offset": record.position,
            "timestamp": record.timestamp_ms,
            "timestampType": meta.timestamp_type,
            "key": None if record.key is None else record.key.decode("utf-8", "replace"),
            "value": _decoded(record.value),
            "headers": [{name: _decoded(value)} for name, value in record.headers],
        }


# --- RabbitMQ ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
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


# --- Redis Streams -----------------------------------------------------------------------------


def parse_stream_id(entry_id: str) -> int:
    """A stream id "ms-seq" as one sortable integer."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms) << 64) | int(seq or 0)


def format_stream_id(position: int) -> str:
    return f"{position >> 64}-{position & ((1 << 64) - 1)}"


# Marks a Redis field name written as the base64 of its bytes (see `field_name`).
B64_NAME_PREFIX = "b64:"


def field_name(raw: bytes) -> str:
    """A Redis field name as the event shows it: its UTF-8 text, or `b64:` and the base64 of its
    bytes when it is not UTF-8.

    Decoding with replacement characters would make `\\xff` and `\\xfe` the same name, and one
    value would silently replace the other. A UTF-8 name that itself starts with `b64:` is
    encoded too, so that every name in an event reads back to exactly one byte string.
    """
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return B64_NAME_PREFIX + _b64(raw).decode()
    if name.startswith(B64_NAME_PREFIX):
        return B64_NAME_PREFIX + _b64(raw).decode()
    return name


def field_bytes(name: str) -> bytes:
    """The bytes of a field name as `field_name` wrote it."""
    if name.startswith(B64_NAME_PREFIX):
        try:
            return base64.b64decode(name[len(B64_NAME_PREFIX) :], validate=True)
        except binascii.Error:
            pass  # not written by field_name (an event made by hand): the text is the name
    return name.encode("utf-8", "surrogateescape")


@dataclass(slots=True)  # not frozen: one per record, and a frozen __init__ costs more
class RedisMeta:
    stream: str
    entry_id: str
    fields: dict[str, bytes]  # keyed by the names as the event shows them (`field_name`)

    def raw_fields(self) -> dict[bytes, bytes]:
        """The entry's fields under their original names, as the stream held them."""
        return {field_bytes(name): value for name, value in self.fields.items()}


def redis_item(
    stream: str, entry_id: str, timestamp_ms: int, encoded_fields: dict[str, str]
) -> dict[str, Any]:
    """One record of the `redis:streams` event; its fields already in base64."""
    return {"stream": stream, "id": entry_id, "timestamp": timestamp_ms, "fields": encoded_fields}


class RedisShape:
    """The `redis:streams` event of DESIGN.md, in the spirit of Lambda's stream events."""

    batch_info_name = "RedisStreamBatchInfo"

    def __init__(self, server: str) -> None:
        self.server = server  # host:port/db, never credentials

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        # Items the connector built are taken, not rebuilt (see Record.item).
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            item = r.item
            if item is None:
                meta: RedisMeta = r.meta
                item = redis_item(
                    meta.stream,
                    meta.entry_id,
                    r.timestamp_ms,
                    {k: _b2a(v, newline=False).decode() for k, v in meta.fields.items()},
                )
            else:
                r.item = None
            stream = item["stream"]
            items = by_stream.get(stream)
            if items is None:
                items = by_stream[stream] = []
            items.append(item)
        return {"eventSource": "redis:streams", "records": by_stream}

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for stream, items in event.get("records", {}).items():
            for item in items:
                fields = {k: _unb64(v) for k, v in item.get("fields", {}).items()}
                value = orjson.dumps({k: v.decode("utf-8", "replace") for k, v in fields.items()})
                out.append(
                    Record(
                        source=stream,
                        position=parse_stream_id(item["id"]),
                        value=value,
                        timestamp_ms=int(item.get("timestamp", 0)),
                        size=encoded_size(value),
                        meta=RedisMeta(stream, item["id"], fields),
                    )
                )
        return out

    def item_key(self, record: Record) -> Hashable:
        meta: RedisMeta = record.meta
        return (meta.stream, meta.entry_id)

    def item_identifier(self, record: Record) -> dict[str, Any]:
        meta: RedisMeta = record.meta
        return {"stream": meta.stream, "id": meta.entry_id}

    def parse_item(self, identifier: Any) -> Hashable | None:
        if not isinstance(identifier, dict):
            return None
        stream, entry_id = identifier.get("stream"), identifier.get("id")
        if not isinstance(stream, str) or not isinstance(entry_id, str) or not stream:
            return None
        return (stream, entry_id)

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        streams: dict[str, dict[str, str]] = {}
        for r in records:
            meta: RedisMeta = r.meta
            entry = streams.get(meta.stream)
            if entry is None:
                streams[meta.stream] = {
                    "firstId": meta.entry_id,
                    "lastId": meta.entry_id,
                    "firstRecordTimestamp": iso_ms(r.timestamp_ms),
                    "lastRecordTimestamp": iso_ms(r.timestamp_ms),
                }
            else:
                entry["lastId"] = meta.entry_id
                entry["lastRecordTimestamp"] = iso_ms(r.timestamp_ms)
        return {"server": self.server, "streams": streams}

    def filter_view(self, record: Record) -> dict[str, Any]:
        meta: RedisMeta = record.meta
        return {
            "stream": meta.stream,
            "id": meta.entry_id,
            "timestamp": record.timestamp_ms,
            "fields": {k: _decoded(v) for k, v in meta.fields.items()},
        }


def shape_for_event(event: dict[str, Any]) -> KafkaShape | RabbitShape | RedisShape:
    """The shape that built `event` (a dead letter's payload), to read its records back."""
    source = event.get("eventSource")
    if source == "SelfManagedKafka":
        return KafkaShape(str(event.get("bootstrapServers", "")))
    if source == "aws:rmq":
        arn = str(event.get("eventSourceArn", ""))
        return RabbitShape(arn.rsplit(":", 1)[-1] if arn else "")
    if source == "redis:streams":
        return RedisShape("")
    raise ValueError(f"not an event esm-workers builds: eventSource {source!r}")
