"""Lambda's Amazon MQ for RabbitMQ event, built from engine records and read back from one."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.engine.letters import iso_ms
from workers.engine.records import Record
from workers.engine.shapes import decoded as _decoded
from workers.engine.shapes import encoded_size
from workers.engine.shapes import int_or_none as _int_or_none

_b64 = base64.b64encode
_b2a = binascii.b2a_base64


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
