"""Live control and back-pressure in the engine, on the memory broker: the valve (enable,
disable, the throttle breaker) and the poller acting on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from connectors.memory.broker import MemoryBroker, MemoryDestination, MemoryLogSource
from connectors.memory.broker import MemoryQueueSource as QueueSource
from tests.engine import DirectInvoker, Handler, fake_broker, kafka_items, rmq_items, value_of
from workers import Throttled
from workers.engine.batcher import BatchLimits
from workers.engine.clock import FakeClock
from workers.engine.invoker import InvocationRequest
from workers.engine.outcomes import ErrorInfo, FunctionError, Success, Throttling
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.ports import Source
from workers.engine.records import Record
from workers.engine.valve import DISABLED, DISABLING, ENABLED, Valve

THROTTLED = Throttling(ErrorInfo("Throttled", "slow down"))


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- the valve, alone ----------------------------------------------------------------------------


def test_each_throttle_in_a_row_doubles_the_pause_up_to_the_cap() -> None:
    clock = FakeClock()
    valve = Valve(clock, base_s=1.0, cap_s=8.0)
    stop = threading.Event()
    ticket = valve.admit(stop)
    pauses: list[float | None] = []
    for _ in range(6):
        assert ticket is not None
        pauses.append(valve.done(ticket, THROTTLED))
        started = clock.monotonic()
        # The next invocation waits the whole pause out, and no longer: it is the probe.
        ticket = valve.admit(stop)
        assert clock.monotonic() - started == pytest.approx(pauses[-1])
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_an_answer_closes_the_breaker_and_the_next_throttle_starts_over() -> None:
    clock = FakeClock()
    valve = Valve(clock)
    stop = threading.Event()
    for outcome in (THROTTLED, THROTTLED):
        t = valve.admit(stop)
        assert t is not None
        valve.done(t, outcome)
    assert valve.snapshot()["throttles_in_a_row"] == 2
    probe = valve.admit(stop)
    assert probe is not None and valve.snapshot()["state"] == "half-open"
    assert valve.done(probe, Success()) is None
    assert valve.snapshot() == {"state": "closed"}
    assert valve.is_open() and not valve.holds(in_flight=3)
    t = valve.admit(stop)
    assert t is not None
    assert valve.done(t, THROTTLED) == 1.0


def test_a_throttle_or_success_from_before_the_opening_changes_nothing() -> None:
    clock = FakeClock()
    valve = Valve(clock)
    stop = threading.Event()
    early, late = valve.admit(stop), valve.admit(stop)
    assert early is not None and late is not None
    assert valve.done(early, THROTTLED) == 1.0
    # Both began before the breaker opened: one throttle is one pause, and a success of an
    # invocation that began before says nothing about the downstream now.
    assert valve.done(late, THROTTLED) is None
    assert valve.done(late, Success()) is None
    assert valve.snapshot()["state"] == "open"
    assert valve.snapshot()["throttles_in_a_row"] == 1


def test_holds_new_batches_while_disabled_or_pausing_and_while_probes_are_in_flight() -> None:
    clock = FakeClock()
    valve = Valve(clock)
    stop = threading.Event()
    assert not valve.holds(in_flight=0)
    valve.set_enabled(False)
    assert valve.holds(in_flight=0) and not valve.is_open()
    valve.set_enabled(True)
    t = valve.admit(stop)
    assert t is not None
    valve.done(t, THROTTLED)
    assert valve.holds(in_flight=0)
    clock.advance(1.0)
    # Past the pause: batches in flight probe; with none, the poller starts one.
    assert valve.holds(in_flight=1)
    assert not valve.holds(in_flight=0)
    assert not valve.is_open()


def test_after_a_pause_one_invocation_probes_and_the_others_wait_for_its_answer() -> None:
    valve = Valve(FakeClock(), base_s=0.0)
    stop = threading.Event()
    t = valve.admit(stop)
    assert t is not None
    valve.done(t, THROTTLED)
    probe = valve.admit(stop)
    assert probe is not None
    admitted: list[int | None] = []
    other = threading.Thread(target=lambda: admitted.append(valve.admit(stop)))
    # The FakeClock lets a waiter look again at once; it must keep waiting until the answer.
    other.start()
    wait_until(lambda: valve.waiting() == 1, "the second invocation to wait")
    assert admitted == []
    valve.done(probe, FunctionError(ErrorInfo("ValueError", "not a throttle")))
    # A failure of another kind is no answer about the downstream: the next one probes.
    other.join(10)
    assert admitted and admitted[0] is not None
    assert valve.snapshot()["state"] == "half-open"
    valve.done(admitted[0], Success())
    assert valve.snapshot() == {"state": "closed"}


def test_a_disabled_valve_admits_nothing_until_enabled_and_lets_stop_through() -> None:
    valve = Valve(FakeClock(), enabled=False)
    stop = threading.Event()
    admitted: list[int | None] = []
    waiter = threading.Thread(target=lambda: admitted.append(valve.admit(stop)))
    waiter.start()
    wait_until(lambda: valve.waiting() == 1, "the invocation to wait")
    valve.set_enabled(True)
    waiter.join(10)
    assert admitted == [0] and valve.waiting() == 0
    valve.set_enabled(False)
    stopped = threading.Event()
    waiter = threading.Thread(target=lambda: admitted.append(valve.admit(stopped)))
    waiter.start()
    wait_until(lambda: valve.waiting() == 1, "the invocation to wait")
    stopped.set()
    valve.poke()
    waiter.join(10)
    assert admitted == [0, None] and valve.waiting() == 0


# --- the poller: Throttled ----------------------------------------------------------------------


def log_poller(
    broker: MemoryBroker,
    handler: Handler,
    *,
    policy: Policy,
    destination: MemoryDestination | None = None,
    batch_size: int = 10,
    enabled: bool = True,
    source: Source | None = None,
) -> tuple[Poller, DirectInvoker]:
    invoker = DirectInvoker(handler)
    poller = Poller(
        PollerSettings(
            mapping="m",
            function="f",
            limits=BatchLimits(batch_size=batch_size, maximum_batching_window_s=0.0),
            enabled=enabled,
            poll_timeout_s=0.05,
        ),
        source=source or MemoryLogSource(broker, "t", "g"),
        invoker=invoker,
        policy=policy,
        destination=destination,
        clock=broker.clock,
    )
    return poller, invoker


def fill(broker: MemoryBroker, n: int, partitions: int = 1, start: int = 0) -> None:
    broker.create_topic("t", partitions)
    for i in range(start, start + n):
        broker.produce("t", f"{i}".encode(), partition=i % partitions)


def test_throttled_batches_are_retried_whole_and_nothing_is_dead_lettered() -> None:
    broker = fake_broker()
    fill(broker, 40, partitions=2)
    throttles = {"left": 5}
    handled: list[bytes] = []
    lock = threading.Lock()

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        with lock:
            if throttles["left"]:
                throttles["left"] -= 1
                raise Throttled("downstream says 429")
            handled.extend(value_of(i) for i in kafka_items(event))

    dlq = MemoryDestination()
    # No retry at all and bisect on: any failure would split batches and dead-letter them.
    policy = Policy(maximum_retry_attempts=0, bisect_batch_on_function_error=True)
    poller, invoker = log_poller(broker, handler, policy=policy, destination=dlq)
    poller.run(until_idle_s=1.0)

    assert dlq.letters == []
    assert sorted(handled) == sorted(f"{i}".encode() for i in range(40))
    assert len(handled) == 40  # each once
    assert {len(kafka_items(e)) for _, e in invoker.calls} == {10}  # retried whole, never split
    # A throttle uses no attempt: every invocation is the records' first attempt.
    assert {request.attempt for request, _ in invoker.calls} == {1}
    stats = poller.stats.snapshot()
    assert stats["throttled"] == 5
    assert stats["failed_invocations"] == 0 and stats["bisected"] == 0
    assert stats["dead_lettered"] == 0 and stats["retried"] == 5
    assert broker.committed_offsets("g", "t") == {"t-0": 20, "t-1": 20}


def test_a_throttled_mapping_pauses_its_source_and_then_resumes_it() -> None:
    broker = fake_broker()
    fill(broker, 10)
    source = MemoryLogSource(broker, "t", "g")
    calls = {"n": 0}

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Throttled("busy")
        # The retry after the pause, the breaker's probe: until it answers, the loop keeps every
        # unit of the source paused.
        wait_until(lambda: source._paused == {"t-0"}, "the source to be paused")

    poller, _ = log_poller(broker, handler, policy=Policy(), source=source)
    poller.run(until_idle_s=1.0)
    assert calls["n"] == 2
    assert source._paused == set()
    assert poller.stats.snapshot()["throttle"] == {"state": "closed"}
    assert broker.committed_offsets("g", "t") == {"t-0": 10}


# --- the poller: disable and enable --------------------------------------------------------------


class CountingSource(MemoryLogSource):
    """Counts polls and opens, to show the loop keeps polling (or never connects)."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker, "t", "g")
        self.polls = 0
        self.opens = 0

    def open(self, listener: Any) -> None:
        self.opens += 1
        super().open(listener)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self.polls += 1
        return super().poll(max_records, timeout_s)


