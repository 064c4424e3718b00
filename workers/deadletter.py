"""The on-failure record (a superset of Lambda's) and its delivery to a destination."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from connectors.base import Destination, EventShape
from workers.backoff import Backoff
from workers.clock import Clock
from workers.outcomes import ErrorInfo
from workers.records import Record
from workers.stats import MappingStats

log = logging.getLogger("workers.deadletter")

LETTER_VERSION = "1.0"


class Condition(StrEnum):
    RETRY_ATTEMPTS_EXHAUSTED = "RetryAttemptsExhausted"
    RECORD_AGE_EXCEEDED = "RecordAgeExceeded"
    MAXIMUM_PAYLOAD_SIZE_EXCEEDED = "MaximumPayloadSizeExceeded"
    # The record could not be turned into an event (by its connector or its event shape): it
    # is dead-lettered without being invoked.
    INVALID_RECORD = "InvalidRecord"


def function_arn(function: str) -> str:
    return f"arn:aws:lambda:local:000000000000:function:{function}"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The instants a datetime (and an ISO-8601 string with a four-digit year) can show.
MIN_EPOCH_MS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
MAX_EPOCH_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)


def utc_datetime(epoch_ms: int) -> datetime:
    """`epoch_ms` as a UTC datetime, clamped to years 1-9999: brokers hand over any number
    (negative, 0, past year 9999), and no timestamp may stop a record from being handled."""
    return _EPOCH + timedelta(milliseconds=min(max(epoch_ms, MIN_EPOCH_MS), MAX_EPOCH_MS))


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 in UTC with milliseconds; outside years 1-9999 the nearest instant within."""
    dt = utc_datetime(epoch_ms)
    # Not strftime: glibc's %Y does not pad years before 1000 to four digits.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def build_letter(
    *,
    mapping: str,
    function: str,
    condition: Condition,
    invoke_count: int,
    error: ErrorInfo | None,
    records: Sequence[Record],
    shape: EventShape,
    now_ms: int,
    replay_count: int = 0,
) -> dict[str, Any]:
    """One failure record for `records`, carrying their event so the batch can be replayed."""
    letter: dict[str, Any] = {
        "version": LETTER_VERSION,
        "timestamp": iso_ms(now_ms),
        "requestContext": {
            "requestId": str(uuid.uuid4()),
            "functionArn": function_arn(function),
            "condition": str(condition),
            "approximateInvokeCount": invoke_count,
        },
    }
    if invoke_count > 0:
        letter["responseContext"] = {
            "statusCode": 200,
            "executedVersion": "$LATEST",
            "functionError": "Unhandled",
        }
    try:
        info = {"batchSize": len(records), **shape.batch_info(records)}
    except Exception:  # a record the shape cannot describe still gets its letter
        log.exception("mapping %s: batch info of %s", mapping, _named(records))
        info = {"batchSize": len(records), "records": [_coordinates(shape, r) for r in records]}
    letter[shape.batch_info_name] = info
    letter["mapping"] = mapping
    if error is not None:
        letter["error"] = error.as_json()
    letter["replayCount"] = replay_count
    try:
        payload = shape.event(records)
        orjson.dumps(payload)  # what every destination does with it
    except Exception as exc:
        # No record may stop its own letter: it goes without payload, with its coordinates.
        log.exception("mapping %s: the payload of %s cannot be built", mapping, _named(records))
        letter["payloadOmitted"] = True
        letter["omitted"] = {
            "itemIdentifiers": [_coordinates(shape, r) for r in records],
            "reason": f"{type(exc).__name__}: {exc}"[:1000],
        }
    else:
        letter["payload"] = payload
    return letter


def _coordinates(shape: EventShape, record: Record) -> dict[str, Any]:
    try:
        return shape.item_identifier(record)
    except Exception:
        return {"source": record.source, "position": record.position}


def _named(records: Sequence[Record]) -> str:
    return ", ".join(f"{r.source}@{r.position}" for r in records[:10])


def parse_letter(raw: bytes | None) -> tuple[dict[str, Any] | None, str]:
    """The letter stored in `raw` (a message body, a field), or None and why it is not one."""
    if raw is None:
        return None, "no letter in it"
    try:
        letter = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(letter, dict):
        return None, "not a JSON object"
    request = letter.get("requestContext")
    if not isinstance(request, dict) or not isinstance(request.get("requestId"), str):
        return None, "no requestContext.requestId"
    if not request["requestId"]:
        return None, "empty requestContext.requestId"
    if not isinstance(letter.get("payload"), dict):
        return None, "no payload to replay"
    return letter, ""


class DeadLetters:
    """Sends exhausted records to the on-failure destination, or drops them when there is none.

    Delivery is retried with backoff until it is confirmed or the caller is stopping: a record is
    checkpointed only after its letter is durable, so a destination outage stalls, never loses.
    """

    def __init__(
        self,
        *,
        mapping: str,
        function: str,
        destination: Destination | None,
        shape: EventShape,
        clock: Clock,
        stats: MappingStats,
        backoff_cap_s: float = 30.0,
        replay_count: int = 0,
    ) -> None:
        self.mapping = mapping
        self.function = function
        self.destination = destination
        self.shape = shape
        self.clock = clock
        self.stats = stats
        self.backoff_cap_s = backoff_cap_s
        # Set when these records come from a replay: a letter written again counts it.
        self.replay_count = replay_count

    def send(
        self,
        records: Sequence[Record],
        condition: Condition,
        error: ErrorInfo | None,
        invoke_count: int,
        stop: threading.Event,
    ) -> bool:
        """True once the records may be checkpointed; False if stopping before delivery."""
        if not records:
            return True
        if self.destination is None:
            log.warning(
                "mapping %s: dropping %d record(s) (%s) with no on-failure destination: %s",
                self.mapping,
                len(records),
                condition,
                ", ".join(f"{r.source}@{r.position}" for r in records[:10]),
            )
            self.stats.add(dropped=len(records))
            return True
        letter = build_letter(
            mapping=self.mapping,
            function=self.function,
            condition=condition,
            invoke_count=invoke_count,
            error=error,
            records=records,
            shape=self.shape,
            now_ms=self.clock.wall_ms(),
            replay_count=max(self.replay_count, *(_replay_count(r) for r in records)),
        )
        backoff = Backoff(base_s=0.2, cap_s=self.backoff_cap_s)
        while True:
            try:
                self.destination.deliver(letter, records)
            except Exception as exc:
                delay = backoff.next_delay()
                log.error(
                    "mapping %s: on-failure destination refused %d record(s): %s; retry in %.1fs",
                    self.mapping,
                    len(records),
                    exc,
                    delay,
                )
                if self.clock.wait(stop, delay):
                    return False
                continue
            self.stats.add(dead_lettered=len(records))
            return True


REPLAY_HEADER = "esm-replay-count"


def _replay_count(record: Record) -> int:
    for name, value in record.headers:
        if name == REPLAY_HEADER:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
