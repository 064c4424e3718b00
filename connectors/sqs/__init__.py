"""Amazon SQS queues (and SQS-compatible servers), through boto3."""

from __future__ import annotations

from typing import Any

from connectors.sqs import config
from connectors.sqs.shape import EVENT_SOURCE, SQSShape
from workers.engine.ports import Connector, lazy


def _shape(event: dict[str, Any]) -> SQSShape:
    records = event.get("Records") or [{}]
    first = records[0] if isinstance(records[0], dict) else {}
    return SQSShape(str(first.get("eventSourceARN", "")), str(first.get("awsRegion", "")))


CONNECTOR = Connector(
    name="sqs",
    source_settings=config.SQSSource,
    destination_settings=config.SQSDestination,
    event_sources=(EVENT_SOURCE,),
    shape_for_event=_shape,
    open_source=lazy("connectors.sqs.source", "SQSSource"),
    open_destination=lazy("connectors.sqs.destination", "SQSDestination"),
    open_store=lazy("connectors.sqs.store", "SQSDeadLetterStore"),
    open_publisher=lazy("connectors.sqs.publisher", "SQSSourcePublisher"),
    probe_source=lazy("connectors.sqs.probe", "probe_sqs"),
    probe_destination=lazy("connectors.sqs.probe", "probe_destination"),
)
