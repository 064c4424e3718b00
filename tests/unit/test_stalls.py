"""Stuck detection: a unit whose position does not move while work waits on it is stalled."""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any

import pytest

from tests.engine import DirectInvoker, fake_broker, make_log_poller, make_queue_poller
from workers.engine.clock import FakeClock
from workers.engine.invoker import InvocationRequest
from workers.engine.outcomes import ErrorInfo
from workers.engine.policy import Policy
from workers.engine.poller import Poller
from workers.engine.stalls import MESSAGE_CHARS, Retrying, Stalls, error_json
from workers.engine.stats import MappingStats


def stalls_of(after_s: float = 60) -> tuple[Stalls, FakeClock, MappingStats, Retrying]:
    clock, stats, retrying = FakeClock(), MappingStats(), Retrying()
    stalls = Stalls(
        mapping="m", stalled_after_s=after_s, clock=clock, stats=stats, retrying=retrying
    )
    return stalls, clock, stats, retrying


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_retrying_unit_is_stalled_once_and_moves_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workers.stalls")
    stalls, clock, stats, retrying = stalls_of(after_s=60)
    assigned = {"t-0", "t-1"}
    lag = {"t-0": 5, "t-1": 0}
    stalls.check(assigned, lag, {"t-0": 1})
    work = object()
    retrying.failed(
        work,
        "t-0",
        17,
        record={"partition": "t-0", "offset": 17},
        records=1,
        attempt=4,
        error=ErrorInfo("ValueError", "bad record"),
    )
    clock.advance(59)
    stalls.check(assigned, lag, {"t-0": 1})
    assert stats.snapshot()["stalled"] == {}
    clock.advance(1)
    stalls.check(assigned, lag, {"t-0": 1})
    entry = stats.snapshot()["stalled"]["t-0"]
    assert entry["reason"] == "retrying"
    assert entry["record"] == {"partition": "t-0", "offset": 17}
    assert (entry["attempt"], entry["records"]) == (4, 1)
    assert (entry["errorType"], entry["errorMessage"]) == ("ValueError", "bad record")
    assert (entry["lag"], entry["unsettled"], entry["for_s"]) == (5, 1, 60.0)
    assert set(stats.snapshot()["stalled"]) == {"t-0"}  # t-1 has nothing waiting
    clock.advance(30)
    stalls.check(assigned, lag, {"t-0": 1})
    assert stats.snapshot()["stalled"]["t-0"]["for_s"] == 90.0
    [warning] = warnings_of(caplog)  # once per stall, however long it lasts
    assert "mapping m: t-0 has not moved for 60s" in warning
    assert "partition t-0, offset 17 (1 record(s)) failed attempt 4" in warning
    assert "ValueError: bad record" in warning

    retrying.done(work)
    stalls.moved(["t-0"])
    assert stats.snapshot()["stalled"] == {}
    assert "mapping m: t-0 moves again after 90s" in caplog.text
    clock.advance(59)
    stalls.check(assigned, lag, {"t-0": 1})
    assert stats.snapshot()["stalled"] == {}


def test_the_clock_starts_when_work_arrives_not_at_the_last_move() -> None:
    stalls, clock, stats, _ = stalls_of(after_s=60)
    stalls.check({"q"}, {"q": 0}, {})
    clock.advance(3600)  # idle for an hour: nothing waits, so nothing is stuck
    stalls.check({"q"}, {"q": 0}, {})
    stalls.check({"q"}, {"q": 3}, {})
    assert stats.snapshot()["stalled"] == {}
    clock.advance(60)
    stalls.check({"q"}, {"q": 3}, {})
    entry = stats.snapshot()["stalled"]["q"]
    assert entry["reason"] == "not_settled" and entry["lag"] == 3
    # Caught up without a checkpoint of its own to report (another consumer took the rest).
    stalls.check({"q"}, {"q": 0}, {})
    assert stats.snapshot()["stalled"] == {}


def test_a_revoked_unit_is_no_longer_reported() -> None:
    stalls, clock, stats, _ = stalls_of(after_s=10)
    stalls.check({"t-0"}, {"t-0": 1}, {})
    clock.advance(10)
    stalls.check({"t-0"}, {"t-0": 1}, {})
    assert set(stats.snapshot()["stalled"]) == {"t-0"}
    stalls.check(set(), {}, {})
    assert stats.snapshot()["stalled"] == {}


