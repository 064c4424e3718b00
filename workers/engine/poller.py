"""One mapping's poller: source -> filter -> lanes -> batch runner -> checkpoint.

A lane is the unit of ordering: records of one partition or stream whose keys hash to the same
slot (`parallelization_factor` slots per unit). A lane runs one batch at a time, in arrival order,
so a record never reaches the handler before an earlier record with the same key has settled.
One threading rule: only the loop thread talks to the source (and so to its driver). Batches run
on worker threads and put what settled on a settle queue; the loop thread turns that into commits
or acks (workers.engine.checkpoint).
"""

from __future__ import annotations

import itertools
import logging
import threading
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.engine.ahead import Lookahead
from workers.engine.backoff import Backoff
from workers.engine.batcher import BatchLimits, Lane, runs_by_unit
from workers.engine.checkpoint import AckTable, CheckpointTracker, SettleQueue
from workers.engine.clock import SYSTEM_CLOCK, Clock
from workers.engine.filters import split_matching
from workers.engine.flight import InFlightFile, SuspectList, Suspects
from workers.engine.invoker import Invoker, Staged
from workers.engine.letters import DeadLetters
from workers.engine.policy import BatchRunner, Policy
from workers.engine.ports import Destination, Source
from workers.engine.records import Record
from workers.engine.redact import describe
from workers.engine.stalls import Retrying, Stalls
from workers.engine.stats import MappingStats
from workers.engine.valve import (
    DISABLED,
    DISABLING,
    ENABLED,
    STATE_CHANGES,
    THROTTLE_BASE_S,
    THROTTLE_CAP_S,
    Valve,
)

log = logging.getLogger("workers.poller")

RecordFilter = Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class PollerSettings:
    mapping: str
    function: str
    limits: BatchLimits = field(default_factory=BatchLimits)
    parallelization_factor: int = 1
    # Most batches running at once, over all lanes (scaling_config.maximum_concurrency, this
    # poller's share); 0: one per lane.
    maximum_concurrency: int = 0
    # How long a revoke or shutdown waits for in-flight batches (the function timeout, plus).
    drain_timeout_s: float = 35.0
    # Records buffered per source unit before it is paused (or polling stops).
    max_buffered_per_unit: int = 0  # 0: derived from batch size and parallelization
    poll_timeout_s: float = 0.2
    max_threads: int = 256
    # A unit whose position has not moved this long while work waits on it is stalled.
    stalled_after_s: float = 300.0
    # `enabled: false` starts the mapping disabled: no connection until it is enabled.
    enabled: bool = True
    # The pause after a throttle (workers.Throttled), doubling with each one in a row.
    throttle_base_s: float = THROTTLE_BASE_S
    throttle_cap_s: float = THROTTLE_CAP_S

    def buffer_cap(self) -> int:
        if self.max_buffered_per_unit > 0:
            return self.max_buffered_per_unit
        return max(2000, 4 * self.limits.batch_size * self.parallelization_factor)


class PollerFailed(RuntimeError):
    """A batch failed in the engine itself: records it held were left unsettled."""


