"""Inspecting and replaying dead letters: filters, listing, and replay to handler or source.

A replay takes the letters pending when it starts, one at a time: their records go to the
mapping's function under its retry policy (or back onto the source), and only then is the letter
marked replayed. Records that fail again become a new letter with its replay count raised, which
this replay does not pick up, so nothing is replayed in a loop.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from workers.app.registry import shape_for_event
from workers.engine.clock import SYSTEM_CLOCK, Clock
from workers.engine.invoker import Invoker
from workers.engine.letters import DeadLetters, payload_omitted
from workers.engine.lettersize import OMITTED
from workers.engine.policy import BatchRunner, Policy
from workers.engine.ports import (
    DeadLetterStore,
    Destination,
    OrderAwareShape,
    SourcePublisher,
    StoredLetter,
)
from workers.engine.records import Record
from workers.engine.stats import MappingStats

log = logging.getLogger("workers.dlq")


@dataclass(frozen=True, slots=True)
class LetterFilter:
    since_ms: int | None = None
    error_type: str | None = None

    def matches(self, letter: dict[str, Any]) -> bool:
        error_type = (letter.get("error") or {}).get("errorType")
        if self.error_type is not None and error_type != self.error_type:
            return False
        return self.since_ms is None or letter_time_ms(letter) >= self.since_ms


def parse_time(text: str) -> int:
    """`--since`: epoch milliseconds or ISO-8601 (UTC unless an offset is given)."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO-8601 or epoch milliseconds)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def letter_time_ms(letter: dict[str, Any]) -> int:
    try:
        return parse_time(str(letter.get("timestamp", "")))
    except ValueError:
        return 0


def matching(store: DeadLetterStore, flt: LetterFilter) -> Iterator[StoredLetter]:
    return (s for s in store.pending() if flt.matches(s.letter))


# --- list and show -------------------------------------------------------------------------------


def payload_records(letter: dict[str, Any]) -> list[Record]:
    payload = letter.get("payload") or {}
    return shape_for_event(payload).records(payload) if payload else []


def coordinates(letter: dict[str, Any]) -> str:
    """Where the letter's records came from, e.g. 'orders-0@17-19' or 'orders(3)' (a queue)."""
    if payload_omitted(letter):
        return omitted_coordinates(letter)
    spans: dict[str, list[int]] = {}
    records = payload_records(letter)
    for r in records:
        spans.setdefault(r.source, []).append(r.position)
    payload = letter.get("payload") or {}
    source = payload.get("eventSource")
    if source is None and records:
        # Lambda's SQS event names its source in each record.
        first = (payload.get("Records") or [{}])[0]
        source = first.get("eventSource") if isinstance(first, dict) else None
    if source in ("aws:rmq", "aws:sqs"):
        return ", ".join(f"{unit}({len(p)})" for unit, p in spans.items())
    if payload.get("eventSource") == "redis:streams":
        return ", ".join(
            f"{unit}@{records[0].meta.entry_id}" + (f"+{len(p) - 1}" if len(p) > 1 else "")
            for unit, p in spans.items()
        )
    return ", ".join(
        f"{unit}@{min(p)}" + (f"-{max(p)}" if max(p) != min(p) else "") for unit, p in spans.items()
    )


def omitted_coordinates(letter: dict[str, Any]) -> str:
    """The record of a letter without payload, from its itemIdentifier: 'orders-0@17',
    'orders@1700000000000-0', 'orders#5' (a RabbitMQ delivery tag), 'message <messageId>'
    (SQS), marked '(no payload)'."""
    ident = (letter.get(OMITTED) or {}).get("itemIdentifier") or {}
    if isinstance(ident, str):
        where = f"message {ident}"  # SQS: the messageId
    elif "partition" in ident:
        where = f"{ident['partition']}@{ident.get('offset')}"
    elif "stream" in ident:
        where = f"{ident['stream']}@{ident.get('id')}"
    elif "queue" in ident:
        where = f"{ident['queue']}#{ident.get('deliveryTag')}"
    else:
        where = "?"
    return f"{where} (no payload)"


def summary_row(stored: StoredLetter) -> dict[str, Any]:
    letter = stored.letter
    ctx = letter.get("requestContext") or {}
    return {
        "id": stored.id,
        "time": letter.get("timestamp", ""),
        "condition": ctx.get("condition", ""),
        "error": (letter.get("error") or {}).get("errorType", ""),
        "records": 1 if payload_omitted(letter) else len(payload_records(letter)),
        "replays": letter.get("replayCount", 0),
        "source": coordinates(letter),
    }


