"""The on-failure record (a superset of Lambda's) and its delivery to a destination."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from workers.engine.backoff import Backoff
from workers.engine.clock import Clock
from workers.engine.lettersize import (
    PAYLOAD_OMITTED,
    LetterLimit,
    letter_bytes,
    with_bounded_error,
    without_payload,
)
from workers.engine.outcomes import ErrorInfo
from workers.engine.ports import Destination, EventShape, LetterTooLarge, SizeLimited
from workers.engine.records import Record
from workers.engine.redact import describe
from workers.engine.stats import MappingStats

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


def _coordinates(shape: EventShape, record: Record) -> Any:
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
    # A letter without its payload (too large for its destination) is listed and shown all the
    # same; `workers dlq replay` skips it, saying why.
    if not isinstance(letter.get("payload"), dict) and letter.get(PAYLOAD_OMITTED) is not True:
        return None, "no payload to replay"
    return letter, ""


def payload_omitted(letter: dict[str, Any]) -> bool:
    """True for the letter of a record too large for its destination, kept without payload."""
    return letter.get(PAYLOAD_OMITTED) is True and not isinstance(letter.get("payload"), dict)


class DeadLetters:
    """Sends exhausted records to the on-failure destination, or drops them when there is none.

    Delivery is retried with backoff until it is confirmed or the caller is stopping: a record is
    checkpointed only after its letter is durable, so a destination outage stalls, never loses.
    A letter too large for the destination (over the limit it states, or refused for its size)
    is never sent again as it is: it is split into one letter per record, and a record whose
    letter alone is too large is dead-lettered without its payload, so no partition stalls.
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
        self._limit = LetterLimit(
            destination.max_letter_bytes if isinstance(destination, SizeLimited) else None
        )

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
                _where(records),
            )
            self.stats.add(dropped=len(records))
            return True
        groups: deque[Sequence[Record]] = deque([records])
        while groups:
            group = groups.popleft()
            delivered = self._deliver(group, condition, error, invoke_count, stop)
            if delivered is None:
                return False
            if not delivered:
                # In record order, each its own letter: a too-large batch never stalls.
                groups.extendleft(reversed([[r] for r in group]))
        return True

    def _deliver(
        self,
        records: Sequence[Record],
        condition: Condition,
        error: ErrorInfo | None,
        invoke_count: int,
        stop: threading.Event,
    ) -> bool | None:
        """True once delivered; False if `records` (more than one) must be split; None if
        stopping first."""
        assert self.destination is not None
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
        size = letter_bytes(letter)
        backoff = Backoff(base_s=0.2, cap_s=self.backoff_cap_s)
        while True:
            limit = self._limit.bytes()
            if limit is not None and size > limit and not letter.get(PAYLOAD_OMITTED):
                # A huge error (a handler putting the record in its exception) is cut first.
                bounded = with_bounded_error(letter)
                if bounded is not None:
                    letter, size = bounded, letter_bytes(bounded)
            if limit is not None and size > limit and not letter.get(PAYLOAD_OMITTED):
                if len(records) > 1:
                    log.warning(
                        "mapping %s: a letter of %d records (%d bytes) is over the on-failure"
                        " destination's limit of %d bytes: one letter per record instead",
                        self.mapping,
                        len(records),
                        size,
                        limit,
                    )
                    return False
                letter = self._without_payload(letter, records[0], size, limit)
                size = letter_bytes(letter)
            try:
                self.destination.deliver(letter, records)
            except LetterTooLarge as exc:
                self._limit.refused(size, exc.limit_bytes)
                if len(records) > 1 or not letter.get(PAYLOAD_OMITTED):
                    log.warning(
                        "mapping %s: on-failure destination refused a letter of %d record(s)"
                        " (%d bytes) for its size: %s",
                        self.mapping,
                        len(records),
                        size,
                        exc,
                    )
                    continue  # split or shrunk at the top of the loop, sent again at once
                # Even without payload: the limit is absurdly low; stall and say so.
                delay = backoff.next_delay()
                log.error(
                    "mapping %s: on-failure destination refused even the letter without payload"
                    " of %s (%d bytes): %s; raise its size limit; retry in %.1fs",
                    self.mapping,
                    _where(records),
                    size,
                    exc,
                    delay,
                )
                if self.clock.wait(stop, delay):
                    return None
                continue
            except Exception as exc:
                delay = backoff.next_delay()
                log.error(
                    "mapping %s: on-failure destination refused %d record(s): %s; retry in %.1fs",
                    self.mapping,
                    len(records),
                    describe(exc),
                    delay,
                )
                if self.clock.wait(stop, delay):
                    return None
                continue
            omitted = len(records) if letter.get(PAYLOAD_OMITTED) else 0
            self.stats.add(dead_lettered=len(records), payload_omitted=omitted)
            return True

    def _without_payload(
        self, letter: dict[str, Any], record: Record, size: int, limit: int
    ) -> dict[str, Any]:
        log.warning(
            "mapping %s: the letter of %s alone (%d bytes) is over the on-failure destination's"
            " limit of %d bytes: dead-lettered without its payload (%s)",
            self.mapping,
            _where([record]),
            size,
            limit,
            Condition.MAXIMUM_PAYLOAD_SIZE_EXCEEDED,
        )
        return without_payload(
            letter,
            self.shape.item_identifier(record),
            condition=str(Condition.MAXIMUM_PAYLOAD_SIZE_EXCEEDED),
            letter_bytes=size,
            limit_bytes=limit,
        )


def _where(records: Sequence[Record]) -> str:
    return ", ".join(f"{r.source}@{r.position}" for r in records[:10]) + (
        f" and {len(records) - 10} more" if len(records) > 10 else ""
    )


REPLAY_HEADER = "esm-replay-count"


def _replay_count(record: Record) -> int:
    for name, value in record.headers:
        if name == REPLAY_HEADER:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


# Labels every destination puts next to a letter (message headers; Redis stream fields under
# their own names), so that letters can be routed, filtered and told apart without parsing them.
MAPPING_LABEL = "esm-mapping"
CONDITION_LABEL = "esm-condition"
ERROR_TYPE_LABEL = "esm-error-type"


def letter_labels(letter: Mapping[str, Any], mapping: str) -> dict[str, str]:
    """The mapping, condition and error type of a letter, by label name."""
    request = letter.get("requestContext") or {}
    error = letter.get("error") or {}
    return {
        MAPPING_LABEL: mapping,
        CONDITION_LABEL: str(request.get("condition", "")),
        ERROR_TYPE_LABEL: str(error.get("errorType", "")),
    }


def belongs_to(
    mapping: str, label: str | bytes | None, letter: Mapping[str, Any] | None = None
) -> bool:
    """Whether a stored letter is `mapping`'s (destinations may be shared between mappings):
    its mapping label says so when it has one, else the letter's `mapping` field; a letter
    that names no mapping at all is taken as the reader's."""
    if label is not None:
        owner = label.decode("utf-8", "replace") if isinstance(label, bytes) else label
        return owner == mapping
    return letter is None or letter.get("mapping", mapping) == mapping