class Running:
    """A poller running on a thread, with its handler's invocations counted."""

    def __init__(self, poller: Poller, invoker: DirectInvoker) -> None:
        self.poller = poller
        self.invoker = invoker
        self.thread = threading.Thread(target=poller.run)
        self.thread.start()

    def stop(self) -> None:
        self.poller.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


def collecting() -> tuple[Handler, list[bytes]]:
    handled: list[bytes] = []
    lock = threading.Lock()

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        items = kafka_items(event) if "records" in event else rmq_items(event)
        with lock:
            handled.extend(value_of(i) for i in items)

    return handler, handled


def test_disabled_mapping_keeps_polling_invokes_nothing_and_resumes_where_it_stopped() -> None:
    broker = MemoryBroker()
    fill(broker, 30, partitions=3)
    handler, handled = collecting()
    source = CountingSource(broker)
    run = Running(*log_poller(broker, handler, policy=Policy(), source=source))
    try:
        wait_until(lambda: len(handled) == 30, "the first records")
        wait_until(
            lambda: broker.committed_offsets("g", "t") == dict.fromkeys(("t-0", "t-1", "t-2"), 10),
            "commits",
        )
        run.poller.set_enabled(False)
        wait_until(lambda: run.poller.state == DISABLED, "Disabled")
        assert run.poller.stats.snapshot()["state"] == DISABLED
        fill(broker, 30, partitions=3, start=30)
        calls, polls = len(run.invoker.calls), source.polls
        # The loop goes on polling (a Kafka consumer that stops polling leaves its group), with
        # every unit paused, and invokes nothing.
        wait_until(lambda: source.polls >= polls + 10, "more polls")
        assert len(run.invoker.calls) == calls and len(handled) == 30
        assert source._paused == {"t-0", "t-1", "t-2"}
        assert broker.committed_offsets("g", "t") == dict.fromkeys(("t-0", "t-1", "t-2"), 10)
        run.poller.set_enabled(True)
        wait_until(lambda: len(handled) == 60, "the records produced while disabled")
        wait_until(lambda: run.poller.state == ENABLED, "Enabled")
    finally:
        run.stop()
    assert sorted(handled) == sorted(f"{i}".encode() for i in range(60))
    assert broker.committed_offsets("g", "t") == dict.fromkeys(("t-0", "t-1", "t-2"), 20)


