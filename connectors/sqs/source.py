"""The SQS source: long-polls a queue, keeps the messages it holds invisible to other consumers
while their batches run, and deletes what the engine settles (DeleteMessageBatch)."""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import boto3

from connectors.sqs import config as cfg
from connectors.sqs.client import (
    BATCH_MAX,
    RETRYABLE_ERRORS,
    arn_of,
    chunks,
    log,
    sqs_client,
    translate,
)
from connectors.sqs.shape import SQSMeta, SQSShape, lambda_message_attributes, record_of
from workers.engine.ports import (
    AssignmentListener,
    Capabilities,
    ConnectorConfigError,
    SourceBase,
    undecodable,
)
from workers.engine.records import Record
from workers.engine.redact import describe

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

    from workers.app.config import EventSourceMapping

T = TypeVar("T")

# A long poll only while this source holds no message: then no batch is running, nothing waits
# to be deleted, and the wait delays only a shutdown. Holding messages, it polls without waiting
# (WaitTimeSeconds is whole seconds, the engine's poll timeouts are 50-200 ms).
IDLE_WAIT_S = 1
# After an empty receive while holding messages, the next one waits this long (or for `wake`):
# a running batch must not turn into a stream of empty ReceiveMessage calls.
EMPTY_PAUSE_S = 0.5
# ReceiveMessage calls per poll at most (10 messages each), so that acks are not held up.
RECEIVES_PER_POLL = 5
# Lambda's FIFO batches are at most 10 records.
FIFO_BATCH_MAX = 10
# How long queue counts are trusted by `caught_up()` and `lag()`.
COUNTS_TTL_S = 0.5
# After a failed visibility extension or delete call, how long before trying again.
EXTEND_RETRY_S = 1.0
DELETE_RETRY_S = 1.0
# Longest wait of a poll with no room for records.
FULL_WAIT_S = 0.005
# Deletes that failed on SQS's side are tried again on later polls this many times.
DELETE_TRIES = 5
# SQS's longest visibility timeout (12 hours).
MAX_VISIBILITY_S = 43200


@dataclass(slots=True)
class _Held:
    """A message handed to the engine and not yet deleted."""

    message_id: str
    receipt_handle: str
    extend_at: float  # monotonic time its visibility is next extended
    delete_tries: int = 0


