"""A lane's next batch staged in the environment behind the current one (process isolation):
it starts there the moment the current invocation succeeded wholly, and never otherwise.

Real child processes; the handler logs each batch it runs, so that the tests see what ran, and
in which order, from the environment's side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka.shape import KafkaMeta, KafkaShape
from workers.engine.invoker import FunctionSpec, InvocationRequest, PackedEvent, Staged
from workers.engine.outcomes import Crash, FunctionError, InvokeResult, Success, Timeout
from workers.engine.records import Record
from workers.invoke import ProcessInvoker

SHAPE = KafkaShape("127.0.0.1:9092")
META = KafkaMeta("orders", 0)


def packed(value: str, offset: int = 0) -> PackedEvent:
    records = [Record("orders-0", offset, value.encode(), None, 1, meta=META)]
    return PackedEvent(SHAPE.unpacker, SHAPE.pack(records))


def request(name: str) -> InvocationRequest:
    return InvocationRequest(request_id=f"req-{name}", mapping_name="m", attempt=1)


def staged(value: str, *, report_item_failures: bool = False) -> Staged:
    return Staged(packed(value, 1), request(value), report_item_failures)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "batches.log"


@pytest.fixture
def make(process_invokers: Callable[[FunctionSpec], ProcessInvoker], log: Path) -> Any:
    def make(concurrency: int = 1, timeout_s: float = 10.0) -> ProcessInvoker:
        return process_invokers(
            FunctionSpec(
                name="f",
                handler="tests.handlers.staging_handlers:log_batches",
                timeout_s=timeout_s,
                memory_mb=256,
                concurrency=concurrency,
                environment={"STAGING_LOG": str(log)},
            )
        )

    return make


def ran(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_staged_batch_starts_in_the_environment_when_the_one_before_succeeded(
    make: Any, log: Path
) -> None:
    invoker = make()
    then = staged("b")

    first = invoker.invoke_packed(packed("a"), request("a"), then)

    assert first == Success({"ran": "a"})
    assert then.handle is not None  # started without the worker asking
    assert invoker.collect(then) == Success({"ran": "b"})
    assert ran(log) == ["a", "b"]
    # The environment is back in the pool and in step with the worker.
    assert invoker.invoke_packed(packed("c"), request("c")) == Success({"ran": "c"})
    assert invoker.stats.environments == 1
    assert invoker.stats.invocations == 3


def test_batches_go_on_from_one_to_the_next_in_order(make: Any, log: Path) -> None:
    invoker = make()
    running = staged("1")
    assert invoker.invoke_packed(packed("0"), request("0"), running) == Success({"ran": "0"})
    for n in range(2, 6):
        then = staged(str(n))
        assert invoker.collect(running, then) == Success({"ran": str(n - 1)})
        assert then.handle is not None
        running = then
    assert invoker.collect(running) == Success({"ran": "5"})
    assert ran(log) == [str(n) for n in range(6)]


@pytest.mark.parametrize("first", ["fail-a", "partial-a"])
def test_a_staged_batch_is_dropped_when_the_one_before_did_not_wholly_succeed(
    make: Any, log: Path, first: str
) -> None:
    invoker = make()
    then = staged("b", report_item_failures=True)

    result = invoker.invoke_packed(packed(first), request(first), then)

    assert then.handle is None
    if first.startswith("fail"):
        assert isinstance(result, FunctionError)
    else:
        assert isinstance(result, Success) and result.response["batchItemFailures"]
    # Its records are the worker's to invoke again, once the failed batch is dealt with.
    assert invoker.invoke_packed(packed("b"), request("b2")) == Success({"ran": "b"})
    assert ran(log) == [first, "b"]


def test_item_failures_the_mapping_does_not_report_do_not_hold_the_next_batch(
    make: Any, log: Path
) -> None:
    invoker = make()
    then = staged("b", report_item_failures=False)  # Lambda then ignores batchItemFailures

    invoker.invoke_packed(packed("partial-a"), request("a"), then)

    assert then.handle is not None
    assert invoker.collect(then) == Success({"ran": "b"})
    assert ran(log) == ["partial-a", "b"]


def test_once_held_no_staged_batch_starts(make: Any, log: Path) -> None:
    invoker = make()
    invoker.hold()  # the worker is stopping: in-flight invocations finish, nothing new starts
    then = staged("b")

    assert invoker.invoke_packed(packed("a"), request("a"), then) == Success({"ran": "a"})

    assert then.handle is None
    assert ran(log) == ["a"]


def test_a_function_waiting_for_an_environment_gets_it_before_a_further_staged_batch(
    make: Any, log: Path
) -> None:
    invoker = make(concurrency=1)
    running = staged("slow-b")
    invoker.invoke_packed(packed("a"), request("a"), running)
    assert running.handle is not None
    results: list[InvokeResult] = []
    other = threading.Thread(
        target=lambda: results.append(invoker.invoke_packed(packed("c"), request("c")))
    )
    other.start()
    time.sleep(0.3)  # the other lane waits for the one environment, busy with "slow-b"
    then = staged("d")

    assert invoker.collect(running, then) == Success({"ran": "slow-b"})
    other.join(10)

    assert then.handle is None  # not staged while another lane waited
    assert results == [Success({"ran": "c"})]
    assert ran(log) == ["a", "slow-b", "c"]


@pytest.mark.parametrize(("first", "expected"), [("hang-a", Timeout), ("exit-a", Crash)])
def test_a_timeout_or_crash_ends_the_environment_and_its_staged_batch(
    make: Any, log: Path, first: str, expected: type
) -> None:
    invoker = make(timeout_s=0.5)
    then = staged("b")

    result = invoker.invoke_packed(packed(first), request("a"), then)

    assert isinstance(result, expected)
    assert then.handle is None
    assert invoker.invoke_packed(packed("b"), request("b2")) == Success({"ran": "b"})
    assert ran(log) == [first, "b"]


def test_an_abandoned_staged_batch_ends_with_its_environment(make: Any, log: Path) -> None:
    invoker = make()
    running = staged("slow-b")
    invoker.invoke_packed(packed("a"), request("a"), running)

    invoker.abandon(running)

    assert running.handle is None
    assert invoker.invoke_packed(packed("c"), request("c")) == Success({"ran": "c"})
    assert invoker.stats.cold_starts == 2  # the environment running "slow-b" was replaced
