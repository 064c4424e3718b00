"""The `redis:streams` event, built from engine records and read back from one."""

from __future__ import annotations

import base64
import binascii
import marshal
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import orjson

from workers.engine.letters import REPLAY_HEADER, iso_ms
from workers.engine.records import Record
from workers.engine.shapes import decoded as _decoded
from workers.engine.shapes import encoded_size

_b64 = base64.b64encode
_b2a = binascii.b2a_base64


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def parse_stream_id(entry_id: str) -> int:
    """A stream id "ms-seq" as one sortable integer."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms) << 64) | int(seq or 0)


def format_stream_id(position: int) -> str:
    return f"{position >> 64}-{position & ((1 << 64) - 1)}"


def timestamp_start_id(ms: int) -> str:
    """Where a consumer group starts to read entries stamped at `ms` or later."""
    # The group's last-delivered id is exclusive: start just below the first id of `ms` so an
    # entry stamped exactly at the timestamp is read (as Kafka's offsets_for_times would).
    return format_stream_id((ms << 64) - 1) if ms > 0 else "0-0"


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


# The field a replay onto the source adds (`workers dlq replay --to source`), as the replay header
# of Kafka and RabbitMQ records.
REPLAY_FIELD = REPLAY_HEADER


def entry_value(fields: Mapping[str, bytes], key_name: str | None = None) -> bytes:
    """What an entry's value is: the value the source gives its record, the one filters and
    replays onto other brokers take, and `workers.events.EventRecord.value`.

    `fields` are keyed by the names as the event shows them (`field_name`). The value is the only
    field's, not counting `esm-replay-count` (a replayed entry keeps the value it had before) nor,
    when the mapping has a `partition_key_field` (`key_name`), that field beside one other (as a
    Kafka record has a key and a value). Otherwise it is a JSON object of the fields (the key
    field included), their values decoded as UTF-8. Handlers see the event, which does not say
    which field is the key: for them `key_name` is None.
    """
    if len(fields) == 1:
        for value in fields.values():
            return value
    body = fields
    if REPLAY_FIELD in fields:
        body = {k: v for k, v in fields.items() if k != REPLAY_FIELD}
        if len(body) == 1:
            return next(iter(body.values()))
    if key_name is not None and len(body) == 2 and key_name in fields:
        for name, value in body.items():  # a loop, not a generator: this runs per record
            if name != key_name:
                return value
    return orjson.dumps({k: v.decode("utf-8", "replace") for k, v in body.items()})


def handler_fields(fields: Mapping[str, bytes]) -> dict[str, bytes]:
    """An entry's fields as `workers.events.EventRecord.fields` holds them: under their original
    names as text, a name that is not UTF-8 decoded with "surrogateescape" so that its bytes
    come back exactly (`name.encode("utf-8", "surrogateescape")`)."""
    return {
        field_bytes(name).decode("utf-8", "surrogateescape"): value
        for name, value in fields.items()
    }


class RedisMeta:
    """What a Redis record keeps of its entry: its stream, its id and its fields.

    The source keeps the fields as the server sent them (`flat`: names and values in turn) and
    names them only when asked (`fields`), which most batches never do; records read back from
    an event, and the memory connector's, have them by name only (`flat` None).
    """

    __slots__ = ("_fields", "entry_id", "flat", "stream")

    def __init__(
        self,
        stream: str,
        entry_id: str,
        fields: dict[str, bytes] | None = None,
        flat: list[bytes] | None = None,
    ) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.flat = flat
        self._fields = fields

    @property
    def fields(self) -> dict[str, bytes]:
        """The fields keyed by the names as the event shows them (`field_name`)."""
        fields = self._fields
        if fields is None:
            fields = self._fields = named_fields(self.flat or ())
        return fields

    def raw_fields(self) -> dict[bytes, bytes]:
        """The entry's fields under their original names, as the stream held them."""
        if self.flat is not None:
            it = iter(self.flat)
            return dict(zip(it, it, strict=True))
        return {field_bytes(name): value for name, value in self.fields.items()}

    def __repr__(self) -> str:
        return f"RedisMeta({self.stream!r}, {self.entry_id!r})"


# Field names as the event shows them, by their bytes: names repeat across entries, so the ones
# seen are kept, up to NAMES_KEPT. The threads of a process share them; a lost race only names
# a field twice.
NAMES_KEPT = 4096
_names: dict[bytes, str] = {}


def name_of(raw: bytes) -> str:
    """`field_name(raw)`, remembered."""
    name = _names.get(raw)
    if name is None:
        if len(_names) >= NAMES_KEPT:
            _names.clear()
        name = _names[raw] = field_name(raw)
    return name


def named_fields(flat: Sequence[bytes]) -> dict[str, bytes]:
    """Fields as the server sends them (names and values in turn) keyed by the names as the event
    shows them; a name sent twice keeps its last value, as in a dict of the entry."""
    it = iter(flat)
    return {name_of(raw): data for raw, data in zip(it, it, strict=True)}


