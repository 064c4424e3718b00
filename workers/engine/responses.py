"""Reading a handler's return value the way Lambda reads `ReportBatchItemFailures` responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.engine.outcomes import ErrorInfo, InvalidResponse, PartialFailure, Success
from workers.engine.ports import EventShape
from workers.engine.records import Record


def interpret(
    response: Any, records: Sequence[Record], shape: EventShape, report_item_failures: bool
) -> Success | PartialFailure | InvalidResponse:
    """Read a handler's return value the way Lambda reads `ReportBatchItemFailures` responses.

    Success: no response, an object without `batchItemFailures`, or an empty/null list.
    Failure of the whole batch: anything else that is not a list of entries whose
    `itemIdentifier` names a record of this batch (an unknown, empty or malformed identifier).
    https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-errorhandling.html
    """
    if whole_success(response, report_item_failures):
        return Success(response)
    if not isinstance(response, dict):
        return _invalid(f"expected an object with batchItemFailures, got {type(response).__name__}")
    items = response.get("batchItemFailures")
    if not isinstance(items, list):
        return _invalid("batchItemFailures must be a list")
    by_key = {shape.item_key(r): r for r in records}
    failed: set[tuple[str, int]] = set()
    for item in items:
        ident = item.get("itemIdentifier") if isinstance(item, dict) else None
        key = shape.parse_item(ident) if ident not in (None, "", {}) else None
        record = by_key.get(key) if key is not None else None
        if record is None:
            return _invalid(f"batchItemFailures names no record of this batch: {item!r:.200}")
        failed.add(record.ident)
    return PartialFailure(frozenset(failed))


def whole_success(response: Any, report_item_failures: bool) -> bool:
    """True if a handler's return value says every record of its batch succeeded: `interpret`
    gives Success for exactly these (an environment that starts the next batch on its own, see
    `workers.engine.invoker.Staged`, decides with this too)."""
    if not report_item_failures or response is None:
        return True
    if not isinstance(response, dict):
        return False
    items = response.get("batchItemFailures")
    return items is None or items == []


def ignores_item_failures(response: Any, report_item_failures: bool) -> bool:
    """True if `response` names failed records that the mapping ignores, as Lambda does when
    `ReportBatchItemFailures` is not among the mapping's function response types."""
    return (
        not report_item_failures
        and isinstance(response, dict)
        and bool(response.get("batchItemFailures"))
    )


def _invalid(message: str) -> InvalidResponse:
    return InvalidResponse(ErrorInfo("InvalidBatchResponse", message))
