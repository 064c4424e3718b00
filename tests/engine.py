"""Helpers for engine tests: a direct invoker and a poller wired to the memory broker."""

from __future__ import annotations

import base64
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from connectors.memory.broker import (
    MemoryBroker,
    MemoryDestination,
    MemoryLogSource,
    MemoryQueueSource,
)
from workers.engine.batcher import BatchLimits
from workers.engine.clock import Clock, FakeClock
from workers.engine.invoker import InvocationRequest
from workers.engine.outcomes import (
    ErrorInfo,
    FunctionError,
    InvokeResult,
    RetryableError,
    RetryLater,
    Throttled,
    Throttling,
)
from workers.engine.outcomes import Success as Ok
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.events import records

Handler = Callable[[dict[str, Any], InvocationRequest], Any]


class DirectInvoker:
    """Calls a handler in the calling thread and records every invocation it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[tuple[InvocationRequest, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        with self._lock:
            self.calls.append((request, event))
        try:
            return Ok(self.handler(event, request))
        except Throttled as exc:
            return Throttling(ErrorInfo(type(exc).__name__, str(exc)))
        except RetryableError as exc:
            return RetryLater(ErrorInfo(type(exc).__name__, str(exc)))
        except Exception as exc:
            return FunctionError(
                ErrorInfo(type(exc).__name__, str(exc), traceback.format_exception(exc))
            )

    def close(self) -> None:
        pass


def kafka_items(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for part in event["records"].values() for item in part]


def rmq_items(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for q in event["rmqMessagesByQueue"].values() for item in q]


def value_of(item: dict[str, Any]) -> bytes:
    return base64.b64decode(item["value"] if "value" in item else item["data"])


def letter_values(letters: list[dict[str, Any]]) -> list[bytes]:
    out: list[bytes] = []
    for letter in letters:
        payload = letter["payload"]
        items = kafka_items(payload) if "records" in payload else rmq_items(payload)
        out.extend(value_of(i) for i in items)
    return out


def make_log_poller(
    broker: MemoryBroker,
    invoker: DirectInvoker,
    *,
    policy: Policy,
    destination: MemoryDestination | None,
    topic: str = "t",
    group: str = "g",
    batch_size: int = 100,
    window_s: float = 0.0,
    parallelization_factor: int = 1,
    record_filter: Callable[[Any], bool] | None = None,
    clock: Clock | None = None,
    stalled_after_s: float = 300.0,
) -> tuple[Poller, MemoryLogSource]:
    source = MemoryLogSource(broker, topic, group)
    poller = Poller(
        PollerSettings(
            mapping="m",
            function="f",
            limits=BatchLimits(batch_size=batch_size, maximum_batching_window_s=window_s),
            parallelization_factor=parallelization_factor,
            stalled_after_s=stalled_after_s,
        ),
        source=source,
        invoker=invoker,
        policy=policy,
        destination=destination,
        record_filter=record_filter,
        clock=clock or broker.clock,
    )
    return poller, source


def make_queue_poller(
    broker: MemoryBroker,
    invoker: DirectInvoker,
    *,
    policy: Policy,
    destination: MemoryDestination | None,
    queue: str = "q",
    batch_size: int = 100,
    parallelization_factor: int = 1,
    stalled_after_s: float = 300.0,
    broker_retries: bool = False,
    fifo: bool = False,
    maximum_concurrency: int = 0,
) -> tuple[Poller, MemoryQueueSource]:
    source = MemoryQueueSource(broker, queue, broker_retries=broker_retries, fifo=fifo)
    poller = Poller(
        PollerSettings(
            mapping="m",
            function="f",
            limits=BatchLimits(batch_size=batch_size, maximum_batching_window_s=0.0),
            parallelization_factor=parallelization_factor,
            stalled_after_s=stalled_after_s,
            maximum_concurrency=maximum_concurrency,
        ),
        source=source,
        invoker=invoker,
        policy=policy,
        destination=destination,
        clock=broker.clock,
    )
    return poller, source


def fake_broker() -> MemoryBroker:
    return MemoryBroker(clock=FakeClock())


# A bound on waiting for what must happen; reaching it fails the test.
DEADLINE_S = 10.0


class Held:
    """Keeps every invocation running until `release` is set; counts those running at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.done: list[bytes] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any], request: InvocationRequest) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.release.wait(DEADLINE_S)
        with self.lock:
            self.running -= 1
            self.done.extend(r.value for r in records(event))


def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, "did not happen"
        time.sleep(0.01)
