"""Helpers for writing new handlers: the records of any event shape, decoded.

    from workers.events import records, batch_response

    def handler(event, context):
        failed = []
        for record in records(event):
            try:
                process(record.json())
            except Exception:
                failed.append(record)
        return batch_response(failed)

Ported Lambda handlers keep reading the event as Lambda shapes it; these helpers are for code
written fresh, which then runs unchanged on Kafka, RabbitMQ and Redis Streams mappings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import orjson

from workers.app.registry import shape_for_event
from workers.engine.ports import FieldedShape


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One record of an event, whatever the broker."""

    source: str  # "topic-partition", queue or stream
    # Kafka value, RabbitMQ body; for a Redis entry what its event shape says the value is (its
    # only field's, or its fields as JSON)
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    item_identifier: Any  # what batchItemFailures wants for this record (SQS: the messageId)
    # Redis entries' fields under their original names: as text when the name is UTF-8, else
    # decoded with "surrogateescape" (name.encode("utf-8", "surrogateescape") is its bytes), so
    # names that are not UTF-8 stay apart. The event itself writes those as "b64:<base64>".
    fields: dict[str, bytes] = dataclass_field(default_factory=dict)

    def text(self) -> str:
        return self.value.decode("utf-8")

    def json(self) -> Any:
        return orjson.loads(self.value)

    def field(self, name: str | bytes) -> bytes | None:
        """The value of Redis field `name` (text, or the name's bytes), or None."""
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return self.fields.get(name)

    def header(self, name: str) -> bytes | None:
        """The last value of header `name`, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


def records(event: dict[str, Any]) -> Iterator[EventRecord]:
    """Every record of a Kafka, RabbitMQ or Redis Streams event, in event order."""
    shape = shape_for_event(event)
    # A shape whose records are named fields (Redis entries) says what they are, as it says
    # what the value is.
    fields_of = shape.handler_fields if isinstance(shape, FieldedShape) else None
    for r in shape.records(event):
        fields = fields_of(r) if fields_of is not None else {}
        yield EventRecord(
            source=r.source,
            value=r.value,
            key=r.key,
            headers=list(r.headers),
            timestamp_ms=r.timestamp_ms,
            item_identifier=shape.item_identifier(r),
            fields=fields,
        )


def batch_response(failed: Iterable[EventRecord]) -> dict[str, Any]:
    """The `ReportBatchItemFailures` response naming `failed` (empty: the batch succeeded)."""
    return {"batchItemFailures": [{"itemIdentifier": r.item_identifier} for r in failed]}