class SQSSource(SourceBase):
    """One consumer of an SQS queue.

    Record.source is the queue's name and Record.position a delivery counter of this source
    (a message delivered again gets a new one; `fingerprint` knows it by its messageId).
    Record.attempts is ApproximateReceiveCount - 1, so retries are counted across restarts.
    A record to retry is released (`release`): SQS waits out the backoff as the message's
    visibility timeout, then delivers it again, to this consumer or another.

    A FIFO queue is ordered: Record.key is the MessageGroupId, so the engine's lanes keep each
    group in order (`parallelization_factor` lanes), and SQS itself delivers no more of a group
    while some of it is in flight.
    """

    retryable_errors = RETRYABLE_ERRORS

    def __init__(self, mapping: EventSourceMapping, instance: int = 0) -> None:
        src = mapping.source
        if not isinstance(src, cfg.SQSSource):
            raise TypeError(f"mapping {mapping.name}: not an sqs source ({src.type})")
        if src.fifo and mapping.batch_size > FIFO_BATCH_MAX:
            raise ConnectorConfigError(
                f"mapping {mapping.name}: batch_size {mapping.batch_size} is over"
                f" {FIFO_BATCH_MAX}, the most Lambda takes from a FIFO queue"
            )
        self.mapping = mapping.name
        self.src = src
        self.queue_url = src.queue_url
        self.queue = src.queue_name
        self.capabilities = Capabilities(
            ordered=src.fifo,
            checkpoint="ack",
            pausable=False,
            stable_positions=False,
            broker_retries=True,
        )
        region = src.client_region or boto3.session.Session().region_name or ""
        # The shape, which the queue's own ARN updates on open.
        self._shape = self.shape = SQSShape(arn_of(src.queue_url, region), region)
        self._client: SQSClient | None = None
        self._visibility_s = 30
        self._positions = itertools.count(1)
        # All state is the loop thread's: the engine calls a source from that thread only.
        self._held: dict[int, _Held] = {}
        # Settled, to be deleted; a failed DeleteMessageBatch leaves them here for the next poll.
        self._to_delete: dict[int, _Held] = {}
        self._next_receive = 0.0
        self._delete_retry_at = 0.0
        self._counts: dict[str, int] = {}
        self._counts_at = float("-inf")
        self._got_at = float("-inf")
        self._wakeup = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self, listener: AssignmentListener) -> None:
        if self._client is None:
            self._client = sqs_client(self.src)
            try:
                attributes: Mapping[Any, str] = self._call(
                    lambda c: c.get_queue_attributes(
                        QueueUrl=self.queue_url, AttributeNames=["QueueArn", "VisibilityTimeout"]
                    )
                )["Attributes"]
            except BaseException:
                # Opened again after a retryable error: the queue's attributes are still needed.
                client, self._client = self._client, None
                client.close()
                raise
            self._shape.arn = attributes.get("QueueArn", self._shape.arn)
            self._visibility_s = int(attributes.get("VisibilityTimeout", 30))
            if self._visibility_s < 2:
                log.warning(
                    "mapping %s: queue %s has a visibility timeout of %ds: messages held by a"
                    " batch may be delivered again while it runs",
                    self.mapping,
                    self.queue,
                    self._visibility_s,
                )
            log.info(
                "mapping %s: sqs queue %s (%s), visibility timeout %ds",
                self.mapping,
                self.queue_url,
                "FIFO" if self.capabilities.ordered else "standard",
                self._visibility_s,
            )
        listener.on_assigned([self.queue])

    def close(self) -> None:
        """Deletes what settled and makes the messages still held visible again at once, for
        another consumer to take them (without it they wait for their visibility timeout)."""
        client = self._client
        self._wakeup.set()
        if client is None:
            return
        try:
            self._flush_deletes()
            held = [h for p, h in self._held.items() if p not in self._to_delete]
            self._change_visibility(held, 0)
        except Exception as exc:
            log.warning(
                "mapping %s: closing queue %s: %s; unsettled messages come back after their"
                " visibility timeout",
                self.mapping,
                self.queue,
                describe(exc),
            )
        if self._to_delete:
            log.warning(
                "mapping %s: %d settled messages could not be deleted; they will be delivered"
                " again",
                self.mapping,
                len(self._to_delete),
            )
        self._client = None
        self._held.clear()
        self._to_delete.clear()
        client.close()

    def wake(self) -> None:
        self._wakeup.set()

    def _call(self, call: Callable[[SQSClient], T]) -> T:
        client = self._client
        if client is None:
            raise RuntimeError("SQSSource used before open() or after close()")
        try:
            return call(client)
        except Exception as exc:
            translated = translate(exc, self.queue_url)
            if translated is exc:
                raise
            raise translated from exc

    # --- polling ---------------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        now = time.monotonic()
        if self._to_delete and now >= self._delete_retry_at:
            self._flush_deletes()
        self._extend_due(now)
        if max_records <= 0:
            # No room: the engine frees some as its lanes take batches, between polls.
            self._wait(min(timeout_s, FULL_WAIT_S))
            return []
        if self._held and now < self._next_receive:
            self._wait(min(timeout_s, self._next_receive - now))
            return []
        wait_s = IDLE_WAIT_S if not self._held and timeout_s > 0 else 0
        out: list[Record] = []
        for _ in range(RECEIVES_PER_POLL):
            want = min(BATCH_MAX, max_records - len(out))
            messages = self._receive(want, wait_s)
            out += self._records(messages)
            if len(messages) < want or len(out) >= max_records:
                break
            wait_s = 0
        now = time.monotonic()
        if out:
            self._got_at = now
        else:
            self._next_receive = now + EMPTY_PAUSE_S
        return out

    def _wait(self, timeout_s: float) -> None:
        if timeout_s > 0:
            self._wakeup.wait(timeout_s)
        self._wakeup.clear()

    def _receive(self, count: int, wait_s: int) -> list[Any]:
        request: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": count,
            "WaitTimeSeconds": wait_s,
            # "All", as written here: some SQS-compatible servers match it case-sensitively.
            "MessageSystemAttributeNames": ["All"],
            "MessageAttributeNames": ["All"],
        }
        if self.capabilities.ordered:
            # A FIFO receive that botocore retries after a lost reply gets the same messages
            # again, rather than leaving them invisible, and their groups blocked, until their
            # visibility timeout.
            request["ReceiveRequestAttemptId"] = uuid.uuid4().hex
        reply = self._call(lambda c: c.receive_message(**request))
        return list(reply.get("Messages", []))

    def _records(self, messages: Sequence[Any]) -> list[Record]:
        out: list[Record] = []
        extend_at = time.monotonic() + self._visibility_s / 2
        for message in messages:
            position = next(self._positions)
            message_id = str(message.get("MessageId", ""))
            receipt = str(message.get("ReceiptHandle", ""))
            self._held[position] = _Held(message_id, receipt, extend_at)
            meta = SQSMeta(
                message_id=message_id,
                receipt_handle=receipt,
                body=str(message.get("Body", "")),
                attributes={},
                message_attributes={},
                md5_of_body=str(message.get("MD5OfBody", "")),
                arn=self._shape.arn,
                region=self._shape.region,
                md5_of_message_attributes=message.get("MD5OfMessageAttributes"),
            )
            try:
                meta.attributes = {str(k): str(v) for k, v in message.get("Attributes", {}).items()}
                meta.message_attributes = lambda_message_attributes(
                    message.get("MessageAttributes") or {}
                )
                out.append(record_of(meta, position))
            except Exception as exc:  # no message may stop the queue: it becomes a letter
                log.error(
                    "mapping %s: message %s cannot be read (%s); it goes to the on-failure"
                    " destination",
                    self.mapping,
                    message_id,
                    describe(exc),
                )
                body = meta.body.encode("utf-8", "replace")
                out.append(undecodable(self.queue, position, body, exc, meta=meta))
        return out

    # --- visibility ------------------------------------------------------------------------------

    def _extend_due(self, now: float) -> None:
        """Extends, by the queue's visibility timeout, the messages held for half of it: a batch
        that runs long is not delivered to another consumer meanwhile (Lambda does not do this,
        and asks for a visibility timeout of six times the function's timeout instead)."""
        due = [h for p, h in self._held.items() if h.extend_at <= now and p not in self._to_delete]
        if not due:
            return
        try:
            failed = self._change_visibility(due, self._visibility_s)
        except RETRYABLE_ERRORS as exc:
            log.warning(
                "mapping %s: extending the visibility of %d messages failed (%s); retrying",
                self.mapping,
                len(due),
                describe(exc),
            )
            for held in due:
                held.extend_at = now + EXTEND_RETRY_S
            return
        for held in due:
            held.extend_at = now + self._visibility_s / 2
        for held, entry in failed:
            # No longer in flight for us (its visibility ran out and another consumer may have
            # it): nothing to extend any more; it will be delivered again.
            held.extend_at = float("inf")
            log.warning(
                "mapping %s: message %s could not be kept invisible (%s: %s); it may be"
                " delivered again",
                self.mapping,
                held.message_id,
                entry.get("Code"),
                entry.get("Message", ""),
            )

    def release(self, records: Sequence[Record], delay_s: float) -> None:
        """ChangeMessageVisibility to the retry's backoff (whole seconds, as SQS counts them):
        SQS delivers each message again once that has passed, to any consumer, one receive
        more in its ApproximateReceiveCount. The wait lives in SQS, so it survives a restart.

        On a FIFO queue only the first message of each group waits: SQS returns none of a group
        while one of it is in flight, so the rest are made visible at once and come back in
        order behind it.
        """
        timeout_s = min(MAX_VISIBILITY_S, math.ceil(max(delay_s, 0.0)))
        by_timeout: dict[int, list[_Held]] = {}
        groups: set[bytes | None] = set()
        for r in records:
            if r.position in self._to_delete:
                continue
            held = self._held.pop(r.position, None)
            if held is None:
                continue
            wait_s = timeout_s
            if self.capabilities.ordered:
                wait_s = 0 if r.key in groups else timeout_s
                groups.add(r.key)
            by_timeout.setdefault(wait_s, []).append(held)
        for wait_s, batch in by_timeout.items():
            try:
                failed = self._change_visibility(batch, wait_s)
            except RETRYABLE_ERRORS as exc:
                log.warning(
                    "mapping %s: handing %d messages back for a retry in %ds failed (%s); they"
                    " come back after the queue's visibility timeout instead",
                    self.mapping,
                    len(batch),
                    wait_s,
                    describe(exc),
                )
                continue
            for one, entry in failed:
                log.warning(
                    "mapping %s: message %s could not be handed back for a retry in %ds (%s:"
                    " %s); it comes back after its visibility timeout",
                    self.mapping,
                    one.message_id,
                    wait_s,
                    entry.get("Code"),
                    entry.get("Message", ""),
                )

    def _change_visibility(
        self, held: Sequence[_Held], timeout_s: int
    ) -> list[tuple[_Held, Mapping[str, Any]]]:
        """ChangeMessageVisibilityBatch, ten at a time; returns the entries SQS refused."""
        refused: list[tuple[_Held, Mapping[str, Any]]] = []
        for chunk in chunks(held):
            entries = [
                {"Id": str(i), "ReceiptHandle": h.receipt_handle, "VisibilityTimeout": timeout_s}
                for i, h in enumerate(chunk)
            ]
            reply = self._call(
                lambda c, e=entries: c.change_message_visibility_batch(  # type: ignore[misc]
                    QueueUrl=self.queue_url, Entries=e
                )
            )
            refused += [(chunk[int(f["Id"])], f) for f in reply.get("Failed", [])]
        return refused

    # --- checkpointing ---------------------------------------------------------------------------

    def ack(self, records: Sequence[Record]) -> None:
        """DeleteMessageBatch, ten at a time; what fails on SQS's side is tried again on the next
        polls, what SQS refuses (an expired receipt handle) is reported: it comes back."""
        for r in records:
            held = self._held.get(r.position)
            if held is not None:
                self._to_delete[r.position] = held
        self._flush_deletes()

    def _flush_deletes(self) -> None:
        pending = list(self._to_delete.items())
        if not pending or self._client is None:
            return
        for chunk in chunks(pending):
            entries = [{"Id": str(p), "ReceiptHandle": h.receipt_handle} for p, h in chunk]
            try:
                reply = self._call(
                    lambda c, e=entries: c.delete_message_batch(  # type: ignore[misc]
                        QueueUrl=self.queue_url, Entries=e
                    )
                )
            except RETRYABLE_ERRORS as exc:
                log.warning(
                    "mapping %s: deleting %d messages failed (%s); retrying",
                    self.mapping,
                    len(pending),
                    describe(exc),
                )
                self._delete_retry_at = time.monotonic() + DELETE_RETRY_S
                return
            for done in reply.get("Successful", []):
                self._forget(int(done["Id"]))
            for failed in reply.get("Failed", []):
                self._delete_failed(int(failed["Id"]), failed)

    def _delete_failed(self, position: int, failed: Mapping[str, Any]) -> None:
        held = self._to_delete[position]
        held.delete_tries += 1
        sender = bool(failed.get("SenderFault"))
        if sender or held.delete_tries >= DELETE_TRIES:
            self._forget(position)
            log.error(
                "mapping %s: message %s could not be deleted (%s: %s); it will be delivered again",
                self.mapping,
                held.message_id,
                failed.get("Code"),
                failed.get("Message", ""),
            )
        else:
            log.warning(
                "mapping %s: deleting message %s failed (%s: %s); retrying",
                self.mapping,
                held.message_id,
                failed.get("Code"),
                failed.get("Message", ""),
            )

    def _forget(self, position: int) -> None:
        self._to_delete.pop(position, None)
        self._held.pop(position, None)

    # --- state -----------------------------------------------------------------------------------

    def fingerprint(self, record: Record) -> str:
        meta = record.meta
        if isinstance(meta, SQSMeta) and meta.message_id:
            return f"{record.source}:{meta.message_id}"
        return f"{record.source}@{record.position}"

    def assignment(self) -> frozenset[str]:
        return frozenset([self.queue]) if self._client is not None else frozenset()

    def caught_up(self) -> bool:
        """Deletes done, and the queue has no message visible, delayed, or in flight other than
        ours: a message in flight elsewhere (a consumer that may die) is not idle."""
        if self._client is None or self._to_delete:
            return False
        if time.monotonic() - self._got_at < COUNTS_TTL_S:
            return False
        counts = self._queue_counts()
        if counts is None:
            return False
        visible, in_flight, delayed = (
            counts.get("ApproximateNumberOfMessages", 1),
            counts.get("ApproximateNumberOfMessagesNotVisible", 1),
            counts.get("ApproximateNumberOfMessagesDelayed", 1),
        )
        return visible == 0 and delayed == 0 and in_flight <= len(self._held)

    def lag(self) -> Mapping[str, int]:
        counts = self._queue_counts()
        if counts is None or "ApproximateNumberOfMessages" not in counts:
            return {}
        return {self.queue: counts["ApproximateNumberOfMessages"]}

    def _queue_counts(self) -> dict[str, int] | None:
        now = time.monotonic()
        if now - self._counts_at < COUNTS_TTL_S:
            return self._counts
        try:
            attributes: Mapping[Any, str] = self._call(
                lambda c: c.get_queue_attributes(
                    QueueUrl=self.queue_url,
                    AttributeNames=[
                        "ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesNotVisible",
                        "ApproximateNumberOfMessagesDelayed",
                    ],
                )
            )["Attributes"]
        except RETRYABLE_ERRORS:
            return None
        self._counts = {k: int(v) for k, v in attributes.items()}
        self._counts_at = now
        return self._counts
