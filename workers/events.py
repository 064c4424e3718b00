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


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One record of an event, whatever the broker."""

    source: str  # "topic-partition", queue or stream
    value: bytes  # Kafka value, RabbitMQ body; a Redis entry's only field, or its fields as JSON
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    item_identifier: dict[str, Any]  # what batchItemFailures wants for this record
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
    for r in shape.records(event):
        fields: dict[str, bytes] = {}
        value = r.value
        raw_fields = getattr(r.meta, "raw_fields", None)  # a Redis entry's
        if raw_fields is not None:
            fields = {
                name.decode("utf-8", "surrogateescape"): value
                for name, value in raw_fields().items()
            }
            if len(fields) == 1:
                value = next(iter(fields.values()))
        yield EventRecord(
            source=r.source,
            value=value,
            key=r.key,
            headers=list(r.headers),
            timestamp_ms=r.timestamp_ms,
            item_identifier=shape.item_identifier(r),
            fields=fields,
        )


def batch_response(failed: Iterable[EventRecord]) -> dict[str, Any]:
    """The `ReportBatchItemFailures` response naming `failed` (empty: the batch succeeded)."""
    return {"batchItemFailures": [{"itemIdentifier": r.item_identifier} for r in failed]}
