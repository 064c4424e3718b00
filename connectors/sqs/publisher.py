"""Records replayed by `workers dlq` sent back onto the SQS source queue, with their message
attributes and the replay count."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from connectors.sqs import config as cfg
from connectors.sqs.client import chunks, sqs_client, translate
from connectors.sqs.letters import header_attributes, sqs_text
from workers.engine.letters import REPLAY_HEADER
from workers.engine.ports import ConnectorConfigError
from workers.engine.records import Record


class SQSSourcePublisher:
    """SendMessageBatch, ten at a time; `publish` returns once SQS took every record, raises
    otherwise. On a FIFO queue a record keeps its MessageGroupId (its key)."""

    def __init__(self, src: cfg.SQSSource) -> None:
        self.queue_url = src.queue_url
        self.fifo = src.fifo
        self._client = sqs_client(src)

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        entries = [self._entry(i, r, replay_count) for i, r in enumerate(records)]
        for chunk in chunks(entries):
            try:
                reply = self._client.send_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=chunk,  # type: ignore[arg-type]  # built as plain dicts
                )
            except Exception as exc:
                translated = translate(exc, self.queue_url)
                if translated is exc:
                    raise
                raise translated from exc
            failed = reply.get("Failed", [])
            if failed:
                first = failed[0]
                raise RuntimeError(
                    f"queue {self.queue_url}: {len(failed)} replayed records were refused"
                    f" ({first.get('Code')}: {first.get('Message', '')})"
                )

    def _entry(self, index: int, record: Record, replay_count: int) -> dict[str, Any]:
        try:
            body = record.value.decode("utf-8")
        except UnicodeDecodeError:
            body = ""
        if not body or not sqs_text(body):
            raise ConnectorConfigError(
                f"record {record.source}@{record.position} cannot be an SQS message body: it is"
                " empty or not text SQS takes"
            )
        headers = [(n, v) for n, v in record.headers if n != REPLAY_HEADER]
        attributes = header_attributes(headers)
        attributes[REPLAY_HEADER] = {"DataType": "Number", "StringValue": str(replay_count)}
        entry: dict[str, Any] = {
            "Id": str(index),
            "MessageBody": body,
            "MessageAttributes": attributes,
        }
        if self.fifo:
            group = record.key.decode("utf-8", "replace") if record.key else "esm-replay"
            entry["MessageGroupId"] = group[:128]
            entry["MessageDeduplicationId"] = uuid.uuid4().hex
        return entry

    def close(self) -> None:
        self._client.close()