class Poller:
    """Drives one source for one mapping until stopped or, with `until_idle_s`, caught up."""

    def __init__(
        self,
        settings: PollerSettings,
        *,
        source: Source,
        invoker: Invoker,
        policy: Policy,
        destination: Destination | None,
        record_filter: RecordFilter | None = None,
        clock: Clock = SYSTEM_CLOCK,
        stats: MappingStats | None = None,
        in_flight_path: Path | None = None,
        suspects: SuspectList | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.clock = clock
        self.stats = stats or MappingStats()
        self.record_filter = record_filter
        self.stop_event = threading.Event()
        self._offsets = source.capabilities.checkpoint == "offset"
        broker_retries = source.capabilities.broker_retries
        if broker_retries and self._offsets:
            raise ValueError("a source with broker_retries must checkpoint by ack")
        self._ordered = source.capabilities.ordered
        self._pf = settings.parallelization_factor
        self._rr = itertools.count()
        self._lock = threading.Lock()  # guards lanes and buffers; never held across a source call
        self._idle = threading.Condition(self._lock)
        self._lanes: dict[tuple[str, int], Lane] = {}
        self._unit_stops: dict[str, threading.Event] = {}
        self._buffered: dict[str, int] = {}
        self._paused: set[str] = set()
        # Set when a lane takes records from its buffer, the mapping is enabled, or on stop.
        self._wake = threading.Event()
        # Disabled or throttled: no batch starts, and the source's units stay paused.
        limits = {"base_s": settings.throttle_base_s, "cap_s": settings.throttle_cap_s}
        self.valve = Valve(clock, enabled=settings.enabled, **limits)
        self._holding = False
        self._state = ENABLED if settings.enabled else DISABLED
        self.stats.set_control(self._state, self.valve.snapshot())
        self._tracker = CheckpointTracker()  # offset sources; the loop thread's
        self._acks = AckTable()  # ack sources; the loop thread's
        self._settled = SettleQueue(getattr(source, "wake", None))
        self._in_flight = 0
        # Set when a ready lane waits for maximum_concurrency: running lanes then stop taking
        # batches back to back, so that the lanes waiting longest get their turn.
        self._starved = False
        self._failure: BaseException | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_threads, thread_name_prefix=f"batch-{settings.mapping}"
        )
        dead_letters = DeadLetters(
            mapping=settings.mapping,
            function=settings.function,
            destination=destination,
            shape=source.shape,
            clock=clock,
            stats=self.stats,
        )
        retrying = Retrying()
        self._stalls = Stalls(
            mapping=settings.mapping,
            stalled_after_s=settings.stalled_after_s,
            clock=clock,
            stats=self.stats,
            retrying=retrying,
        )
        stable = source.capabilities.stable_positions
        # Under a supervisor: what is in flight, for it to read if this process dies.
        self.in_flight = (
            InFlightFile(in_flight_path, stable, source.fingerprint) if in_flight_path else None
        )
        self.runner = BatchRunner(
            mapping=settings.mapping,
            function=settings.function,
            policy=policy,
            invoker=invoker,
            shape=source.shape,
            ordered=self._ordered,
            dead_letters=dead_letters,
            settle=self._settle,
            clock=clock,
            stats=self.stats,
            suspects=Suspects(suspects or [], source.fingerprint),
            in_flight=self.in_flight,
            retrying=retrying,
            valve=self.valve,
            release=self._release if broker_retries else None,
        )

    # --- the loop --------------------------------------------------------------------------------

    def run(self, until_idle_s: float | None = None) -> None:
        """Poll until `stop()` or, with `until_idle_s`, until caught up and idle that long."""
        errors = Backoff(base_s=0.5, cap_s=30.0)
        opened = False
        idle_since: float | None = None
        reported_at = float("-inf")
        try:
            while not self.stop_event.is_set():
                if self._failure is not None:
                    raise self._failure
                try:
                    if not opened and not self.valve.enabled:
                        # Disabled from the start: no connection (nor group membership) until
                        # enabled; idle meanwhile.
                        self._wake.clear()
                        if not self.valve.enabled and not self.stop_event.is_set():
                            self.clock.wait(self._wake, min(1.0, until_idle_s or 1.0))
                        got, quiet = 0, True
                    else:
                        if not opened:
                            self.source.open(self)
                            opened = True
                        got = self._poll_once()
                        quiet = until_idle_s is not None and not got and self._quiet()
                    errors.reset()
                    changed = self._steer(opened)
                    if changed or self.clock.monotonic() - reported_at >= 1.0:
                        reported_at = self.clock.monotonic()
                        self.stats.set_control(self._state, self.valve.snapshot())
                        if opened:
                            self._report()
                except self.source.retryable_errors as exc:
                    delay = errors.next_delay()
                    log.warning(
                        "mapping %s: broker error: %s; retrying in %.1fs",
                        self.settings.mapping,
                        describe(exc),
                        delay,
                    )
                    self.clock.wait(self.stop_event, delay)
                    continue
                if until_idle_s is not None:
                    if not quiet:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = self.clock.monotonic()
                    elif self.clock.monotonic() - idle_since >= until_idle_s:
                        break
        finally:
            self._shutdown(opened)
        if self._failure is not None:
            # Not a clean end: the supervisor restarts this poller and the run exits 1.
            raise PollerFailed(
                f"mapping {self.settings.mapping}: a batch failed in the engine; its records were"
                " left unsettled"
            ) from self._failure

    def _report(self) -> None:
        """Refresh what the stats say of each unit: assignment, lag, batches running, stalls."""
        assigned = self.source.assignment()
        lag = dict(self.source.lag())
        with self._lock:
            in_flight = self._in_flight
        self.stats.set_position(sorted(assigned), lag, in_flight)
        # A disabled mapping is not stalled: it is asked not to move (its timers restart).
        if self._state != ENABLED:
            assigned, lag = frozenset(), {}
        unsettled = self._tracker.unsettled() if self._offsets else self._acks.unsettled()
        self._stalls.check(assigned, lag, unsettled)

    def stop(self) -> None:
        """Stop polling; in-flight invocations finish, nothing new starts."""
        self.stop_event.set()
        with self._lock:
            for event in self._unit_stops.values():
                event.set()
        self.runner.hold()
        self.valve.poke()
        self._wake.set()

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the mapping; any thread. The loop thread acts on it: disabled, no
        batch starts, the source's units are paused (or polled for nothing), batches running
        finish and later ones wait, unsettled records keep their position for the enable."""
        self.valve.set_enabled(enabled)
        self.runner.hold(not enabled or self.stop_event.is_set())
        self._wake.set()

    @property
    def state(self) -> str:
        return self._state

    def _steer(self, opened: bool) -> bool:
        """The mapping's state as the loop sees it now; True if it changed."""
        if not opened:
            state = DISABLED
        elif self.valve.enabled:
            state = ENABLED
        else:
            parked = self.valve.waiting()  # before in-flight: it only grows while disabled
            with self._lock:
                state = DISABLED if self._in_flight <= parked else DISABLING
        if state == self._state:
            return False
        self._state = state
        log.info("mapping %s: %s", self.settings.mapping, STATE_CHANGES[state])
        return True

    def _poll_once(self) -> int:
        self._checkpoint()
        now = self.clock.monotonic()
        timeout = self._dispatch_ready(now)
        # Nothing can arrive while every unit is paused: resume drained units first, then wait
        # for a lane to take a batch rather than the whole timeout inside source.poll.
        self._wake.clear()
        self._apply_backpressure()
        if self._paused and self._paused >= self.source.assignment():
            self.clock.wait(self._wake, timeout)
            self._dispatch_ready(self.clock.monotonic())
            self._apply_backpressure()
            timeout = 0.0
        # Held, a source that cannot pause is polled for nothing: its connection is serviced.
        room = 0 if self._holding and not self.source.capabilities.pausable else self._room()
        records = self.source.poll(room, timeout)
        if records:
            self._accept(records)
            self._dispatch_ready(self.clock.monotonic())
        self._checkpoint()
        self._apply_backpressure()
        return len(records)

    def _room(self) -> int:
        cap = self.settings.buffer_cap()
        if self.source.capabilities.pausable:
            return max(self.settings.limits.batch_size, 500)
        with self._lock:
            buffered = sum(self._buffered.values())
        units = max(1, len(self._buffered))
        return max(0, min(cap * units - buffered, max(self.settings.limits.batch_size, 500)))

    def _quiet(self) -> bool:
        if self._state == DISABLED:
            # --until-idle does not wait for a disabled mapping: what it holds waits for an
            # enable, or is delivered again after this run.
            return self._settled.empty()
        with self._lock:
            quiet = self._in_flight == 0 and not any(self._buffered.values())
        return quiet and self._settled.empty() and self.source.caught_up()

    # --- records in ------------------------------------------------------------------------------

    def _accept(self, records: Sequence[Record]) -> None:
        now = self.clock.monotonic()
        filtered: list[Record] = []
        matches = self.record_filter
        view = self.source.shape.filter_view
        if not self._offsets:
            self._acks.hold(records)
        with self._lock:
            # Per run of one unit rather than per record: this is the hot path of every poll.
            for unit, run in runs_by_unit(records):
                if self._offsets:
                    fresh = self._tracker.track_run(unit, [r.position for r in run])
                    if len(fresh) != len(run):  # redeliveries of records this poller holds
                        keep = set(fresh)
                        run = [r for r in run if r.position in keep]
                if matches is not None:
                    run, dropped = split_matching(run, matches, view, self.settings.mapping)
                    filtered += dropped
                if not run:
                    continue
                if self._pf == 1:
                    self._lane(unit, 0).buffer.extend(run, now)
                else:
                    for r in run:
                        self._lane(unit, self._slot(r)).buffer.add(r, now)
                self._buffered[unit] = self._buffered.get(unit, 0) + len(run)
        self.stats.add(polled=len(records), filtered_out=len(filtered))
        if filtered:
            self._settle(filtered)

    def _slot(self, record: Record) -> int:
        if not self._ordered:
            return next(self._rr) % self._pf
        if record.key is None:
            # Fold the high bits in: Redis positions are `ms << 64 | seq`.
            return (record.position ^ (record.position >> 64)) % self._pf
        return zlib.crc32(record.key) % self._pf

    def _lane(self, unit: str, slot: int) -> Lane:
        lane = self._lanes.get((unit, slot))
        if lane is None:
            stop = self._unit_stops.get(unit)
            if stop is None:
                stop = self._unit_stops[unit] = threading.Event()
                if self.stop_event.is_set():
                    stop.set()
            lane = self._lanes[(unit, slot)] = Lane(unit, stop)
        return lane

    # --- dispatch --------------------------------------------------------------------------------

    def _dispatch_ready(self, now: float) -> float:
        """Start every lane whose batch is ready; returns how long the next poll may wait."""
        limits = self.settings.limits
        wait = self.settings.poll_timeout_s
        bound = self.settings.maximum_concurrency
        with self._lock:
            self._holding = self.valve.holds(self._in_flight)
            lanes: Collection[Lane] = () if self._holding else self._lanes.values()
            if bound:
                self._starved = False
                # Oldest waiting first: with fewer batches than lanes, none is left behind.
                lanes = sorted(lanes, key=lambda lane: lane.buffer.first_at)
            for lane in lanes:
                if lane.busy or lane.stop.is_set():
                    continue
                due = lane.buffer.ready_in(limits, now)
                if due is None:
                    continue
                if due > 0:
                    wait = min(wait, due)
                    continue
                if bound and self._in_flight >= bound:
                    self._starved = True
                    break
                batch = self._take(lane)
                lane.busy = True
                self._in_flight += 1
                self._executor.submit(self._run_lane, lane, batch)
            if self._in_flight:
                # Settled batches free lanes that the loop must refill promptly.
                wait = min(wait, 0.05)
        return wait

    def _take(self, lane: Lane) -> list[Record]:
        batch = lane.buffer.take(self.settings.limits)
        self._buffered[lane.unit] -= len(batch)
        self._wake.set()
        return batch

    def _next(self, lane: Lane) -> list[Record] | None:
        """The lane's next batch if it is ready and the lane may go on to it (its thread's)."""
        with self._lock:
            due = lane.buffer.ready_in(self.settings.limits, self.clock.monotonic())
            go = due == 0.0 and not lane.stop.is_set() and self.valve.is_open()
            return self._take(lane) if go and not self._starved else None

    def _run_lane(self, lane: Lane, batch: list[Record] | None) -> None:
        """Run batches of one lane back to back while more are ready, then free the lane. Where
        the runner stages batches, it takes the next one from `ahead` while the current runs."""
        ahead = Lookahead(lambda: self._next(lane))
        running: Staged | None = None
        try:
            while batch:
                if not self.runner.run(batch, lane.stop, ahead, running):
                    break
                batch, running = ahead.pop()
                batch = batch or self._next(lane)
        except BaseException as exc:
            log.exception("mapping %s: batch runner failed", self.settings.mapping)
            if self.in_flight is not None and batch:
                # Counted as a death on these records, as if the process had died of them.
                self.in_flight.failed(batch)
            self._failure = exc
            self.stop()
        finally:
            self.runner.abandon(running, ahead.running)  # staged, started, not collected
            with self._lock:
                lane.busy = False
                self._in_flight -= 1
                self._idle.notify_all()

    # --- settling --------------------------------------------------------------------------------

    def _settle(self, records: Sequence[Record]) -> None:
        """Records that succeeded, were filtered out or were dead-lettered: any thread."""
        if records:
            self._settled.put(records)

    def _release(self, records: Sequence[Record], delay_s: float) -> None:
        """Records to hand back to the broker (`broker_retries`): any thread. On an ordered
        source, the records of their keys still waiting in their lanes go back with them."""
        if self._ordered and records:
            records = list(records)
            with self._lock:
                keys: dict[tuple[str, int], set[bytes | None]] = {}
                for r in records:
                    keys.setdefault((r.source, self._slot(r)), set()).add(r.key)
                for (unit, slot), lane_keys in keys.items():
                    lane = self._lanes.get((unit, slot))
                    later = lane.buffer.remove(lane_keys) if lane is not None else []
                    if later:
                        self._buffered[unit] -= len(later)
                        records += later
        self._settled.release(records, delay_s)

    def _checkpoint(self) -> None:
        """Commit or ack what settled since the last call, and hand back what is to be
        delivered again. The loop thread only."""
        for released, delay_s in self._settled.take_released():
            held = self._acks.release(released)
            if held:
                self.source.release(held, delay_s)
                self.stats.add(released=len(held))
        records = self._settled.take()
        if not records:
            return
        if self._offsets:
            for unit, run in runs_by_unit(records):
                if self._tracker.knows(unit):
                    self._tracker.settle(unit, [r.position for r in run])
            moved = self._tracker.advance()
            if moved:
                self.source.commit(moved)
                self.stats.checkpointed(moved)
                self._stalls.moved(moved)
        else:
            released = self._acks.release(records)
            if released:
                self.source.ack(released)
                last = released[-1]
                self.stats.checkpointed({last.source: self.source.shape.item_identifier(last)})
                self._stalls.moved({r.source for r in released})

    # --- assignment (AssignmentListener) ---------------------------------------------------------

    def on_assigned(self, units: Collection[str]) -> None:
        log.info("mapping %s: assigned %s", self.settings.mapping, sorted(units))
        with self._lock:
            for unit in units:
                self._unit_stops[unit] = threading.Event()
                if self.stop_event.is_set():
                    self._unit_stops[unit].set()

    def on_revoked(self, units: Collection[str]) -> None:
        """Let in-flight batches of `units` finish (within the drain budget), then forget them."""
        units = set(units)
        log.info("mapping %s: revoking %s", self.settings.mapping, sorted(units))
        with self._lock:
            for unit in units:
                self._unit_stops.get(unit, threading.Event()).set()
            self.valve.poke()  # batches parked while disabled or throttled see their stop
            self._wait_idle(
                lambda: not any(lane.busy for lane in self._lanes.values() if lane.unit in units)
            )
        # Called by the source on the loop thread (inside poll): what the drained batches
        # settled is checkpointed before the units go.
        self._checkpoint()
        with self._lock:
            for key in [k for k in self._lanes if k[0] in units]:
                self._lanes.pop(key).buffer.clear()
            for unit in units:
                self._buffered.pop(unit, None)
                self._unit_stops.pop(unit, None)
            self._paused -= units
        self._tracker.forget(units)
        self._acks.forget(units)

    def _wait_idle(self, done: Callable[[], bool]) -> None:
        """Wait (lock held) until `done()`, at most the drain budget."""
        deadline = self.clock.monotonic() + self.settings.drain_timeout_s
        while not done():
            left = deadline - self.clock.monotonic()
            if left <= 0:
                log.warning(
                    "mapping %s: in-flight batches did not finish within %.0fs; leaving them to "
                    "be delivered again",
                    self.settings.mapping,
                    self.settings.drain_timeout_s,
                )
                return
            self._idle.wait(min(left, 0.5))

    # --- backpressure ----------------------------------------------------------------------------

    def _apply_backpressure(self) -> None:
        if not self.source.capabilities.pausable:
            return
        cap = self.settings.buffer_cap()
        # Held (disabled or throttled): every unit, so that the driver fetches nothing meanwhile
        # while the loop goes on polling (a Kafka consumer that stops polling leaves its group).
        held = self.source.assignment() if self._holding else frozenset()
        with self._lock:
            full = {u for u, n in self._buffered.items() if n >= cap}
            kept = {u for u in self._paused if self._buffered.get(u, 0) > cap // 2}
            want = set(held) | full | kept
            to_pause = want - self._paused
            drained = self._paused - want
            self._paused = want
        if to_pause:
            self.source.pause(to_pause)
        if drained:
            self.source.resume(drained)

    # --- shutdown --------------------------------------------------------------------------------

    def _shutdown(self, opened: bool) -> None:
        self.stop()
        with self._lock:
            self._wait_idle(lambda: self._in_flight == 0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if opened:
            try:
                self._checkpoint()
            except Exception:
                log.exception("mapping %s: the last checkpoint failed", self.settings.mapping)
            try:
                self.source.close()
            except Exception:
                log.exception("mapping %s: closing the source failed", self.settings.mapping)
        if self.in_flight is not None and self._failure is None:
            self.in_flight.close()
        log.info(
            "mapping %s: stopped; checkpoints %s",
            self.settings.mapping,
            self.stats.snapshot()["checkpoints"],
        )
