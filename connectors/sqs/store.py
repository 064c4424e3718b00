"""The SQS dead-letter queue read back for `workers dlq`: letters received and held invisible
until replayed (then deleted), made visible again otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connectors.sqs import config as cfg
from connectors.sqs.client import BATCH_MAX, chunks, log, sqs_client, translate
from connectors.sqs.letters import SENT_NS_ATTRIBUTE
from workers.engine.letters import MAPPING_LABEL, belongs_to, parse_letter
from workers.engine.ports import StoredLetter
from workers.engine.shapes import int_or_none

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# How long a received letter stays invisible, and when (half of it) the store extends it.
HOLD_S = 300
# Empty long polls (1 s each) that end the reading of the queue.
EMPTY_RECEIVES = 2


@dataclass(slots=True)
class _Message:
    receipt_handle: str
    message_id: str
    order: tuple[int, int]


class SQSDeadLetterStore:
    """`pending()` first receives every message the queue holds when called (as many as it
    counted), holding them invisible, and offers this mapping's letters oldest first (by
    SentTimestamp, then the sender's `esm-sent-ns`): a letter written meanwhile is not offered.
    `done()` deletes a letter; `close()` makes the ones still held visible again at once, so
    listing changes nothing but their receive counts (on a dead-letter queue with a redrive
    policy of its own, reading letters often enough moves them on)."""

    def __init__(self, dst: cfg.SQSDestination, mapping: EventSourceMapping) -> None:
        self.queue_url = dst.queue_url
        self.mapping = mapping.name
        self._client = sqs_client(dst)
        self._held: dict[str, _Message] = {}  # by receipt handle
        self._extend_at = float("inf")

    def pending(self) -> Iterator[StoredLetter]:
        self._release()
        messages = self._receive_all()
        letters: list[tuple[tuple[int, int], StoredLetter]] = []
        for message in messages:
            attributes = message.get("MessageAttributes") or {}
            label = (attributes.get(MAPPING_LABEL) or {}).get("StringValue")
            body = str(message.get("Body", ""))
            letter, problem = parse_letter(body.encode("utf-8", "surrogatepass"))
            held = self._held[message["ReceiptHandle"]]
            if letter is None:
                log.warning(
                    "mapping %s: queue %s: message %s skipped, not a dead letter: %s",
                    self.mapping,
                    self.queue_url,
                    held.message_id,
                    problem,
                )
                continue
            if not belongs_to(self.mapping, label, letter):
                continue
            letter_id = str(letter["requestContext"]["requestId"])
            letters.append((held.order, StoredLetter(letter_id, letter, handle=held)))
        letters.sort(key=lambda pair: pair[0])
        for _, stored in letters:
            self._keep_held()
            yield stored

    def _receive_all(self) -> list[Any]:
        counted = self._visible()
        out: list[Any] = []
        empty = 0
        while len(out) < counted and empty < EMPTY_RECEIVES:
            want = min(BATCH_MAX, counted - len(out))
            reply = self._call(
                lambda want=want: self._client.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=want,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=HOLD_S,
                    MessageSystemAttributeNames=["SentTimestamp"],
                    MessageAttributeNames=["All"],
                )
            )
            got = reply.get("Messages", [])
            empty = 0 if got else empty + 1
            for message in got:
                attributes = message.get("Attributes") or {}
                sent_ns = (message.get("MessageAttributes") or {}).get(SENT_NS_ATTRIBUTE) or {}
                order = (
                    int_or_none(attributes.get("SentTimestamp")) or 0,
                    int_or_none(sent_ns.get("StringValue")) or 0,
                )
                receipt = message["ReceiptHandle"]
                self._held[receipt] = _Message(receipt, message.get("MessageId", ""), order)
            out += got
        self._extend_at = time.monotonic() + HOLD_S / 2
        return out

    def done(self, stored: StoredLetter) -> None:
        held = stored.handle
        if not isinstance(held, _Message) or held.receipt_handle not in self._held:
            raise RuntimeError(f"letter {stored.id} is not held by this reader of the queue")
        self._call(
            lambda: self._client.delete_message(
                QueueUrl=self.queue_url, ReceiptHandle=held.receipt_handle
            )
        )
        del self._held[held.receipt_handle]

    def close(self) -> None:
        try:
            self._release()
        finally:
            self._client.close()

    def _keep_held(self) -> None:
        """Extends the letters still held, once half their invisibility has passed."""
        if time.monotonic() < self._extend_at or not self._held:
            return
        self._change_visibility(list(self._held.values()), HOLD_S)
        self._extend_at = time.monotonic() + HOLD_S / 2

    def _release(self) -> None:
        held, self._held = list(self._held.values()), {}
        if held:
            self._change_visibility(held, 0)

    def _change_visibility(self, held: Sequence[_Message], timeout_s: int) -> None:
        for chunk in chunks(held):
            entries = [
                {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": timeout_s}
                for i, m in enumerate(chunk)
            ]
            reply = self._call(
                lambda e=entries: self._client.change_message_visibility_batch(
                    QueueUrl=self.queue_url, Entries=e
                )
            )
            for failed in reply.get("Failed", []):
                log.warning(
                    "mapping %s: queue %s: the visibility of message %s could not be changed"
                    " (%s); it comes back after its visibility timeout",
                    self.mapping,
                    self.queue_url,
                    chunk[int(failed["Id"])].message_id,
                    failed.get("Code"),
                )

    def _visible(self) -> int:
        """ApproximateNumberOfMessages: the letters ready to be read now."""
        reply = self._call(
            lambda: self._client.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )
        )
        return int(reply["Attributes"].get("ApproximateNumberOfMessages", "0"))

    def _call(self, call: Any) -> Any:
        try:
            return call()
        except Exception as exc:
            translated = translate(exc, self.queue_url)
            if translated is exc:
                raise
            raise translated from exc
