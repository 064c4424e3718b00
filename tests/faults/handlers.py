"""Handlers for the fault suite. Each appends the ids it completed to a journal file
(`$ESM_FAULTS_JOURNAL`): one JSON array a line, written with O_APPEND just before returning,
so a line means the invocation succeeded for those ids."""

from __future__ import annotations

import os
from typing import Any

import orjson

from workers.events import EventRecord, batch_response, records

JOURNAL_ENV = "ESM_FAULTS_JOURNAL"


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
