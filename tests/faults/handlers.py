"""Handlers for the fault suite. Each appends the ids it completed to a journal file
(`$ESM_FAULTS_JOURNAL`): one JSON array a line, written with O_APPEND just before returning,
so a line means the invocation succeeded for those ids."""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from workers.events import EventRecord, batch_response, records

JOURNAL_ENV = "ESM_FAULTS_JOURNAL"
EVENTS_ENV = "ESM_FAULTS_EVENTS"


def record_id(record: EventRecord) -> str | None:
    """The "id" of a scenario record's JSON payload, or None for a payload without one."""
    try:
        doc = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        return None
    return str(doc["id"]) if isinstance(doc, dict) and "id" in doc else None


def journal(ids: list[str]) -> None:
    if not ids:
        return
    fd = os.open(os.environ[JOURNAL_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, orjson.dumps(ids) + b"\n")
    finally:
        os.close(fd)


def recording(event: dict[str, Any], context: Any) -> None:
    """Succeeds for every record and journals their ids."""
    journal([i for r in records(event) if (i := record_id(r)) is not None])


def poison_aware(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Reports records whose payload has `"poison": true` as failed; journals the rest."""
    failed = []
    done = []
    for r in records(event):
        try:
            doc = orjson.loads(r.value)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and doc.get("poison"):
            failed.append(r)
        elif (i := record_id(r)) is not None:
            done.append(i)
    journal(done)
    return batch_response(failed)


SLEEP_ENV = "ESM_FAULTS_SLEEP_S"


STARTED_SUFFIX = ".started"


def slow_recording(event: dict[str, Any], context: Any) -> None:
    """`recording` after `$ESM_FAULTS_SLEEP_S` seconds per invocation, so that a batch is in
    flight most of the time and a kill or a cut lands mid-batch. The ids are also journaled
    when the invocation starts, to `$ESM_FAULTS_JOURNAL.started`: started but not completed
    means in flight."""
    import time

    ids = [i for r in records(event) if (i := record_id(r)) is not None]
    if ids:
        path = os.environ[JOURNAL_ENV] + STARTED_SUFFIX
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, orjson.dumps(ids) + b"\n")
        finally:
            os.close(fd)
    time.sleep(float(os.environ.get(SLEEP_ENV) or 0))
    journal(ids)


def items_by_ref(event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each record's item of the event under a reference that needs no payload: Kafka
    "topic-partition@offset", Redis "stream@id", RabbitMQ the `messageId` property, SQS the
    `messageId` (hostile records have no usable JSON id)."""
    out: dict[str, dict[str, Any]] = {}
    if "Records" in event:
        return {str(item.get("messageId")): item for item in event["Records"]}
    if "rmqMessagesByQueue" in event:
        for items in event["rmqMessagesByQueue"].values():
            for item in items:
                out[str((item.get("basicProperties") or {}).get("messageId"))] = item
        return out
    key = "offset" if event.get("eventSource") == "SelfManagedKafka" else "id"
    for unit, items in event.get("records", {}).items():
        for item in items:
            out[f"{unit}@{item[key]}"] = item
    return out


def refs(event: dict[str, Any]) -> list[str]:
    """The references of an event's records (see `items_by_ref`), in event order."""
    return list(items_by_ref(event))


def recording_refs(event: dict[str, Any], context: Any) -> None:
    """Succeeds for every record, whatever its payload, and journals their references; with
    `$ESM_FAULTS_EVENTS` set, first appends the event, whole, to that file, for scenarios that
    check what the handler was given."""
    path = os.environ.get(EVENTS_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, orjson.dumps(event) + b"\n")
        finally:
            os.close(fd)
    journal(refs(event))


class _Unprintable(Exception):
    """An exception whose message cannot even be computed."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")


# What `hostile` does when a record of its batch asks for it (`"act"` in the JSON payload).
_MEMORY_MB_PAST_LIMIT = 1024


def hostile(event: dict[str, Any], context: Any) -> Any:
    """Misbehaves as the first record carrying `"act"` says; otherwise journals the ids.

    raise: ValueError; surrogate / bad_str / huge_error: raises with a message JSON cannot carry,
    one whose str() raises, a 2 MB one; hang: sleeps past any timeout; exit: os._exit(3);
    string / list: returns one; unserializable: returns what JSON cannot hold; unknown: a
    batchItemFailures naming a record not in the batch; memory: allocates more than any
    `memory_mb` the suite configures; flood: writes 6 MB that are not UTF-8 to stdout, then
    goes on as a good record.
    """
    ids = []
    for r in records(event):
        try:
            doc = orjson.loads(r.value)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict):
            continue
        act = doc.get("act")
        if act == "raise":
            raise ValueError(f"poison record {doc.get('id')}")
        if act == "hang":
            time.sleep(3600)
        if act == "exit":
            os._exit(3)
        if act == "string":
            return "not a response"
        if act == "list":
            return [doc.get("id")]
        if act == "unserializable":
            return {"items": {1, 2}, "raw": object()}
        if act == "unknown":
            # Well formed for every shape, naming no record of this batch.
            unknown = {"partition": "none-0", "offset": 10**9, "queue": "none"}
            unknown |= {"deliveryTag": 10**9, "stream": "none", "id": "0-1"}
            return {"batchItemFailures": [{"itemIdentifier": unknown}]}
        if act == "surrogate":
            raise ValueError(f"record \udcff{doc.get('id')} \ud800")
        if act == "bad_str":
            raise _Unprintable()
        if act == "huge_error":
            raise ValueError("x" * (2 * 1024 * 1024))
        if act == "flood":
            os.write(1, b"\xff\xfe flood\n" * (768 * 1024))
        if act == "memory":
            block = bytearray(_MEMORY_MB_PAST_LIMIT * 1024 * 1024)
            # Touch every page so the memory is used, not just reserved.
            for offset in range(0, len(block), 4096):
                block[offset] = 1
        if "id" in doc:
            ids.append(str(doc["id"]))
    journal(ids)
    return None
