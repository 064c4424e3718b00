"""`scaling_config.maximum_concurrency` on the memory queue: the poller runs no more batches at
once than its share, however many lanes have a batch ready, and every lane gets its turn."""

from __future__ import annotations

import threading

from connectors.memory.broker import MemoryBroker, MemoryDestination
from tests.engine import DEADLINE_S, DirectInvoker, Held, eventually, make_queue_poller
from workers.engine.policy import Policy
from workers.engine.poller import Poller


def start(lanes: int, maximum_concurrency: int) -> tuple[Poller, Held, threading.Thread]:
    """One record per lane, each lane's batch ready at once."""
    broker = MemoryBroker()
    for i in range(lanes):
        broker.publish("q", f"{i}".encode())
    handler = Held()
    poller, _ = make_queue_poller(
        broker,
        DirectInvoker(handler),
        policy=Policy(),
        destination=MemoryDestination(),
        batch_size=1,
        parallelization_factor=lanes,
        maximum_concurrency=maximum_concurrency,
    )
    thread = threading.Thread(target=poller.run, kwargs={"until_idle_s": 0.2})
    thread.start()
    return poller, handler, thread


def test_maximum_concurrency_bounds_the_batches_running_at_once() -> None:
    poller, handler, thread = start(lanes=8, maximum_concurrency=3)
    # Three run; the loop has seen the other lanes ready and left them waiting.
    eventually(lambda: handler.running == 3 and poller._starved)
    assert poller._in_flight == 3
    handler.release.set()
    thread.join(DEADLINE_S)
    assert handler.peak == 3
    assert sorted(handler.done, key=int) == [f"{i}".encode() for i in range(8)]


def test_without_it_every_lane_runs_a_batch() -> None:
    _, handler, thread = start(lanes=4, maximum_concurrency=0)
    eventually(lambda: handler.running == 4)
    handler.release.set()
    thread.join(DEADLINE_S)
    assert handler.peak == 4 and len(handler.done) == 4