def encoded_fields(fields: list[bytes] | dict[str, bytes]) -> dict[str, str]:
    """An entry's "fields" in the event, their values in base64: of `RedisMeta.flat`, or of the
    fields by name when there is none."""
    b2a = _b2a
    if isinstance(fields, dict):
        return {name: b2a(data, newline=False).decode() for name, data in fields.items()}
    names = _names
    if len(fields) == 4:  # the common case (a name sent twice: the last value, as in a dict)
        f0, v0, f1, v1 = fields
        return {
            names.get(f0) or name_of(f0): b2a(v0, newline=False).decode(),
            names.get(f1) or name_of(f1): b2a(v1, newline=False).decode(),
        }
    encoded = {}
    for i in range(0, len(fields), 2):
        raw = fields[i]
        encoded[names.get(raw) or name_of(raw)] = b2a(fields[i + 1], newline=False).decode()
    return encoded


def unpack_event(payload: bytes) -> dict[str, Any]:
    """The event `RedisShape.pack` packed, built where the handler runs."""
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for stream, ids, timestamps, fields in marshal.loads(payload):
        items = by_stream.get(stream)
        if items is None:
            items = by_stream[stream] = []
        encode = encoded_fields
        items += [
            {"stream": stream, "id": entry_id, "timestamp": ms, "fields": encode(entry)}
            for entry_id, ms, entry in zip(ids, timestamps, fields, strict=True)
        ]
    return {"eventSource": "redis:streams", "records": by_stream}


# A stream's part of a packed batch: its name, and the ids, timestamps and fields of its entries.
Column = tuple[str, list[str], list[int], list[list[bytes] | dict[str, bytes]]]


class RedisShape:
    """The `redis:streams` event (its layout: README, "Brokers", Redis Streams), in the spirit of
    Lambda's stream events."""

    batch_info_name = "RedisStreamBatchInfo"

    def __init__(self, server: str) -> None:
        self.server = server  # host:port/db, never credentials

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        # Built anew for every invocation: nothing a handler does to its event reaches a retry.
        by_stream: dict[str, list[dict[str, Any]]] = {}
        b2a = _b2a
        names = _names
        stream: str | None = None
        for r in records:
            meta: RedisMeta = r.meta
            if meta.stream != stream:  # a batch is mostly one stream's: its list is kept
                stream = meta.stream
                items = by_stream.get(stream)
                if items is None:
                    items = by_stream[stream] = []
                add = items.append
            flat = meta.flat
            if flat is not None and len(flat) == 4:  # `encoded_fields`, the common case inline
                f0, v0, f1, v1 = flat
                encoded = {
                    names.get(f0) or name_of(f0): b2a(v0, newline=False).decode(),
                    names.get(f1) or name_of(f1): b2a(v1, newline=False).decode(),
                }
            else:
                encoded = encoded_fields(meta.fields if flat is None else flat)
            add(
                {
                    "stream": stream,
                    "id": meta.entry_id,
                    "timestamp": r.timestamp_ms,
                    "fields": encoded,
                }
            )
        return {"eventSource": "redis:streams", "records": by_stream}

    unpacker = "connectors.redis.shape:unpack_event"

    def pack(self, records: Sequence[Record]) -> bytes:
        """The batch as columns per stream, in record order (see `unpack_event`); the fields of
        each entry as `encoded_fields` takes them."""
        metas: list[RedisMeta] = [r.meta for r in records]
        if metas:
            first = metas[0].stream
            if [m.stream for m in metas].count(first) == len(metas):
                # One stream, as in every batch the poller makes: a column each.
                flats = [m.flat for m in metas]
                entries = flats if None not in flats else [m.flat or m.fields for m in metas]
                ids = [m.entry_id for m in metas]
                stamps = [r.timestamp_ms for r in records]
                return marshal.dumps([(first, ids, stamps, entries)])
        groups: list[Column] = []
        columns: dict[str, Column] = {}
        stream: str | None = None
        for r in records:
            meta: RedisMeta = r.meta
            if meta.stream != stream:  # a batch is mostly one stream's: its column is kept
                stream = meta.stream
                group = columns.get(stream)
                if group is None:
                    group = columns[stream] = (stream, [], [], [])
                    groups.append(group)
                add_id, add_ms, add_fields = group[1].append, group[2].append, group[3].append
            add_id(meta.entry_id)
            add_ms(r.timestamp_ms)
            flat = meta.flat
            add_fields(meta.fields if flat is None else flat)
        return marshal.dumps(groups)

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for stream, items in event.get("records", {}).items():
            for item in items:
                fields = {k: _unb64(v) for k, v in item.get("fields", {}).items()}
                value = entry_value(fields)
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

    def handler_fields(self, record: Record) -> dict[str, bytes]:
        meta: RedisMeta = record.meta
        return handler_fields(meta.fields)

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