def test_a_refusing_destination_is_given_as_the_reason() -> None:
    stalls, clock, stats, _ = stalls_of(after_s=10)
    stats.set_destination({"state": "refusing", "last_reason": "NOT_FOUND: no queue 'dlq'"})
    stalls.check({"q"}, {}, {"q": 2})
    clock.advance(10)
    stalls.check({"q"}, {}, {"q": 2})
    entry = stats.snapshot()["stalled"]["q"]
    assert entry["reason"] == "destination_refusing"
    assert entry["destination"] == "NOT_FOUND: no queue 'dlq'"


def test_the_earliest_failing_batch_of_a_unit_is_its_reason() -> None:
    retrying = Retrying()
    error = ErrorInfo("ValueError", "x")
    for work, position in ((object(), 30), (object(), 12), (object(), 20)):
        retrying.failed(work, "t-0", position, record=position, records=1, attempt=1, error=error)
    assert retrying.by_unit()["t-0"]["record"] == 12


def test_error_messages_are_masked_and_capped() -> None:
    shown = error_json(ErrorInfo("ConnectionError", "cannot reach amqp://app:s3cret@mq:5672/"))
    assert "s3cret" not in shown["errorMessage"] and "app:***@mq" in shown["errorMessage"]
    assert len(error_json(ErrorInfo("E", "x" * 5000))["errorMessage"]) == MESSAGE_CHARS


def run_until_stalled(poller: Poller, also: Any = lambda snap: True) -> dict[str, Any]:
    """Run `poller` in a thread until its stats report a stalled unit and `also(stats)` holds
    (bounded), then stop it; returns the stats that did."""
    thread = threading.Thread(target=poller.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = poller.stats.snapshot()
            if snap["stalled"] and also(snap):
                break
            time.sleep(0.01)
    finally:
        poller.stop()
        thread.join(30)
    assert not thread.is_alive()
    return snap


POISON_DATA = base64.b64encode(b"poison").decode()


def poison(event: dict[str, Any], request: InvocationRequest) -> None:
    """Fails on partition 0's offset 3 and on a queue's b"poison" message."""
    for items in (event.get("records") or event.get("rmqMessagesByQueue") or {}).values():
        for item in items:
            at = (item.get("partition"), item.get("offset"))
            if at == (0, 3) or item.get("data") == POISON_DATA:
                raise ValueError("cannot parse this one")


def test_a_poison_record_retried_forever_stalls_its_partition_only() -> None:
    broker = fake_broker()
    broker.create_topic("t", 2)
    for i in range(10):
        broker.produce("t", f"{i}".encode(), None, partition=0)
        broker.produce("t", f"{i}".encode(), None, partition=1)
    poller, _ = make_log_poller(
        broker,
        DirectInvoker(poison),
        policy=Policy(maximum_retry_attempts=-1),
        destination=None,
        batch_size=1,
        stalled_after_s=60,
    )
    snap = run_until_stalled(poller, lambda snap: snap["checkpoints"].get("t-1") == 10)
    entry = snap["stalled"]["t-0"]
    assert entry["reason"] == "retrying"
    assert entry["record"] == {"partition": "t-0", "offset": 3}
    assert entry["errorType"] == "ValueError" and entry["attempt"] >= 2
    assert entry["lag"] + entry["unsettled"] >= 7  # the poison record and the ones behind it
    assert set(snap["stalled"]) == {"t-0"}
    assert broker.committed_offsets("g", "t") == {"t-0": 3, "t-1": 10}  # t-1 went on
    assert snap["last_error"]["errorType"] == "ValueError"
    assert snap["last_error"]["record"] == {"partition": "t-0", "offset": 3}


def test_a_poison_message_retried_forever_stalls_its_queue() -> None:
    broker = fake_broker()
    broker.publish("q", b"poison")
    broker.publish("q", b"fine")
    poller, _ = make_queue_poller(
        broker,
        DirectInvoker(poison),
        policy=Policy(maximum_retry_attempts=-1),
        destination=None,
        batch_size=1,
        stalled_after_s=60,
    )
    entry = run_until_stalled(poller)["stalled"]["q"]
    assert entry["reason"] == "retrying" and entry["errorMessage"] == "cannot parse this one"
