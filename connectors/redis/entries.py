"""Stream entries as XREADGROUP returns them, turned into engine records with their event items."""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from connectors.redis.client import REPLAY_FIELD_BYTES, log
from connectors.redis.shape import (
    RedisMeta,
    entry_value,
    field_name,
    format_stream_id,
    name_of,
    parse_stream_id,
)
from workers.engine.letters import REPLAY_HEADER
from workers.engine.ports import undecodable
from workers.engine.records import Record
from workers.engine.shapes import RECORD_OVERHEAD_BYTES

# Bytes the "fields" object adds per field in the event, beyond its name and base64 value.
FIELD_BYTES = 8

# An entry as the server sends it: its id, and its fields as one list of names and values in
# turn (None for a pending entry deleted since). hiredis gives lists; tuples do as well.
RawEntry = tuple[bytes, list[bytes]]


def stream_replies(response: Any, **options: Any) -> Any:
    """XREADGROUP's reply as (stream, entries) pairs, the entries as the server sent them
    (`RawEntry`); the response callback of the source's client. redis-py's own makes a dict of
    every entry's fields, which costs more than reading them."""
    if isinstance(response, dict):  # RESP3
        return list(response.items())
    return response or []


def as_sent(response: Any, **options: Any) -> Any:
    """XAUTOCLAIM's reply as the server sent it: [cursor, entries (`RawEntry`), deleted ids]."""
    return response


class EntryConverter:
    """Makes the records of one source's entries, and keeps the newest id read of each stream.

    Record.key is the `partition_key_field` value when configured, and Record.value what
    `shape.entry_value` says the entry's value is, knowing that key field.
    """

    def __init__(self, mapping: str, key_field: str | None) -> None:
        self.mapping = mapping
        self._key_field = key_field.encode() if key_field else None
        self._key_name = field_name(self._key_field) if self._key_field is not None else None
        # The newest entry id converted per stream, where a vanished group is recreated.
        self.last_seen: dict[str, str] = {}

    def convert(
        self,
        stream: str,
        entries: Iterable[RawEntry],
        held: dict[str, float],
        now: float,
        counts: Mapping[bytes, int] | None,
        out: list[Record],
    ) -> None:
        """Appends to `out` the records of the entries not in `held` (in flight), and holds
        each one from `now`; `counts` are the deliveries XPENDING reports (None: first
        deliveries). An entry that cannot be converted raises: the records before it are in
        `out` and held, it is not."""
        append = out.append
        # A key field named as the replay field is left to `_uncommon`, which reads both.
        key_field = self._key_field if self._key_field != REPLAY_FIELD_BYTES else None
        replay = REPLAY_FIELD_BYTES
        one = RECORD_OVERHEAD_BYTES + FIELD_BYTES + 2
        two = one + FIELD_BYTES + 2
        newest = -1
        ms_text: str | None = None
        ms = top = 0
        key: bytes | None
        headers: Sequence[tuple[str, bytes]]
        try:
            for raw_id, flat in entries:
                entry_id = raw_id.decode()
                if entry_id in held:
                    continue
                # The entries of one millisecond share its text: it is parsed once.
                head, _, tail = entry_id.partition("-")
                if head != ms_text:
                    ms = int(head)
                    top = ms << 64
                    ms_text = head
                position = top | int(tail)
                # The common cases: the key field and one other, or one field; replayed entries
                # and the rest are spelled out in `_uncommon`. A value in base64 grows by 4/3 in
                # the event, padding included. The fields are named when first asked for
                # (RedisMeta.fields).
                n = len(flat) if flat else 0
                if n == 4 and (
                    (flat[0] == key_field and flat[2] != key_field and flat[2] != replay)
                    or (flat[2] == key_field and flat[0] != key_field and flat[0] != replay)
                ):
                    f0, v0, f1, v1 = flat
                    if f0 == key_field:
                        key = v0
                        value = v1
                    else:
                        key = v1
                        value = v0
                    size = two + len(f0) + len(f1) + (len(v0) + len(v1)) * 4 // 3
                    headers = ()
                    named = None
                elif n == 2 and flat[0] != replay:
                    f0, value = flat
                    key = value if f0 == key_field else None
                    size = one + len(f0) + len(value) * 4 // 3
                    headers = ()
                    named = None
                else:
                    key, value, headers, size, named = self._uncommon(flat or [])
                attempts = 0 if counts is None else max(0, counts.get(raw_id, 1) - 1)
                append(
                    Record(
                        stream,
                        position,
                        value,
                        key,
                        ms,
                        headers,
                        attempts,
                        attempts > 0,
                        size,
                        RedisMeta(stream, entry_id, named, flat),
                    )
                )
                held[entry_id] = now
                if position > newest:
                    newest = position
        finally:
            if newest >= 0:
                last = self.last_seen.get(stream)
                if last is None or newest > parse_stream_id(last):
                    self.last_seen[stream] = format_stream_id(newest)

    def _uncommon(
        self, flat: list[bytes]
    ) -> tuple[bytes | None, bytes, Sequence[tuple[str, bytes]], int, dict[str, bytes]]:
        """Key, value, headers, size and fields by name of an entry `convert` does not take in
        one step: more fields, a replayed entry, a repeated name."""
        it = iter(flat)
        fields = dict(zip(it, it, strict=True))
        key_field = self._key_field
        # One pass over the fields: their names as text, the bytes they add to the event, and the
        # last field that is not the key.
        named: dict[str, bytes] = {}
        size = RECORD_OVERHEAD_BYTES
        data_bytes = 0
        value = b""
        for raw_name, data in fields.items():
            named[name_of(raw_name)] = data
            size += len(raw_name) + FIELD_BYTES + 2
            data_bytes += len(data)
            if raw_name != key_field:
                value = data
        size += data_bytes * 4 // 3
        key = None if key_field is None else fields.get(key_field)
        headers: Sequence[tuple[str, bytes]] = ()
        replays = fields.get(REPLAY_FIELD_BYTES)
        if replays is not None:
            # A replayed entry (`workers dlq replay --to source`): the count is a header for the
            # engine and stays a field for the handler, but the value is what it was before the
            # replay, so filter patterns match it as they did then.
            headers = [(REPLAY_HEADER, replays)]
        if replays is not None or not (
            (len(named) == 2 and key is not None) or (len(named) == 1 and key is None)
        ):
            value = entry_value(named, self._key_name)  # the uncommon cases, spelled out there
        return key, value, headers, size, named

    def undecodable(
        self, stream: str, entry_id: str, flat: list[bytes] | None, exc: Exception
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
        it = iter(flat or ())
        raw = orjson.dumps(
            {
                b64(k, newline=False).decode(): b64(v, newline=False).decode()
                for k, v in zip(it, it, strict=False)  # whatever came: this must not fail
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