def test_disabling_lets_the_running_invocation_finish_and_commits_it() -> None:
    broker = MemoryBroker()
    fill(broker, 5)
    release = threading.Event()
    started = threading.Event()

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        started.set()
        assert release.wait(20)

    run = Running(*log_poller(broker, handler, policy=Policy(), batch_size=5))
    try:
        assert started.wait(20)
        run.poller.set_enabled(False)
        wait_until(lambda: run.poller.state == DISABLING, "Disabling")
        release.set()
        wait_until(lambda: run.poller.state == DISABLED, "Disabled")
        wait_until(lambda: broker.committed_offsets("g", "t") == {"t-0": 5}, "the commit")
        assert len(run.invoker.calls) == 1
    finally:
        run.stop()


def test_a_retrying_batch_waits_while_disabled_and_goes_on_when_enabled() -> None:
    broker = MemoryBroker()
    fill(broker, 3)
    fails = {"left": 1}
    disabled = threading.Event()

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        if fails["left"]:
            fails["left"] -= 1
            disabled.wait(20)
            raise ValueError("once")

    poller, invoker = log_poller(
        broker, handler, policy=Policy(maximum_retry_attempts=3, retry_backoff_base_s=0.01)
    )
    run = Running(poller, invoker)
    try:
        wait_until(lambda: len(invoker.calls) == 1, "the first invocation")
        poller.set_enabled(False)
        disabled.set()
        # Its retry is held (parked, not running): the mapping is Disabled, nothing settled.
        wait_until(lambda: poller.state == DISABLED, "Disabled")
        assert len(invoker.calls) == 1 and broker.committed_offsets("g", "t") == {}
        poller.set_enabled(True)
        wait_until(lambda: broker.committed_offsets("g", "t") == {"t-0": 3}, "the retry")
        assert [r.attempt for r, _ in invoker.calls] == [1, 2]
    finally:
        run.stop()


