"""Retries through the broker (`Capabilities.broker_retries`, SQS's visibility timeout) on the
memory queue: a record to retry is handed back with its backoff, and one exhausted with no
on-failure destination is handed back rather than dropped; on an ordered (FIFO) queue nothing of
a key overtakes a record handed back."""

from __future__ import annotations

import threading
from typing import Any

from connectors.memory.broker import MemoryDestination
from tests.engine import (
    DirectInvoker,
    fake_broker,
    letter_values,
    make_queue_poller,
    rmq_items,
    value_of,
)
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy


def values(event: dict[str, Any]) -> list[bytes]:
    return [value_of(item) for item in rmq_items(event)]


def test_a_failing_record_is_handed_back_with_its_backoff_and_counted_by_the_broker() -> None:
    broker = fake_broker()
    for i in range(5):
        broker.publish("q", f"{i}".encode())
    attempts: list[int] = []

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        if b"3" in values(event):
            if values(event) == [b"3"]:
                attempts.append(request.attempt)
            raise ValueError("poison")

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(
        maximum_retry_attempts=2, bisect_batch_on_function_error=True, retry_backoff_base_s=4.0
    )
    poller, source = make_queue_poller(
        broker, invoker, policy=policy, destination=dlq, broker_retries=True
    )
    poller.run(until_idle_s=1.0)

    # Each retry was a delivery of the broker's (the attempt comes from its count), after a
    # delay the broker waited out: the poller held nothing meanwhile.
    assert attempts == [1, 2, 3]
    assert [seq for seq, _ in source.released] == [4, 4]
    first, second = (delay for _, delay in source.released)
    assert 0 <= first <= 4.0 and 0 <= second <= 8.0
    assert letter_values(dlq.letters) == [b"3"]
    assert dlq.letters[0]["requestContext"]["approximateInvokeCount"] == 3
    assert sorted(source.acked) == [1, 2, 3, 4, 5]
    assert broker.queue_depth("q") == (0, 0)
    stats = poller.stats.snapshot()
    assert stats["released"] == 2 and stats["dead_lettered"] == 1 and stats["dropped"] == 0


def test_with_no_destination_an_exhausted_record_is_handed_back_never_dropped() -> None:
    broker = fake_broker()
    for i in range(5):
        broker.publish("q", f"{i}".encode())
    poison_calls: list[int] = []
    holder: dict[str, Any] = {}

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        if b"3" in values(event):
            if values(event) == [b"3"]:
                poison_calls.append(request.attempt)
                if len(poison_calls) == 4:
                    holder["poller"].stop()
            raise ValueError("poison")

    policy = Policy(
        maximum_retry_attempts=1, bisect_batch_on_function_error=True, retry_backoff_base_s=0.5
    )
    poller, source = make_queue_poller(
        broker, DirectInvoker(handler), policy=policy, destination=None, broker_retries=True
    )
    holder["poller"] = poller
    poller.run()

    # Exhausted after its second invocation, it comes back all the same: the broker's own
    # dead-letter policy (SQS's redrive policy) decides, not this poller.
    assert poison_calls == [1, 2, 3, 4]
    assert sorted(source.acked) == [1, 2, 3, 5]
    assert [seq for seq, _ in source.released] == [4, 4, 4, 4]
    assert broker.queue_depth("q") == (0, 1)  # waiting out its delay, in the broker
    stats = poller.stats.snapshot()
    assert stats["dropped"] == 0 and stats["dead_lettered"] == 0 and stats["released"] == 4


def test_on_a_fifo_queue_nothing_of_a_key_overtakes_a_record_handed_back() -> None:
    broker = fake_broker()
    for i in range(12):
        broker.publish("q", f"{i}".encode(), key=f"g{i % 3}".encode())
    done: dict[bytes, list[int]] = {}
    failures = 0
    lock = threading.Lock()

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        nonlocal failures
        items = rmq_items(event)
        with lock:
            if any(value_of(i) == b"4" for i in items) and failures < 2:
                failures += len(items) == 1  # twice alone: two retries
                raise ValueError("not yet")
            for item in items:
                n = int(value_of(item))
                done.setdefault(f"g{n % 3}".encode(), []).append(n)

    policy = Policy(bisect_batch_on_function_error=True, retry_backoff_base_s=1.0)
    poller, source = make_queue_poller(
        broker,
        DirectInvoker(handler),
        policy=policy,
        destination=MemoryDestination(),
        batch_size=3,
        broker_retries=True,
        fifo=True,
    )
    assert source.capabilities.ordered
    poller.run(until_idle_s=1.0)

    assert done == {b"g0": [0, 3, 6, 9], b"g1": [1, 4, 7, 10], b"g2": [2, 5, 8, 11]}
    # 4 went back twice, each time with the rest of its group that the poller held (its later
    # batch and its lane's buffer); the other groups kept flowing.
    released = [seq - 1 for seq, _ in source.released]
    assert sorted(released) == [4, 4, 7, 7, 10, 10]
    assert sorted(source.acked) == list(range(1, 13))
    assert broker.queue_depth("q") == (0, 0)
