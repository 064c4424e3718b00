"""Handlers for the kombu integration tests, written as for Lambda's SQS event source with
Powertools' `BatchProcessor(EventType.SQS)`; they report what they saw through files.

KOMBU_OUT: file that gets one line per record body handled. KOMBU_FAIL: comma-separated bodies
whose records the handler fails through `batchItemFailures`.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

processor = BatchProcessor(event_type=EventType.SQS)


def _append(text: str) -> None:
    # One write per call with O_APPEND: lines from concurrent environments never interleave.
    fd = os.open(os.environ["KOMBU_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _record(record: SQSRecord) -> None:
    fail = set(filter(None, os.environ.get("KOMBU_FAIL", "").split(",")))
    if record.body in fail:
        raise ValueError(f"failing {record.body}")
    _append(f"{record.body}\n")


def partial(event: dict[str, Any], context: Any) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=_record, processor=processor, context=context
    )
