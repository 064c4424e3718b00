"""The `aws:sqs` event, exactly as Lambda shapes it, built from engine records and read back
from one. https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.engine.letters import iso_ms
from workers.engine.records import Record
from workers.engine.shapes import RECORD_OVERHEAD_BYTES, int_or_none
from workers.engine.shapes import decoded as _decoded

EVENT_SOURCE = "aws:sqs"
# Bytes the attributes, the ARN and the region add to a record in the event, beyond its body,
# receipt handle and message attributes.
_ITEM_BYTES = 400


def queue_of_arn(arn: str) -> str:
    """The queue name an ARN (arn:aws:sqs:REGION:ACCOUNT:NAME) ends in."""
    return arn.rsplit(":", 1)[-1]


def lambda_message_attributes(api: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Message attributes as ReceiveMessage returns them (boto3: `StringValue`, `BinaryValue` as
    bytes, ...) in the form of Lambda's event: `stringValue`, `binaryValue` in base64, both list
    fields always present, `dataType`."""
    out: dict[str, dict[str, Any]] = {}
    for name, attribute in api.items():
        item: dict[str, Any] = {}
        if "StringValue" in attribute:
            item["stringValue"] = attribute["StringValue"]
        if "BinaryValue" in attribute:
            item["binaryValue"] = base64.b64encode(attribute["BinaryValue"]).decode()
        item["stringListValues"] = list(attribute.get("StringListValues") or [])
        item["binaryListValues"] = [
            base64.b64encode(v).decode() for v in attribute.get("BinaryListValues") or []
        ]
        item["dataType"] = attribute.get("DataType", "String")
        out[name] = item
    return out


def attribute_bytes(attribute: Mapping[str, Any]) -> bytes:
    """A Lambda-form message attribute's value as a record header holds it: a binary one's bytes,
    otherwise its string value as UTF-8."""
    binary = attribute.get("binaryValue")
    if isinstance(binary, str):
        try:
            return base64.b64decode(binary, validate=True)
        except binascii.Error:
            return binary.encode()
    text = attribute.get("stringValue")
    return text.encode() if isinstance(text, str) else b""


def _copy_attributes(attributes: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            **a,
            "stringListValues": list(a.get("stringListValues", ())),
            "binaryListValues": list(a.get("binaryListValues", ())),
        }
        for name, a in attributes.items()
    }


@dataclass(slots=True)  # not frozen: one per record
class SQSMeta:
    message_id: str
    receipt_handle: str
    body: str
    # System attributes (ApproximateReceiveCount, SentTimestamp, MessageGroupId, ...).
    attributes: dict[str, str]
    # In Lambda's form (`lambda_message_attributes`).
    message_attributes: dict[str, dict[str, Any]]
    md5_of_body: str
    arn: str
    region: str
    md5_of_message_attributes: str | None = None


def sqs_item(meta: SQSMeta) -> dict[str, Any]:
    """One record of the event; nothing in it is shared with `meta`."""
    item: dict[str, Any] = {
        "messageId": meta.message_id,
        "receiptHandle": meta.receipt_handle,
        "body": meta.body,
        "attributes": dict(meta.attributes),
        "messageAttributes": _copy_attributes(meta.message_attributes),
        "md5OfBody": meta.md5_of_body,
    }
    if meta.md5_of_message_attributes is not None:
        item["md5OfMessageAttributes"] = meta.md5_of_message_attributes
    item["eventSource"] = EVENT_SOURCE
    item["eventSourceARN"] = meta.arn
    item["awsRegion"] = meta.region
    return item


def record_of(meta: SQSMeta, position: int) -> Record:
    """The engine record of a message: its body as the value, MessageGroupId (FIFO) as the key,
    message attributes as headers, SentTimestamp as the timestamp."""
    value = meta.body.encode("utf-8", "surrogatepass")
    group = meta.attributes.get("MessageGroupId")
    received = int_or_none(meta.attributes.get("ApproximateReceiveCount")) or 1
    headers = [(name, attribute_bytes(a)) for name, a in meta.message_attributes.items()]
    extra = sum(len(n) + len(v) + 80 for n, v in headers)
    return Record(
        source=queue_of_arn(meta.arn),
        position=position,
        value=value,
        key=group.encode() if group is not None else None,
        timestamp_ms=int_or_none(meta.attributes.get("SentTimestamp")) or 0,
        headers=headers,
        attempts=received - 1,
        redelivered=received > 1,
        size=len(value) + len(meta.receipt_handle) + extra + _ITEM_BYTES + RECORD_OVERHEAD_BYTES,
        meta=meta,
    )


class SQSShape:
    """Lambda's SQS event: `{"Records": [...]}`, each with `eventSource: aws:sqs`; a handler
    reports failures as `batchItemFailures` with `itemIdentifier` = `messageId`."""

    batch_info_name = "SQSBatchInfo"

    def __init__(self, arn: str, region: str) -> None:
        self.arn = arn
        self.region = region

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        return {"Records": [sqs_item(r.meta) for r in records]}

    def ordered(self, records: Sequence[Record]) -> bool:
        """Records of a FIFO queue (their MessageGroupId is their key) keep their group's order;
        a standard queue's have none to keep."""
        return any(r.key is not None for r in records)

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for position, item in enumerate(event.get("Records") or ()):
            meta = SQSMeta(
                message_id=str(item.get("messageId", "")),
                receipt_handle=str(item.get("receiptHandle", "")),
                body=str(item.get("body", "")),
                attributes={str(k): str(v) for k, v in (item.get("attributes") or {}).items()},
                message_attributes=_copy_attributes(item.get("messageAttributes") or {}),
                md5_of_body=str(item.get("md5OfBody", "")),
                arn=str(item.get("eventSourceARN", self.arn)),
                region=str(item.get("awsRegion", self.region)),
                md5_of_message_attributes=item.get("md5OfMessageAttributes"),
            )
            out.append(record_of(meta, position))
        return out

    def item_key(self, record: Record) -> Hashable:
        meta: SQSMeta = record.meta
        return meta.message_id

    def item_identifier(self, record: Record) -> str:
        meta: SQSMeta = record.meta
        return meta.message_id

    def parse_item(self, identifier: Any) -> Hashable | None:
        return identifier if isinstance(identifier, str) and identifier else None

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        metas: list[SQSMeta] = [r.meta for r in records]
        stamps = [r.timestamp_ms for r in records]
        return {
            "eventSourceARN": metas[0].arn if metas else self.arn,
            "batchSize": len(records),
            "firstMessageId": metas[0].message_id if metas else None,
            "lastMessageId": metas[-1].message_id if metas else None,
            "firstRecordSentTimestamp": iso_ms(min(stamps)) if stamps else None,
            "lastRecordSentTimestamp": iso_ms(max(stamps)) if stamps else None,
        }

    def filter_view(self, record: Record) -> dict[str, Any]:
        # Lambda matches SQS filter patterns against the record, its body parsed when it is JSON.
        # https://docs.aws.amazon.com/lambda/latest/dg/with-sqs-filtering.html
        item = sqs_item(record.meta)
        item["body"] = _decoded(record.value)
        return item