def test_a_mapping_that_starts_disabled_does_not_connect_until_enabled() -> None:
    broker = MemoryBroker()
    fill(broker, 12, partitions=2)
    handler, handled = collecting()
    source = CountingSource(broker)
    poller, invoker = log_poller(broker, handler, policy=Policy(), source=source, enabled=False)
    assert poller.stats.snapshot()["state"] == DISABLED
    # --until-idle does not wait for a disabled mapping.
    poller.run(until_idle_s=0.2)
    assert source.opens == 0 and invoker.calls == []
    poller, invoker = log_poller(broker, handler, policy=Policy(), source=source, enabled=False)
    run = Running(poller, invoker)
    try:
        wait_until(lambda: poller.stats.snapshot()["state"] == DISABLED, "Disabled")
        assert source.opens == 0
        poller.set_enabled(True)
        wait_until(lambda: len(handled) == 12, "every record")
        wait_until(lambda: poller.state == ENABLED, "Enabled")
        assert source.opens == 1
    finally:
        run.stop()
    assert sorted(handled) == sorted(f"{i}".encode() for i in range(12))


def test_a_source_that_cannot_pause_is_polled_for_nothing_while_disabled() -> None:
    broker = MemoryBroker()
    handler, handled = collecting()
    source = QueueSource(broker, "q")
    polls: list[int] = []
    original = source.poll

    def poll(max_records: int, timeout_s: float) -> list[Record]:
        polls.append(max_records)
        return original(max_records, timeout_s)

    source.poll = poll  # type: ignore[method-assign]
    poller, invoker = log_poller(broker, handler, policy=Policy(), source=source, enabled=True)
    run = Running(poller, invoker)
    try:
        for i in range(5):
            broker.publish("q", f"{i}".encode())
        wait_until(lambda: len(handled) == 5, "the first messages")
        poller.set_enabled(False)
        wait_until(lambda: poller.state == DISABLED, "Disabled")
        for i in range(5, 10):
            broker.publish("q", f"{i}".encode())
        seen = len(polls)
        wait_until(lambda: len(polls) >= seen + 10, "more polls")
        assert set(polls[seen:]) == {0} and len(handled) == 5
        assert broker.queue_depth("q") == (5, 0)
        poller.set_enabled(True)
        wait_until(lambda: len(handled) == 10, "the messages published while disabled")
    finally:
        run.stop()
    assert sorted(handled) == sorted(f"{i}".encode() for i in range(10))
    assert broker.queue_depth("q") == (0, 0)
