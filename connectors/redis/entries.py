"""Stream entries as XREADGROUP returns them, turned into engine records with their event items."""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence

import orjson

from connectors.redis.client import REPLAY_FIELD_BYTES, log
from connectors.redis.shape import (
    RedisMeta,
    entry_value,
    field_name,
    format_stream_id,
    parse_stream_id,
)
from workers.engine.letters import REPLAY_HEADER
from workers.engine.ports import undecodable
from workers.engine.records import Record
from workers.engine.shapes import RECORD_OVERHEAD_BYTES

# Bytes the "fields" object adds per field in the event, beyond its name and base64 value.
FIELD_BYTES = 8
# Field names kept as the event shows them, before the cache is emptied.
NAMES_KEPT = 4096

# An entry read: its id as text, as the server sent it, and its fields.
Entry = tuple[str, bytes, dict[bytes, bytes]]


class EntryConverter:
    """Makes the records of one source's entries, and keeps the newest id read of each stream.

    Record.key is the `partition_key_field` value when configured, and Record.value what
    `shape.entry_value` says the entry's value is, knowing that key field.
    """

    def __init__(self, mapping: str, key_field: str | None) -> None:
        self.mapping = mapping
        self._key_field = key_field.encode() if key_field else None
        self._key_name = field_name(self._key_field) if self._key_field is not None else None
        self._names: dict[bytes, str] = {}
        # The newest entry id converted per stream, where a vanished group is recreated.
        self.last_seen: dict[str, str] = {}

    def convert(
        self, stream: str, fresh: Sequence[Entry], counts: Mapping[bytes, int] | None
    ) -> list[Record]:
        """Engine records for entries not in flight before; `counts` are the deliveries
        XPENDING reports (None: first deliveries)."""
        out: list[Record] = []
        append = out.append
        names = self._names
        key_field = self._key_field
        key_name = self._key_name
        newest = -1
        for entry_id, raw_id, fields in fresh:
            ms_text, _, seq_text = entry_id.partition("-")
            ms = int(ms_text)
            position = (ms << 64) | int(seq_text)
            if position > newest:
                newest = position
            # One pass over the fields: their names as text, and the bytes they add to the
            # event (a value in base64 grows by 4/3).
            named: dict[str, bytes] = {}
            size = RECORD_OVERHEAD_BYTES
            for raw_name, data in fields.items():
                name = names.get(raw_name) or self.name_of(raw_name)
                named[name] = data
                size += len(raw_name) + (len(data) + 2) // 3 * 4 + FIELD_BYTES
            key = None if key_field is None else fields.get(key_field)
            headers: Sequence[tuple[str, bytes]] = ()
            replays = fields.get(REPLAY_FIELD_BYTES)
            if replays is not None:
                # A replayed entry (`workers dlq replay --to source`): the count is a header for
                # the engine and stays a field for the handler, but the value is what it was
                # before the replay, so filter patterns match it as they did then.
                headers = [(REPLAY_HEADER, replays)]
            attempts = 0 if counts is None else max(0, counts.get(raw_id, 1) - 1)
            append(
                Record(
                    stream,
                    position,
                    entry_value(named, key_name),
                    key,
                    ms,
                    headers,
                    attempts,
                    attempts > 0,
                    size,
                    RedisMeta(stream, entry_id, named),
                )
            )
        if out:
            last = self.last_seen.get(stream)
            if last is None or newest > parse_stream_id(last):
                self.last_seen[stream] = format_stream_id(newest)
        return out

    def undecodable(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes], exc: Exception
    ) -> Record:
        """The record of an entry `convert` failed on: it goes to the on-failure destination."""
        log.error(
            "mapping %s: %s %s cannot be read (%s: %s); it goes to the on-failure destination",
            self.mapping,
            stream,
            entry_id,
            type(exc).__name__,
            exc,
        )
        # Its fields as they came, names and values in base64: nothing about them is assumed.
        b64 = binascii.b2a_base64
        raw = orjson.dumps(
            {
                b64(k, newline=False).decode(): b64(v, newline=False).decode()
                for k, v in fields.items()
            }
        )
        return undecodable(
            stream,
            parse_stream_id(entry_id),
            raw,
            exc,
            size=RECORD_OVERHEAD_BYTES + len(raw),
            meta=RedisMeta(stream, entry_id, {}),
        )

    def name_of(self, raw_name: bytes) -> str:
        """A field name as the event shows it (`field_name`); names repeat across entries, so
        the ones seen are kept."""
        name = self._names.get(raw_name)
        if name is None:
            if len(self._names) > NAMES_KEPT:
                self._names.clear()
            name = self._names[raw_name] = field_name(raw_name)
        return name
