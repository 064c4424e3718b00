"""The seam between the engine and execution environments: one invocation in, one result out."""

from __future__ import annotations

import importlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from workers.engine.outcomes import InvokeResult

# The region a function sees when neither the environment nor the function names one; code
# that creates an AWS SDK client at import time fails without any.
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """A function as the configuration describes it (names follow Lambda's parameters)."""

    name: str
    handler: str  # "package.module:function"
    timeout_s: float = 30.0
    memory_mb: int = 512
    concurrency: int = 4
    isolation: Literal["process", "thread"] = "process"
    environment: dict[str, str] = field(default_factory=dict)
    region: str = DEFAULT_REGION  # AWS_REGION when the worker's environment sets none
    # Directories put first on the handler's import path, in order (a SAM function's CodeUri,
    # then its layers); the first is the function's task root. Empty: the working directory.
    code_paths: tuple[str, ...] = ()

    def task_root(self, cwd: str) -> str:
        """LAMBDA_TASK_ROOT: where the function's code is (its first code path, else `cwd`)."""
        return self.code_paths[0] if self.code_paths else cwd

    def import_paths(self, cwd: str) -> tuple[str, ...]:
        """What goes first on sys.path, in order: the code paths, then the working directory."""
        return (*self.code_paths, cwd) if cwd not in self.code_paths else self.code_paths


# Request ids from a generator seeded once, not uuid4's read of the OS's random source: that read
# releases the GIL, and the loop thread of a busy poller keeps it for up to a switch interval.
_IDS = random.Random()


def new_request_id() -> str:
    """A random (version 4) UUID, as Lambda's request ids are."""
    return str(uuid.UUID(int=_IDS.getrandbits(128), version=4))


@dataclass(frozen=True, slots=True)
class InvocationRequest:
    """What the context object of one invocation is built from."""

    request_id: str
    mapping_name: str
    attempt: int  # 1 for the first invocation of these records


@dataclass(frozen=True, slots=True)
class PackedEvent:
    """An event still in the compact form of its shape's `pack`: the environment that runs the
    handler calls `unpacker` (an importable "module:function") on `payload` to build it."""

    unpacker: str
    payload: bytes


@runtime_checkable
class PackingInvoker(Protocol):
    """An invoker whose environments run in other processes: it takes a batch packed by its
    event shape (`PackingShape`), and the event is built on the environment's core."""

    def invoke_packed(self, event: PackedEvent, request: InvocationRequest) -> InvokeResult:
        """As `Invoker.invoke`, for an event the environment builds with `unpack`."""
        ...


@dataclass(slots=True, eq=False)
class Staged:
    """A lane's next batch, handed to the environment of the invocation in progress with it
    (`StagingInvoker`): the environment starts it the moment that invocation ends, if that one
    succeeded wholly (`workers.engine.responses.whole_success`), and drops it otherwise. Its
    records then are invoked again in the usual way, after the current batch settled."""

    event: PackedEvent
    request: InvocationRequest
    report_item_failures: bool
    # Set by the invoker once the environment started it: `collect` waits for its result.
    handle: Any = None


@runtime_checkable
class StagingInvoker(Protocol):
    """A packing invoker that takes a lane's next batch along with the current one (`Staged`),
    so that the environment goes from one to the next without waiting for the poller."""

    def invoke_packed(
        self, event: PackedEvent, request: InvocationRequest, then: Staged | None = None
    ) -> InvokeResult:
        """As `PackingInvoker.invoke_packed`; with `then`, sets its `handle` if it started."""
        ...

    def collect(self, running: Staged, then: Staged | None = None) -> InvokeResult:
        """The result of a staged invocation that started (`running.handle` is set)."""
        ...

    def abandon(self, running: Staged) -> None:
        """End a staged invocation that started and whose result nobody will collect."""
        ...

    def hold(self, held: bool = True) -> None:
        """While held, environments drop staged batches rather than start them (any thread)."""
        ...


def unpack(event: PackedEvent) -> dict[str, Any]:
    """Build the event a `PackedEvent` stands for, in this process."""
    return _unpacker(event.unpacker)(event.payload)


_unpackers: dict[str, Callable[[bytes], dict[str, Any]]] = {}


def _unpacker(path: str) -> Callable[[bytes], dict[str, Any]]:
    function = _unpackers.get(path)
    if function is None:
        module, _, name = path.partition(":")
        function = _unpackers[path] = getattr(importlib.import_module(module), name)
    return function


class Invoker(Protocol):
    """Runs a function's handler on an event; never raises for handler misbehaviour."""

    def invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        """Blocks until the handler returned, raised, timed out or its environment died."""
        ...

    def close(self) -> None:
        """Stop every execution environment (waits for none of their work)."""
        ...
