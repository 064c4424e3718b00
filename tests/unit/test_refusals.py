"""An on-failure destination that keeps refusing is visible: one warning per interval with the
reason, its state in the stats (`/status`) and the metrics, one line when it accepts again."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from connectors.kafka.shape import KafkaMeta
from connectors.memory.broker import MemoryBroker, MemoryDestination, MemoryLogSource
from tests.engine import DirectInvoker, fake_broker, letter_values, make_log_poller
from workers.app.metrics import SupervisorCollector, status_of
from workers.engine.clock import Clock, FakeClock
from workers.engine.invoker import InvocationRequest
from workers.engine.letters import Condition, DeadLetters
from workers.engine.policy import Policy
from workers.engine.records import Record
from workers.engine.refusals import WARN_EVERY_S
from workers.engine.stats import MappingStats


class Refusing(MemoryDestination):
    """Refuses its first `fail_next` deliveries, noting when each was tried and what the stats
    of its mapping said at that moment."""

    def __init__(self, fail_next: int, clock: Clock) -> None:
        super().__init__(fail_next)
        self.clock = clock
        self.stats: MappingStats | None = None
        self.tried_at: list[float] = []
        self.seen: list[dict[str, Any]] = []

    def deliver(self, letter: dict[str, Any], records: Any) -> None:
        self.tried_at.append(self.clock.monotonic())
        if self.stats is not None:
            self.seen.append(self.stats.snapshot())
        super().deliver(letter, records)


class Snapshots:
    """Stands in for the supervisor: one poller that reported `snap`."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap

    def snapshots(self) -> list[tuple[str, int, bool, dict[str, Any]]]:
        return [("m", 0, True, self.snap)]

    def summary(self) -> dict[str, Any]:
        return {}

    def states(self) -> dict[str, str]:
        return {"m": "Enabled"}


def exposition(snap: dict[str, Any]) -> str:
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(Snapshots(snap)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def fill(broker: MemoryBroker, n: int) -> None:
    broker.create_topic("t", 1)
    for i in range(n):
        broker.produce("t", f"{i}".encode(), None, partition=0)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "workers.deadletter" and r.levelno == logging.WARNING
    ]


def test_a_refusing_destination_is_warned_about_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()  # only the retries' waits advance it
    records = [
        Record("t-0", i, f"{i}".encode(), timestamp_ms=clock.wall_ms(), meta=KafkaMeta("t", 0))
        for i in range(3)
    ]
    destination = Refusing(fail_next=40, clock=clock)
    stats = MappingStats()
    letters = DeadLetters(
        mapping="m",
        function="f",
        destination=destination,
        shape=MemoryLogSource(MemoryBroker(clock=clock), "t", "g").shape,
        clock=clock,
        stats=stats,
    )
    with caplog.at_level(logging.DEBUG, logger="workers.deadletter"):
        sent = letters.send(records, Condition.RETRY_ATTEMPTS_EXHAUSTED, None, 1, threading.Event())
    assert sent
    assert letter_values(destination.letters) == [b"0", b"1", b"2"]
    # The first refusal is said at once; then a refusal is said only when the last warning is
    # an interval old.
    refusals = destination.tried_at[:40]
    expected: list[float] = []
    for at in refusals:
        if not expected or at - expected[-1] >= WARN_EVERY_S:
            expected.append(at)
    said = warnings(caplog)
    assert len(said) == len(expected)
    assert 1 < len(said) < 40, "the refusals must outlast several intervals"
    first = said[0]
    assert "mapping m: on-failure destination refused 3 record(s):" in first
    assert "MemoryBrokerError: destination unavailable" in first
    assert "1 letter(s) of 3 record(s) waiting, not checkpointed" in first
    # Each warning after the first says how long and how many times it has been refusing.
    spells = [int(m.group(1)) for m in (re.search(r"refusing for (\d+)s", s) for s in said) if m]
    assert spells == sorted(spells) and spells[-1] >= WARN_EVERY_S * (len(said) - 1)
    assert "(refusing for 0s, 1 refusal(s);" in first
    # Every retry is still there at debug level, for whoever needs it.
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "refused" in r.message]
    assert len(debug) == 40 - len(said)
    back = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("on-failure destination accepts letters again after" in m for m in back), back
    assert any("and 40 refusal(s)" in m for m in back)
    snap = stats.snapshot()
    assert snap["destination_refusals"] == 40
    assert snap["destination"]["state"] == "ok"
    assert snap["destination"]["letters_waiting"] == 0
    assert snap["destination"]["last_reason"] == "MemoryBrokerError: destination unavailable"


def test_a_poller_shows_its_destination_refusing_then_ok_and_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = fake_broker()
    fill(broker, 4)

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        raise ValueError("always")

    destination = Refusing(fail_next=5, clock=broker.clock)
    poller, _ = make_log_poller(
        broker,
        DirectInvoker(handler),
        policy=Policy(maximum_retry_attempts=0),
        destination=destination,
        batch_size=4,
    )
    destination.stats = poller.stats
    assert poller.stats.snapshot()["destination"]["state"] == "ok"
    with caplog.at_level(logging.INFO, logger="workers.deadletter"):
        poller.run(until_idle_s=1.0)

    # Nothing lost, nothing checkpointed past what was not dead-lettered.
    assert sorted(letter_values(destination.letters)) == [b"0", b"1", b"2", b"3"]
    assert broker.committed_offsets("g", "t") == {"t-0": 4}
    # While refusing (from the second attempt on), the state says so.
    assert destination.seen[0]["destination"]["state"] == "ok"
    during = destination.seen[5]  # the attempt that is accepted
    assert during["destination"]["state"] == "refusing"
    assert during["destination"]["refusing_since"].endswith("Z")
    assert during["destination"]["last_reason"] == "MemoryBrokerError: destination unavailable"
    assert during["destination"]["letters_waiting"] == 1
    assert during["destination"]["records_waiting"] == 4
    assert during["destination_refusals"] == 5
    assert poller.stats.snapshot()["destination"]["records_waiting"] == 0
    text = exposition(during)
    assert 'esm_destination_refusing{mapping="m"} 1.0' in text
    assert 'esm_destination_refusals_total{mapping="m"} 5.0' in text
    status = status_of(Snapshots(during))  # type: ignore[arg-type]
    assert status["pollers"][0]["destination"]["state"] == "refusing"

    after = poller.stats.snapshot()
    assert after["destination"]["state"] == "ok"
    assert after["destination"]["refusing_since"] is None
    assert after["destination"]["letters_waiting"] == 0
    text = exposition(after)
    assert 'esm_destination_refusing{mapping="m"} 0.0' in text
    assert 'esm_destination_refusals_total{mapping="m"} 5.0' in text
    # Five refusals well within one interval: one warning, one line when it accepts again.
    assert len(warnings(caplog)) == 1
    assert sum("accepts letters again" in r.getMessage() for r in caplog.records) == 1


def test_no_destination_is_shown_as_none() -> None:
    broker = fake_broker()
    fill(broker, 1)
    poller, _ = make_log_poller(
        broker, DirectInvoker(lambda e, r: None), policy=Policy(), destination=None
    )
    assert poller.stats.snapshot()["destination"] == {"state": "none"}
    assert 'esm_destination_refusing{mapping="m"} 0.0' in exposition(poller.stats.snapshot())
