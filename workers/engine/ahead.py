"""A lane's next batch, taken while the current one runs, so that an environment in another
process can go from one batch to the next without a round trip through the poller.

With process isolation the poller packs the next batch while the environment runs the current
one, and hands it over with it (`Staged`). The environment starts it the moment the current
invocation ends, if that one succeeded wholly (`whole_success`); otherwise it drops it, and the
runner invokes those records in the usual way once the current batch settled (retries, bisect
and dead letters first, so order per partition and per key holds). Only a batch that needs no
decision before its invocation is staged: no record at fault, redelivered, too large or too old.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.engine.clock import Clock
from workers.engine.invoker import InvocationRequest, PackedEvent, Staged, new_request_id
from workers.engine.ports import PackingShape
from workers.engine.records import Record
from workers.engine.work import any_fault, max_attempts, too_large, too_old


class Lookahead:
    """One lane's next batch (`records`), and its invocation once an environment started it
    (`running`). Only the lane's thread uses it."""

    __slots__ = ("_take", "records", "running")

    def __init__(self, take: Callable[[], list[Record] | None]) -> None:
        self._take = take
        self.records: list[Record] | None = None
        self.running: Staged | None = None

    def next(self) -> list[Record] | None:
        """The lane's next batch, taken now if it is ready and none is taken yet."""
        if self.records is None:
            self.records = self._take()
        return self.records

    def pop(self) -> tuple[list[Record] | None, Staged | None]:
        records, running = self.records, self.running
        self.records = self.running = None
        return records, running


def stage(
    records: list[Record] | None,
    shape: PackingShape,
    *,
    mapping: str,
    report_item_failures: bool,
    maximum_batch_bytes: int,
    maximum_record_age_s: float,
    clock: Clock,
) -> Staged | None:
    """`records` packed for an environment to start after the current invocation, or None if
    the runner must look at them first."""
    if not records or any_fault(records) or max_attempts(records):
        return None
    if too_large(records, maximum_batch_bytes):
        return None
    if too_old(records, maximum_record_age_s, clock.wall_ms()):
        return None
    event = PackedEvent(shape.unpacker, shape.pack(records))
    request = InvocationRequest(request_id=new_request_id(), mapping_name=mapping, attempt=1)
    return Staged(event, request, report_item_failures)
