"""Dead letters sent to an SQS queue: the letter as the body, its `esm-*` labels as message
attributes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from connectors.sqs import config as cfg
from connectors.sqs.client import log, sqs_client, translate
from connectors.sqs.letters import letter_attributes, letter_body
from workers.engine.ports import LetterTooLarge
from workers.engine.records import Record

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# Bytes kept free below the queue's MaximumMessageSize for the message attributes.
ATTRIBUTES_ROOM = 1024
# How long the destination trusts the MaximumMessageSize it read.
LIMIT_READ_EVERY_S = 300.0
# What SQS answers for a message over the queue's size limit.
_TOO_LONG = {"InvalidParameterValue", "MessageTooLong", "InvalidMessageContents"}


class SQSDestination:
    """SendMessage of each letter; on a FIFO queue in one group per mapping, deduplicated by the
    letter's request id, so a letter sent again after a lost reply is stored once."""

    def __init__(self, dst: cfg.SQSDestination, mapping: EventSourceMapping) -> None:
        self.queue_url = dst.queue_url
        self.fifo = dst.fifo
        self.mapping = mapping.name
        self._client = sqs_client(dst)
        self._limit: int | None = None
        self._limit_read_at: float | None = None
        log.info("mapping %s: dead letters to sqs queue %s", self.mapping, self.queue_url)

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        body = letter_body(letter)
        request: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": body,
            "MessageAttributes": letter_attributes(letter, self.mapping),
        }
        if self.fifo:
            request["MessageGroupId"] = self.mapping
            request["MessageDeduplicationId"] = str(letter["requestContext"]["requestId"])[:128]
        try:
            self._client.send_message(**request)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _TOO_LONG and len(body.encode()) > (self.max_letter_bytes() or 0):
                raise LetterTooLarge(
                    f"queue {self.queue_url}: {exc}", self.max_letter_bytes()
                ) from None
            translated = translate(exc, self.queue_url)
            if translated is exc:
                raise
            raise translated from exc

    def max_letter_bytes(self) -> int | None:
        """The queue's MaximumMessageSize, less room for the attributes."""
        now = time.monotonic()
        if self._limit_read_at is None or now - self._limit_read_at >= LIMIT_READ_EVERY_S:
            self._limit_read_at = now
            try:
                attributes = self._client.get_queue_attributes(
                    QueueUrl=self.queue_url, AttributeNames=["MaximumMessageSize"]
                )["Attributes"]
                self._limit = int(attributes["MaximumMessageSize"]) - ATTRIBUTES_ROOM
            except Exception as exc:
                log.info(
                    "mapping %s: the size limit of queue %s is not readable (%s); letters are"
                    " sized by its refusals",
                    self.mapping,
                    self.queue_url,
                    exc,
                )
                self._limit = None
        return self._limit

    def close(self) -> None:
        self._client.close()
