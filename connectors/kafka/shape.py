"""Lambda's Kafka events (self-managed Kafka and Amazon MSK), built from engine records and read
back from one."""

from __future__ import annotations

import base64
import binascii
import marshal
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from workers.engine.letters import iso_ms
from workers.engine.records import Record
from workers.engine.shapes import decoded as _decoded
from workers.engine.shapes import encoded_size
from workers.engine.shapes import int_or_none as _int_or_none

_b64 = base64.b64encode

_b2a = binascii.b2a_base64


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


TIMESTAMP_TYPES = {0: "NO_TIMESTAMP_TYPE", 1: "CREATE_TIME", 2: "LOG_APPEND_TIME"}

# The `eventSource` of each of Lambda's Kafka events.
SELF_MANAGED = "SelfManagedKafka"
MSK = "aws:kafka"


@dataclass(frozen=True, slots=True)
class KafkaMeta:
    topic: str
    partition: int
    timestamp_type: str = "CREATE_TIME"


def kafka_item(
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    timestamp_type: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, bytes]],
) -> dict[str, Any]:
    """One record of Lambda's Kafka event; the connector calls it once per message it reads.

    One dict literal per case: building the dict at its final size is the cheapest way CPython
    has, and this runs for every record.
    """
    encoded = _b2a(value, newline=False).decode()
    listed = [{name: list(data)} for name, data in headers] if headers else []
    if key is None:
        return {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "timestamp": timestamp_ms,
            "timestampType": timestamp_type,
            "value": encoded,
            "headers": listed,
        }
    return {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": timestamp_ms,
        "timestampType": timestamp_type,
        "key": _b2a(key, newline=False).decode(),
        "value": encoded,
        "headers": listed,
    }


def unpack_event(payload: bytes) -> dict[str, Any]:
    """The event `KafkaShape.pack` packed, built where the handler runs."""
    bootstrap_servers, event_source_arn, groups = marshal.loads(payload)
    item = kafka_item
    by_partition: dict[str, list[dict[str, Any]]] = {}
    for unit, topic, partition, ts_type, offsets, timestamps, keys, values, headers in groups:
        items = by_partition.get(unit)
        if items is None:
            items = by_partition[unit] = []
        items.extend(
            map(
                item,
                repeat(topic),
                repeat(partition),
                offsets,
                timestamps,
                repeat(ts_type),
                keys,
                values,
                headers,
            )
        )
    return _event(bootstrap_servers, event_source_arn, by_partition)