def decoded(letter: dict[str, Any]) -> dict[str, Any]:
    """The letter with each record's payload shown as JSON or text where it is either."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(letter))
    payload = out.get("payload") or {}
    groups = payload.get("records") or payload.get("rmqMessagesByQueue") or {}
    for items in groups.values():
        for item in items:
            for field in ("key", "value", "data"):
                if isinstance(item.get(field), str):
                    item[f"{field}Decoded"] = _readable(base64.b64decode(item[field]))
            if isinstance(item.get("fields"), dict):
                item["fieldsDecoded"] = {
                    k: _readable(base64.b64decode(v)) for k, v in item["fields"].items()
                }
    return out


def _readable(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary: the base64 field above is the record


# --- replay --------------------------------------------------------------------------------------


@dataclass
class ReplaySummary:
    letters: int = 0
    records: int = 0
    succeeded: int = 0  # records the handler took (or the source confirmed)
    failed_again: int = 0  # records written back to the destination (or dropped)
    # Letters kept without their payload (too large for the destination): nothing to replay,
    # so they stay pending and are skipped with a message.
    no_payload: int = 0
    interrupted: bool = False
    dry_run: bool = False

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "letters": self.letters,
            "records": self.records,
            "succeeded": self.succeeded,
            "failed_again": self.failed_again,
            "interrupted": self.interrupted,
            "dry_run": self.dry_run,
        }
        if self.no_payload:
            out["skipped_no_payload"] = self.no_payload
        return out


@dataclass(frozen=True, slots=True)
class LetterResult:
    """What became of one letter's records in a replay."""

    records: int
    succeeded: int = 0  # taken by the handler, or published onto the source
    dead_lettered: int = 0  # failed again and written to the destination as a new letter
    dropped: int = 0  # failed again with nowhere to go
    dry_run: bool = False
    to: Literal["handler", "source"] = "handler"

    @property
    def failed_again(self) -> int:
        return self.dead_lettered + self.dropped

    def describe(self, letter_id: str) -> str:
        if self.dry_run:
            return f"would replay {letter_id} ({self.records} record(s))"
        if self.to == "source":
            return f"replayed {letter_id}: {self.succeeded} record(s) put back onto the source"
        if not self.failed_again:
            return f"replayed {letter_id}: {self.succeeded} record(s) succeeded"
        parts = []
        if self.dead_lettered:
            parts.append(f"{self.dead_lettered} record(s) dead-lettered anew")
        if self.dropped:
            parts.append(f"{self.dropped} record(s) dropped (no on-failure destination)")
        if self.succeeded:
            parts.append(f"{self.succeeded} succeeded")
        return f"{letter_id} failed again: " + ", ".join(parts)


class Replayer:
    """Replays one mapping's pending dead letters."""

    def __init__(
        self,
        *,
        mapping: str,
        function: str,
        store: DeadLetterStore,
        to: Literal["handler", "source"],
        policy: Policy | None = None,
        invoker: Invoker | None = None,
        destination: Destination | None = None,
        publisher: SourcePublisher | None = None,
        letter_filter: LetterFilter = LetterFilter(),
        rate_per_s: float | None = None,
        limit: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_letter: Callable[[StoredLetter, ReplaySummary, LetterResult], None] | None = None,
    ) -> None:
        self.mapping = mapping
        self.function = function
        self.store = store
        self.to = to
        self.policy = policy
        self.invoker = invoker
        self.destination = destination
        self.publisher = publisher
        self.letter_filter = letter_filter
        self.rate_per_s = rate_per_s
        self.limit = limit
        self.clock = clock
        self.on_letter = on_letter
        self.stop = threading.Event()

    def run(self, dry_run: bool = False) -> ReplaySummary:
        if not dry_run and self.to == "handler" and (self.invoker is None or self.policy is None):
            raise ValueError("replay to the handler needs an invoker and a policy")
        if not dry_run and self.to == "source" and self.publisher is None:
            raise ValueError("replay to the source needs a publisher")
        summary = ReplaySummary(dry_run=dry_run)
        started = self.clock.monotonic()
        try:
            for stored in matching(self.store, self.letter_filter):
                if self.stop.is_set():
                    summary.interrupted = True
                    break
                if self.limit is not None and summary.letters >= self.limit:
                    break
                if payload_omitted(stored.letter):
                    summary.no_payload += 1
                    log.warning(
                        "letter %s cannot be replayed and was skipped: it was stored without its"
                        " payload (%s, too large for the destination); the record is at %s",
                        stored.id,
                        (stored.letter.get("requestContext") or {}).get("condition", ""),
                        omitted_coordinates(stored.letter),
                    )
                    continue
                records = payload_records(stored.letter)
                if self.rate_per_s and summary.records:
                    due = started + summary.records / self.rate_per_s
                    if self.clock.wait(self.stop, due - self.clock.monotonic()):
                        summary.interrupted = True
                        break
                result = LetterResult(len(records), dry_run=True)
                if not dry_run:
                    result, completed = self._replay(stored, records)
                    summary.succeeded += result.succeeded
                    summary.failed_again += result.failed_again
                    if not completed:
                        summary.interrupted = True
                        break
                    self.store.done(stored)
                summary.letters += 1
                summary.records += len(records)
                if self.on_letter is not None:
                    self.on_letter(stored, summary, result)
        finally:
            self.store.close()
        return summary

    def _replay(self, stored: StoredLetter, records: list[Record]) -> tuple[LetterResult, bool]:
        """What became of the letter's records, and False if stopped before they all settled."""
        replay_count = int(stored.letter.get("replayCount", 0)) + 1
        if self.to == "source":
            assert self.publisher is not None
            self.publisher.publish(records, replay_count)
            return LetterResult(len(records), succeeded=len(records), to="source"), True
        assert self.policy is not None and self.invoker is not None
        payload = stored.letter["payload"]
        shape = shape_for_event(payload)
        ordered = shape.ordered(records) if isinstance(shape, OrderAwareShape) else True
        # A replay is a delivery of its own: the retries it gets are the mapping's, whatever
        # the delivery counts the records carried when they were dead-lettered.
        for r in records:
            r.attempts = 0
        stats = MappingStats()
        runner = BatchRunner(
            mapping=self.mapping,
            function=self.function,
            policy=self.policy,
            invoker=self.invoker,
            shape=shape,
            ordered=ordered,
            dead_letters=DeadLetters(
                mapping=self.mapping,
                function=self.function,
                destination=self.destination,
                shape=shape,
                clock=self.clock,
                stats=stats,
                replay_count=replay_count,
            ),
            settle=lambda settled: None,  # the letter is marked done once the run completes
            clock=self.clock,
            stats=stats,
        )
        completed = runner.run(records, self.stop)
        result = LetterResult(
            len(records),
            succeeded=stats.succeeded,
            dead_lettered=stats.dead_lettered,
            dropped=stats.dropped,
        )
        return result, completed
