"""Lambda's failure semantics for one batch: retries, bisect, partial responses, record age.

`BatchRunner.run` takes a batch from first invocation to settlement: every record ends either
succeeded or dead-lettered (or dropped), each exactly once, unless the runner is stopped, in which
case the unsettled records are left for the broker to deliver again. On a source whose broker
takes records back (`Capabilities.broker_retries`), a record to retry, or one exhausted with no
on-failure destination, is instead handed back to the broker (`release`), once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from workers.engine.ahead import Lookahead, stage
from workers.engine.backoff import Backoff
from workers.engine.clock import Clock, iso_ms
from workers.engine.flight import MAX_DEATHS, POLLER_DIED_ERROR_TYPE, Gate, InFlightFile, Suspects
from workers.engine.invoker import (
    InvocationRequest,
    Invoker,
    PackedEvent,
    PackingInvoker,
    Staged,
    StagingInvoker,
    new_request_id,
)
from workers.engine.letters import Condition, DeadLetters
from workers.engine.outcomes import (
    Crash,
    ErrorInfo,
    FunctionError,
    InvalidResponse,
    InvokeResult,
    Outcome,
    PartialFailure,
    RetryLater,
    Success,
    Throttling,
    Timeout,
)
from workers.engine.ports import EventShape, PackingShape
from workers.engine.records import Record
from workers.engine.responses import ignores_item_failures, interpret
from workers.engine.stalls import Retrying, error_json
from workers.engine.stats import MappingStats
from workers.engine.valve import Valve
from workers.engine.work import (
    Work,
    any_fault,
    broker_delay,
    hand_back,
    hand_back_later,
    max_attempts,
    too_large,
    too_old,
    without,
)

log = logging.getLogger("workers.policy")

PARTIAL_FAILURE_ERROR = ErrorInfo(
    "BatchItemFailure", "the handler reported this record in batchItemFailures"
)


@dataclass(frozen=True, slots=True)
class Policy:
    """A mapping's failure settings, named after Lambda's parameters."""

    maximum_retry_attempts: int = -1  # -1: until success or record age
    bisect_batch_on_function_error: bool = False
    maximum_record_age_s: float = -1  # -1: no limit
    report_batch_item_failures: bool = False
    maximum_batch_bytes: int = 6 * 1024 * 1024
    retry_backoff_base_s: float = 0.5
    retry_backoff_cap_s: float = 30.0

    def exhausted(self, retries: int) -> bool:
        return 0 <= self.maximum_retry_attempts < retries


class BatchRunner:
    """Runs batches of one mapping to settlement. Thread-safe: one instance serves all lanes."""

    def __init__(
        self,
        *,
        mapping: str,
        function: str,
        policy: Policy,
        invoker: Invoker,
        shape: EventShape,
        ordered: bool,
        dead_letters: DeadLetters,
        settle: Callable[[Sequence[Record]], None],
        clock: Clock,
        stats: MappingStats,
        suspects: Suspects | None = None,
        in_flight: InFlightFile | None = None,
        retrying: Retrying | None = None,
        valve: Valve | None = None,
        release: Callable[[Sequence[Record], float], None] | None = None,
    ) -> None:
        self.mapping = mapping
        self.function = function
        self.policy = policy
        self.invoker = invoker
        self.shape = shape
        # Environments in other processes get the batch packed, and build its event there.
        packs = isinstance(shape, PackingShape) and isinstance(invoker, PackingInvoker)
        self._packing: tuple[PackingShape, PackingInvoker] | None = (
            (shape, invoker) if packs else None  # type: ignore[assignment]
        )
        self.ordered = ordered
        self.dead_letters = dead_letters
        self.settle = settle
        self.clock = clock
        self.stats = stats
        self.suspects = suspects if suspects else None
        self.in_flight = in_flight
        self.retrying = retrying or Retrying()
        # Disabled mappings and throttled handlers (workers.Throttled) hold invocations here.
        self.valve = valve or Valve(clock)
        # Set for a source with `broker_retries`: hands records back to the broker (any thread).
        self.release = release
        # Only a poller that has suspects needs to keep their invocations apart.
        self._gate = Gate() if self.suspects is not None else None
        # Environments in other processes take a lane's next batch along with the current one
        # (workers.engine.ahead); not beside suspects, nor where the broker takes records back.
        stages = packs and isinstance(invoker, StagingInvoker) and not (self._gate or release)
        self.stager: StagingInvoker | None = invoker if stages else None  # type: ignore[assignment]
        self._warned_ignored = False
        self._warn_lock = threading.Lock()

    def run(
        self,
        records: list[Record],
        stop: threading.Event,
        ahead: Lookahead | None = None,
        running: Staged | None = None,
    ) -> bool:
        """Invoke until every record settled; False if `stop` cut it short (some left unsettled).

        `ahead` holds the lane's next batch, if this runner stages it (`stager`); `running` is
        the invocation of `records` that an environment started on its own, to collect.
        """
        queue = deque(self._plan(records))
        if running is not None:
            queue[0].staged = running  # staged records are plain: the plan is the one batch
        while queue:
            work = queue.popleft()
            try:
                if not self._run_one(work, queue, stop, ahead):
                    return False
            finally:
                self.retrying.done(work)
            if work.handed_back and self.ordered:
                hand_back_later(self.release, queue, work.handed_back)
        return True

    def _plan(self, records: list[Record]) -> list[Work]:
        """The batch as work in record order: records that cannot become an event and records
        pollers died on too often to be dead-lettered, suspects to run alone, the rest together."""
        suspects = self.suspects
        if suspects is None and not any_fault(records):
            prior = max_attempts(records)
            return [Work(records, retries=prior, invocations=prior)]
        plan: list[Work] = []
        run: list[Record] = []

        def flush() -> None:
            if run:
                prior = max_attempts(run)
                plan.append(Work(list(run), retries=prior, invocations=prior))
                run.clear()

        for r in records:
            deaths = 0 if suspects is None else suspects.deaths(r)
            if r.fault is None and deaths == 0:
                run.append(r)
                continue
            flush()
            if r.fault is not None:
                doomed = (Condition.INVALID_RECORD, r.fault)
                plan.append(Work([r], r.attempts, 0, doomed=doomed))
            elif deaths >= MAX_DEATHS:
                error = ErrorInfo(
                    POLLER_DIED_ERROR_TYPE,
                    f"the poller died {deaths} times while this record was being processed;"
                    " it is not invoked again",
                )
                plan.append(
                    Work([r], deaths, deaths, doomed=(Condition.RETRY_ATTEMPTS_EXHAUSTED, error))
                )
            else:
                log.warning(
                    "mapping %s: %s@%s was in flight when a poller died (%d time(s)); running it"
                    " alone",
                    self.mapping,
                    r.source,
                    r.position,
                    deaths,
                )
                plan.append(Work([r], r.attempts, r.attempts, solo=True))
        flush()
        return plan

    def hold(self, held: bool = True) -> None:
        """Environments start no staged batch while held (the mapping stopping or disabled)."""
        if self.stager is not None:
            self.stager.hold(held)

    def abandon(self, *staged: Staged | None) -> None:
        """End invocations that environments started on their own and nobody will collect."""
        for running in staged:
            if running is not None and running.handle is not None and self.stager is not None:
                self.stager.abandon(running)

    def _run_one(
        self, work: Work, queue: deque[Work], stop: threading.Event, ahead: Lookahead | None
    ) -> bool:
        backoff = Backoff(
            base_s=self.policy.retry_backoff_base_s, cap_s=self.policy.retry_backoff_cap_s
        )
        while True:
            if work.staged is None and not self._drop_unsendable(work, stop):
                return False
            if not work.records:
                return True
            if work.doomed is not None:
                condition, error = work.doomed
                return self._dead_letter_records(work, work.records, condition, error, stop)
            if work.tried and self.policy.exhausted(work.retries):
                return self._dead_letter(work, work.records, work.last_error, stop)
            ticket = self.valve.admit(stop) if work.staged is None else self.valve.started()
            if ticket is None:
                return False
            try:
                # Only the batch's last work may have the next batch follow it.
                outcome = self._invoke(work, None if queue else ahead)
            except BaseException:
                self.valve.done(ticket, None)
                raise
            pause_s = self.valve.done(ticket, outcome)
            if work.event_error is not None:
                invalid = self._invalid_records(work)
                if invalid:
                    # Those records are at fault, not the handler: no retry is used.
                    if not self._dead_letter_invalid(work, invalid, stop):
                        return False
                    continue
            match outcome:
                case Success():
                    self._succeed(work.records)
                    return True
                case PartialFailure(failed=failed):
                    reported = [r for r in work.records if r.ident in failed]
                    if self.ordered:
                        # Ordered sources checkpoint up to the lowest failed record, retry from it.
                        first = next(i for i, r in enumerate(work.records) if r.ident in failed)
                        done, rest = work.records[:first], work.records[first:]
                    else:
                        done = [r for r in work.records if r.ident not in failed]
                        rest = reported
                    self._succeed(done)
                    work.records = rest
                    work.retries += 1
                    work.last_error = PARTIAL_FAILURE_ERROR
                    if self.policy.exhausted(work.retries):
                        # Only what the last response reported as failed is dead-lettered.
                        self._succeed([r for r in rest if r.ident not in failed])
                        return self._dead_letter(work, reported, PARTIAL_FAILURE_ERROR, stop)
                case RetryLater(error=error):
                    work.retries += 1
                    work.last_error = error
                case Throttling(error=error):
                    # The same work again once the mapping's pause is over (`admit` waits it
                    # out); no retry is used, so a downstream outage dead-letters nothing.
                    self.stats.add(throttled=1)
                    if pause_s is not None:
                        log.warning(
                            "mapping %s: function %s is throttled (%s: %s); pausing the mapping"
                            " for %.0fs",
                            self.mapping,
                            self.function,
                            error.error_type,
                            error.message,
                            pause_s,
                        )
                    continue
                case (
                    FunctionError(error=error)
                    | Timeout(error=error)
                    | Crash(error=error)
                    | InvalidResponse(error=error)
                ):
                    work.last_error = error
                    if self.policy.bisect_batch_on_function_error and len(work.records) > 1:
                        half = len(work.records) // 2
                        # Halves run in order, the first before the second; no retry is used.
                        for part in (work.records[half:], work.records[:half]):
                            queue.appendleft(Work(part, work.retries, work.invocations))
                        self.stats.add(bisected=1)
                        return True
                    work.retries += 1
            if self.policy.exhausted(work.retries):
                continue  # dead-lettered at the top of the loop
            if self.release is not None:
                # The broker waits out the backoff and counts the delivery: a restart neither
                # cuts the wait short nor starts the record's retries over.
                hand_back(
                    self.release,
                    self.ordered,
                    work,
                    work.records,
                    broker_delay(self.policy, work.retries - 1),
                )
                return True
            self._retrying(work)
            if self.clock.wait(stop, backoff.next_delay()):
                return False

    def _retrying(self, work: Work) -> None:
        """Say which records are waiting for a retry, and why (stuck detection shows it)."""
        if not work.records or work.last_error is None:
            return
        first = work.records[0]
        self.retrying.failed(
            work,
            first.source,
            first.position,
            record=self.shape.item_identifier(first),
            records=len(work.records),
            attempt=work.retries,
            error=work.last_error,
        )

    def _invoke(self, work: Work, ahead: Lookahead | None) -> Outcome:
        running, work.staged = work.staged, None
        request = (
            running.request
            if running is not None
            else InvocationRequest(
                request_id=new_request_id(), mapping_name=self.mapping, attempt=work.retries + 1
            )
        )
        is_retry = work.invocations > 0
        work.invocations += 1
        work.tried = True
        work.event_error = None
        started = self.clock.monotonic()
        gate = self._gate
        with contextlib.ExitStack() as scope:
            if gate is not None:
                scope.enter_context(gate.exclusive() if work.solo else gate.shared())
            token = self.in_flight.begin(work.records) if self.in_flight is not None else 0
            try:
                if self._packing is None:
                    result = self.invoker.invoke(self.shape.event(work.records), request)
                elif self.stager is not None and (ahead or running) is not None:
                    result = self._invoke_staging(work, request, running, ahead)
                else:
                    packer, invoker = self._packing
                    packed = PackedEvent(packer.unpacker, packer.pack(work.records))
                    result = invoker.invoke_packed(packed, request)
            except Exception as exc:  # an invoker must not raise; if one does, fail the batch
                log.exception("mapping %s: invocation %s failed", self.mapping, request.request_id)
                result = FunctionError(ErrorInfo(type(exc).__name__, str(exc)))
                # Building the event, or encoding it for the environment, may have failed.
                work.event_error = exc
            if self.in_flight is not None:
                self.in_flight.end(token)
        self.stats.observe_duration(self.clock.monotonic() - started)
        outcome: Outcome = result
        if isinstance(result, Success):
            self._warn_if_ignored(result.response)
            outcome = interpret(
                result.response,
                work.records,
                self.shape,
                self.policy.report_batch_item_failures,
            )
        failed = not isinstance(outcome, Success | Throttling)
        self.stats.add(
            invocations=1,
            invoked=len(work.records),
            retried=int(is_retry),
            failed_invocations=int(failed),
        )
        if failed:
            self._failed(work, outcome)
            log.info(
                "mapping %s: invocation %s of %d record(s) failed: %s",
                self.mapping,
                request.request_id,
                len(work.records),
                _describe(outcome),
            )
        return outcome

    def _invoke_staging(
        self,
        work: Work,
        request: InvocationRequest,
        running: Staged | None,
        ahead: Lookahead | None,
    ) -> InvokeResult:
        """Invoke `work` (or collect it, `running`) with the lane's next batch staged behind it."""
        assert self._packing is not None and self.stager is not None
        packer = self._packing[0]
        policy = self.policy
        then = stage(
            ahead.next() if ahead is not None else None,
            packer,
            mapping=self.mapping,
            report_item_failures=policy.report_batch_item_failures,
            maximum_batch_bytes=policy.maximum_batch_bytes,
            maximum_record_age_s=policy.maximum_record_age_s,
            clock=self.clock,
        )
        if running is not None:
            result = self.stager.collect(running, then)
        else:
            packed = PackedEvent(packer.unpacker, packer.pack(work.records))
            result = self.stager.invoke_packed(packed, request, then)
        if then is not None and then.handle is not None and ahead is not None:
            ahead.running = then
        return result

    def _failed(self, work: Work, outcome: Outcome) -> None:
        """Keep the mapping's last error for `/status`."""
        if isinstance(outcome, PartialFailure):
            error = ErrorInfo(PARTIAL_FAILURE_ERROR.error_type, _describe(outcome))
        elif isinstance(outcome, Success):
            return
        else:
            error = outcome.error
        self.stats.set_last_error(
            {
                **error_json(error),
                "at": iso_ms(self.clock.wall_ms()),
                "record": self.shape.item_identifier(work.records[0]),
                "records": len(work.records),
            }
        )

    def _warn_if_ignored(self, response: Any) -> None:
        """Say once per mapping that a partial response was ignored: the records it names count
        as succeeded, which is Lambda's behaviour but rarely what the handler's author meant."""
        if self._warned_ignored:
            return
        if not ignores_item_failures(response, self.policy.report_batch_item_failures):
            return
        with self._warn_lock:
            if self._warned_ignored:
                return
            self._warned_ignored = True
        log.warning(
            "mapping %s: function %s returned batchItemFailures, but the mapping does not set"
            " function_response_types: [ReportBatchItemFailures], so the response was ignored"
            " and the whole batch counted as succeeded (set that key on the mapping to retry"
            " only the records it names; this is logged once)",
            self.mapping,
            self.function,
        )

    def _invalid_records(self, work: Work) -> list[tuple[Record, Exception]]:
        """Records of `work` whose own event cannot be built or encoded, and why."""
        invalid = []
        for r in work.records:
            try:
                orjson.dumps(self.shape.event([r]))
            except Exception as exc:
                invalid.append((r, exc))
        return invalid

    def _dead_letter_invalid(
        self, work: Work, invalid: list[tuple[Record, Exception]], stop: threading.Event
    ) -> bool:
        for r, exc in invalid:
            log.error(
                "mapping %s: %s@%s cannot be turned into an event (%s: %s); dead-lettering it",
                self.mapping,
                r.source,
                r.position,
                type(exc).__name__,
                exc,
            )
            error = ErrorInfo("Runtime.EventBuildError", f"{type(exc).__name__}: {exc}"[:1000])
            if not self._dead_letter_records(work, [r], Condition.INVALID_RECORD, error, stop):
                return False
        bad = {id(r) for r, _ in invalid}
        work.records = [r for r in work.records if id(r) not in bad]
        work.event_error = None
        return True

    def _drop_unsendable(self, work: Work, stop: threading.Event) -> bool:
        """Dead-letter records too old or too large to invoke; False if stopping meanwhile."""
        too_big = too_large(work.records, self.policy.maximum_batch_bytes)
        if too_big:
            condition = Condition.MAXIMUM_PAYLOAD_SIZE_EXCEEDED
            if not self._dead_letter_records(work, too_big, condition, None, stop):
                return False
            work.records = without(work.records, too_big)
        old = too_old(work.records, self.policy.maximum_record_age_s, self.clock.wall_ms())
        if old:
            condition = Condition.RECORD_AGE_EXCEEDED
            if not self._dead_letter_records(work, old, condition, work.last_error, stop):
                return False
            work.records = without(work.records, old)
        return True

    def _dead_letter(
        self, work: Work, records: list[Record], error: ErrorInfo | None, stop: threading.Event
    ) -> bool:
        condition = Condition.RETRY_ATTEMPTS_EXHAUSTED
        return self._dead_letter_records(work, records, condition, error, stop)

    def _dead_letter_records(
        self,
        work: Work,
        records: list[Record],
        condition: Condition,
        error: ErrorInfo | None,
        stop: threading.Event,
    ) -> bool:
        if self.release is not None and self.dead_letters.destination is None:
            # Never dropped: the broker's own dead-letter policy (an SQS queue's redrive policy)
            # decides, as it does for Lambda. Without one, the record comes back after the
            # backoff of a further retry, and is invoked again.
            delay = broker_delay(self.policy, work.retries)
            log.warning(
                "mapping %s: %d record(s) (%s) handed back to the broker with no on-failure"
                " destination, for its own dead-letter policy; delivered again in %.0fs: %s",
                self.mapping,
                len(records),
                condition,
                delay,
                ", ".join(f"{r.source}@{r.position}" for r in records[:10]),
            )
            hand_back(self.release, self.ordered, work, records, delay)
            return True
        if not self.dead_letters.send(records, condition, error, work.invocations, stop):
            return False
        self.settle(records)
        return True

    def _succeed(self, records: Sequence[Record]) -> None:
        if records:
            self.stats.add(succeeded=len(records))
            self.settle(records)


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, PartialFailure):
        return f"{len(outcome.failed)} record(s) reported in batchItemFailures"
    if isinstance(outcome, Success):
        return "ok"
    return f"{outcome.error.error_type}: {outcome.error.message}"