def _event(
    bootstrap_servers: str, event_source_arn: str | None, records: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    if event_source_arn is not None:
        return {
            "eventSource": MSK,
            "eventSourceArn": event_source_arn,
            "bootstrapServers": bootstrap_servers,
            "records": records,
        }
    return {"eventSource": SELF_MANAGED, "bootstrapServers": bootstrap_servers, "records": records}


class KafkaShape:
    """Lambda's Kafka event: self-managed Kafka's (`"eventSource": "SelfManagedKafka"`), or with
    a cluster ARN, Amazon MSK's (`"eventSource": "aws:kafka"`, `"eventSourceArn"`). Both carry
    the same records; MSK's adds the ARN between the source and the bootstrap servers.

    https://docs.aws.amazon.com/lambda/latest/dg/with-kafka.html
    https://docs.aws.amazon.com/lambda/latest/dg/with-msk.html
    """

    batch_info_name = "KafkaBatchInfo"

    def __init__(self, bootstrap_servers: str, event_source_arn: str | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.event_source_arn = event_source_arn

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        # The hot path of every invocation under thread isolation. Built anew each time: a
        # handler in a thread gets the event itself, and what it changes must not reach a retry.
        by_partition: dict[str, list[dict[str, Any]]] = {}
        item = kafka_item
        for r in records:
            meta: KafkaMeta = r.meta
            items = by_partition.get(r.source)
            if items is None:
                items = by_partition[r.source] = []
            items.append(
                item(
                    meta.topic,
                    meta.partition,
                    r.position,
                    r.timestamp_ms,
                    meta.timestamp_type,
                    r.key,
                    r.value,
                    r.headers,
                )
            )
        return _event(self.bootstrap_servers, self.event_source_arn, by_partition)

    unpacker = "connectors.kafka.shape:unpack_event"

    def pack(self, records: Sequence[Record]) -> bytes:
        """The batch as columns per partition, in record order (see `unpack_event`)."""
        metas = [r.meta for r in records]
        if metas and metas.count(metas[0]) == len(metas):
            # One partition and timestamp type, as in every batch the poller makes: a column each.
            meta: KafkaMeta = metas[0]
            single = (
                records[0].source,
                meta.topic,
                meta.partition,
                meta.timestamp_type,
                [r.position for r in records],
                [r.timestamp_ms for r in records],
                [r.key for r in records],
                [r.value for r in records],
                [r.headers for r in records],
            )
            return marshal.dumps((self.bootstrap_servers, self.event_source_arn, [single]))
        # Runs of one partition and timestamp type, each a group, in record order.
        groups: list[tuple[Any, ...]] = []
        group: tuple[Any, ...] = ()
        last: KafkaMeta | None = None
        for r, meta in zip(records, metas, strict=True):
            if meta is not last:
                last = meta
                group = (
                    r.source,
                    meta.topic,
                    meta.partition,
                    meta.timestamp_type,
                    [],
                    [],
                    [],
                    [],
                    [],
                )
                groups.append(group)
            group[4].append(r.position)
            group[5].append(r.timestamp_ms)
            group[6].append(r.key)
            group[7].append(r.value)
            group[8].append(r.headers)
        return marshal.dumps((self.bootstrap_servers, self.event_source_arn, groups))

    def records(self, event: dict[str, Any]) -> list[Record]:
        out = []
        for unit, items in event.get("records", {}).items():
            for item in items:
                key = _unb64(item["key"]) if item.get("key") is not None else None
                value = _unb64(item.get("value") or "")
                headers = [
                    (name, bytes(v)) for h in item.get("headers", []) for name, v in h.items()
                ]
                out.append(
                    Record(
                        source=unit,
                        position=int(item["offset"]),
                        value=value,
                        key=key,
                        timestamp_ms=int(item.get("timestamp", 0)),
                        headers=headers,
                        size=encoded_size(value, key, sum(len(v) for _, v in headers)),
                        meta=KafkaMeta(
                            item["topic"],
                            int(item["partition"]),
                            item.get("timestampType", "CREATE_TIME"),
                        ),
                    )
                )
        return out

    def item_key(self, record: Record) -> Hashable:
        return record.ident

    def item_identifier(self, record: Record) -> dict[str, Any]:
        return {"partition": record.source, "offset": record.position}

    def parse_item(self, identifier: Any) -> Hashable | None:
        if not isinstance(identifier, dict):
            return None
        partition = identifier.get("partition")
        offset = _int_or_none(identifier.get("offset"))
        if not isinstance(partition, str) or not partition or offset is None:
            return None
        return (partition, offset)

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        info: dict[str, dict[str, str]] = {}
        for r in records:
            entry = info.get(r.source)
            if entry is None:
                info[r.source] = {
                    "firstRecordOffset": str(r.position),
                    "lastRecordOffset": str(r.position),
                    "firstRecordTimestamp": iso_ms(r.timestamp_ms),
                    "lastRecordTimestamp": iso_ms(r.timestamp_ms),
                }
            else:
                entry["lastRecordOffset"] = str(r.position)
                entry["lastRecordTimestamp"] = iso_ms(r.timestamp_ms)
        return {"bootstrapServers": self.bootstrap_servers, "recordsInfo": info}

    def filter_view(self, record: Record) -> dict[str, Any]:
        meta: KafkaMeta = record.meta
        return {
            "topic": meta.topic,
            "partition": meta.partition,
            "offset": record.position,
            "timestamp": record.timestamp_ms,
            "timestampType": meta.timestamp_type,
            "key": None if record.key is None else record.key.decode("utf-8", "replace"),
            "value": _decoded(record.value),
            "headers": [{name: _decoded(value)} for name, value in record.headers],
        }
