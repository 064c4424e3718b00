"""Process isolation: a pool of warm child processes per function, each reached over a pipe,
killed on a timeout and replaced after a crash (the child's side is `workers.invoke.child`)."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import TYPE_CHECKING, Any, Literal

import orjson

from workers.engine.invoker import FunctionSpec, InvocationRequest, PackedEvent, Staged
from workers.engine.outcomes import (
    Crash,
    ErrorInfo,
    FunctionError,
    InvalidResponse,
    InvokeResult,
    RetryLater,
    Success,
    Throttling,
    Timeout,
)
from workers.invoke.child import ChildConfig, child_main
from workers.invoke.context import new_log_stream_name
from workers.invoke.environment import LENGTH, LONG_LENGTH, Environment
from workers.invoke.loading import function_environment
from workers.invoke.scope import ProcessScope
from workers.invoke.shared import (
    ERROR,
    INIT_ERROR,
    INVOKE,
    LOG,
    MARSHAL,
    NOTHING_STAGED,
    OK,
    OOM,
    READY,
    RETRY,
    STAGED,
    THROTTLED,
    Stats,
    exit_error,
    exit_reason,
    shutdown_error,
    timeout_error,
)

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

# Lambda gives the init phase 10 s of its own; a longer function timeout raises that allowance.
INIT_TIMEOUT_S = 10.0


StartMethod = Literal["forkserver", "spawn"]


def _multiprocessing_context(method: StartMethod | None) -> ForkServerContext | SpawnContext:
    # forkserver forks each environment from a small single-threaded server: no copy of the
    # worker's threads or broker client state (as fork would), and cheaper than spawn.
    if method is None:
        available = multiprocessing.get_all_start_methods()
        method = "forkserver" if "forkserver" in available else "spawn"
    if method == "forkserver":
        context = multiprocessing.get_context("forkserver")
        # Environments fork from the server with the child's module already imported (a no-op
        # once the server runs). "__main__" is the default: the main module is imported once
        # there rather than again in every environment.
        context.set_forkserver_preload(["__main__", child_main.__module__])
        return context
    return multiprocessing.get_context("spawn")


class ProcessInvoker:
    """Up to `spec.concurrency` warm child processes, each serving one invocation at a time.

    A timed-out or crashed environment is killed and replaced on next use. `memory_mb` is
    enforced with RLIMIT_AS over the address space the environment had after importing the
    handler, so libraries that reserve large address ranges (some JIT and GPU runtimes) need
    a higher `memory_mb` than their resident use suggests; so do handlers that start many
    threads (each stack reserves 8 MiB).

    Events of shapes that pack (`PackingShape`) arrive packed and are built in the
    environment, on its own core.
    """

    def __init__(
        self,
        spec: FunctionSpec,
        *,
        log: logging.Logger | None = None,
        start_method: StartMethod | None = None,
        scope: ProcessScope | None = None,
    ) -> None:
        if spec.concurrency < 1:
            raise ValueError(f"function {spec.name!r}: concurrency must be at least 1")
        self.spec = spec
        self.stats = Stats()
        self._log = log or logging.getLogger(f"workers.function.{spec.name}")
        self._context = _multiprocessing_context(start_method)
        self._cwd = os.getcwd()
        # What the worker's process had, without the variables of thread-isolated functions.
        self._parent_environ = (scope or ProcessScope.current()).unlayered()
        self._init_timeout_s = max(INIT_TIMEOUT_S, spec.timeout_s)
        self._cond = threading.Condition()
        self._idle: list[Environment] = []  # a stack: the most recently used is the warmest
        self._live: set[Environment] = set()
        self._slots_used = 0  # environments alive or starting
        self._waiting = 0  # threads waiting in `_checkout` for an environment
        # Set while the mapping stops or is disabled: environments then start no staged batch
        # (`hold`). In memory they share: an environment decides the moment an invocation ends.
        self._holding: Synchronized[int] = self._context.Value("b", 0, lock=False)
        self._closed = False
        # Closed at exit before multiprocessing's own exit handler (registered earlier, so run
        # later), which would otherwise wait forever for children waiting on their pipe.
        atexit.register(self.close)

    def invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        # Encoded before checkout: an event that cannot be encoded fails here, costing no
        # environment, and no environment sits idle while a large event is encoded.
        return self._invoke(None, orjson.dumps(event), request, None)

    def invoke_packed(
        self, event: PackedEvent, request: InvocationRequest, then: Staged | None = None
    ) -> InvokeResult:
        # Sent as it is, with the name of what builds the event in the environment.
        return self._invoke(event.unpacker, event.payload, request, then)

    def collect(self, running: Staged, then: Staged | None = None) -> InvokeResult:
        env: Environment = running.handle
        running.handle = None

        def finish(then: Staged | None) -> InvokeResult:
            deadline = time.monotonic() + self.spec.timeout_s
            # The environment waits for this at the end of `running` (see `_frame`).
            frame = b"".join(self._staged_frame(then))
            sent = self._send(env, frame, running.request, deadline)
            return sent if sent is not None else self._finish(env, running.request, deadline, then)

        return self._with(env, then, finish)

    def hold(self, held: bool = True) -> None:
        self._holding.value = int(held)

    def abandon(self, running: Staged) -> None:
        env: Environment | None = running.handle
        running.handle = None
        if env is not None:
            env.kill()
            self._checkin(env, None)

    def _invoke(
        self,
        unpacker: str | None,
        encoded_event: bytes,
        request: InvocationRequest,
        then: Staged | None,
    ) -> InvokeResult:
        env = self._checkout(request)
        if not isinstance(env, Environment):
            self._count(env)
            return env
        return self._with(
            env, then, lambda then: self._run(env, unpacker, encoded_event, request, then)
        )

    def _with(
        self, env: Environment, then: Staged | None, go: Callable[[Staged | None], InvokeResult]
    ) -> InvokeResult:
        """`go(then)` on `env`, which then goes back to the pool unless it went on to `then`."""
        if self._waiting:
            then = None  # another lane waits for an environment: this one goes back after
        result: InvokeResult | None = None
        try:
            result = go(then)
        finally:
            # An environment that went on to the staged batch stays with its lane.
            if then is None or then.handle is None:
                self._checkin(env, result)
        self._count(result)
        return result

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._holding.value = 1
            idle, self._idle = self._idle, []
            busy = [env for env in self._live if env not in idle]
            self._cond.notify_all()
        # Kill everything first so that the waits below overlap.
        for env in idle + busy:
            env.kill()
        for env in idle:
            self._release(env)
        # Busy environments are reaped here (their invocations wake up with a Crash) and
        # released by the threads that own them.
        for env in busy:
            env.reap()
        atexit.unregister(self.close)

    # -- checkout / checkin --------------------------------------------------------------

    def _checkout(self, request: InvocationRequest) -> Environment | InvokeResult:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return Crash(shutdown_error(request.request_id))
                    if self._idle:
                        env: Environment | None = self._idle.pop()
                        break
                    if self._slots_used < self.spec.concurrency:
                        self._slots_used += 1
                        env = None
                        break
                    self._waiting += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._waiting -= 1
            if env is None:
                return self._start(request)
            if env.alive():
                return env
            # Died while idle (the kernel's OOM killer, an operator): not this invocation's fault.
            self._log.warning(
                "%s: environment pid %s died while idle (%s)",
                self.spec.name,
                env.pid,
                exit_reason(env.reap()),
            )
            self._release(env)

    def _checkin(self, env: Environment, result: InvokeResult | None) -> None:
        # After a timeout, a crash or an unexpected error the environment is gone or suspect.
        keep = isinstance(
            result, Success | FunctionError | RetryLater | Throttling | InvalidResponse
        )
        with self._cond:
            if keep and not self._closed:
                self._idle.append(env)
                self._cond.notify()
                return
        self._release(env)

    def _count(self, result: InvokeResult) -> None:
        with self._cond:
            self.stats.invocations += 1
            if isinstance(result, Timeout):
                self.stats.timeouts += 1
            elif isinstance(result, Crash):
                self.stats.crashes += 1

    def _release(self, env: Environment) -> None:
        env.release()
        with self._cond:
            if env in self._live:
                self._live.discard(env)
                self._slots_used -= 1
                self.stats.environments = len(self._live)
                self._cond.notify()

    # -- starting an environment (a cold start) -----------------------------------------

    def _start(self, request: InvocationRequest) -> Environment | InvokeResult:
        """Start a child in the slot reserved by the caller; on failure the slot is released."""
        started = time.perf_counter()
        log_stream_name = new_log_stream_name()
        environ = {
            **self._parent_environ,
            **function_environment(
                self.spec,
                base=self._parent_environ,
                log_stream_name=log_stream_name,
                task_root=self.spec.task_root(self._cwd),
            ),
        }
        config = ChildConfig(
            function_name=self.spec.name,
            handler=self.spec.handler,
            memory_mb=self.spec.memory_mb,
            environ=environ,
            paths=self.spec.import_paths(self._cwd),
            log_stream_name=log_stream_name,
        )
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=child_main,
            args=(child_conn, config, self._holding),
            name=f"esm-env:{self.spec.name}",
            # Not daemonic, so that handlers may start processes of their own.
            daemon=False,
        )
        try:
            process.start()
        except Exception as exc:  # fork/exec failures, a start method misconfigured
            parent_conn.close()
            with self._cond:
                self._slots_used -= 1
                self._cond.notify()
            self._log.error("cannot start an execution environment for %s: %s", self.spec.name, exc)
            return Crash(exit_error(request.request_id, f"Runtime failed to start: {exc}"))
        finally:
            child_conn.close()
        env = Environment(process, parent_conn)
        with self._cond:
            self._live.add(env)
            self.stats.environments = len(self._live)
            closed = self._closed
        if closed:
            self._release(env)
            return Crash(shutdown_error(request.request_id))

        deadline = time.monotonic() + self._init_timeout_s
        while True:
            message = env.receive(deadline)
            if isinstance(message, list) and message[0] == LOG:
                self._log_output(message)
                continue
            break
        result: InvokeResult
        if isinstance(message, list) and message[0] == READY:
            with self._cond:
                self.stats.cold_starts += 1
            self._log.debug(
                "cold start of %s: environment pid %s ready in %.1f ms (handler import %.1f ms)",
                self.spec.name,
                env.pid,
                (time.perf_counter() - started) * 1000,
                message[1],
            )
            return env
        if isinstance(message, list) and message[0] == INIT_ERROR:
            result = FunctionError(ErrorInfo(message[1], message[2], list(message[3])))
            self._log.debug("init of %s failed: %s", self.spec.name, message[2])
        elif message is False:
            result = Timeout(
                ErrorInfo(
                    "Sandbox.Timedout", f"Init timed out after {self._init_timeout_s:.2f} seconds"
                )
            )
        else:
            result = self._died(env, request)
        self._release(env)
        return result

    # -- one invocation ------------------------------------------------------------------

    def _frame(
        self,
        request: InvocationRequest | None,
        unpacker: str | None,
        encoded_event: bytes,
        *,
        staged: Staged | None = None,
        follows: bool = False,
    ) -> list[bytes]:
        # A header line, then the event as it is: JSON, or what `unpacker` builds it from.
        # `follows`: the worker sends a staged batch or word that none comes (a frame with no
        # request) right behind this invocation, and the environment waits for it at its end.
        if request is None:
            header = orjson.dumps([None, None, 0, 0, None, NOTHING_STAGED, False, False])
        else:
            kind = INVOKE if staged is None else STAGED
            items = staged is not None and staged.report_item_failures
            header = orjson.dumps(
                [
                    request.request_id,
                    request.mapping_name,
                    request.attempt,
                    self.spec.timeout_s,
                    unpacker,
                    kind,
                    items,
                    follows,
                ]
            )
        size = len(header) + 1 + len(encoded_event)
        # multiprocessing's framing, its parts joined by the caller for one write: send_bytes
        # writes the length and a large payload apart, and every write hands the GIL to the
        # loop thread.
        length = (
            LENGTH.pack(size) if size <= 0x7FFFFFFF else LENGTH.pack(-1) + LONG_LENGTH.pack(size)
        )
        return [length, header, b"\n", encoded_event]

    def _staged_frame(self, then: Staged | None) -> list[bytes]:
        """What goes to an environment behind an invocation: `then`, or word that none comes."""
        if then is None:
            return self._frame(None, None, b"")
        event = then.event
        return self._frame(then.request, event.unpacker, event.payload, staged=then, follows=True)

    def _run(
        self,
        env: Environment,
        unpacker: str | None,
        encoded_event: bytes,
        request: InvocationRequest,
        then: Staged | None,
    ) -> InvokeResult:
        deadline = time.monotonic() + self.spec.timeout_s
        parts = self._frame(request, unpacker, encoded_event, follows=then is not None)
        if then is not None:
            # One write for both: the staged batch is there before the invocation can end.
            parts += self._staged_frame(then)
        return self._send(env, b"".join(parts), request, deadline) or self._finish(
            env, request, deadline, then
        )

    def _send(
        self, env: Environment, data: bytes, request: InvocationRequest, deadline: float
    ) -> InvokeResult | None:
        """None once `data` is written; else the result of `request`, which `env` runs."""
        sent = env.send(data, deadline)
        if sent is True:
            return None
        return self._timed_out(env, request) if sent is False else self._died(env, request)

    def _finish(
        self,
        env: Environment,
        request: InvocationRequest,
        deadline: float,
        then: Staged | None,
    ) -> InvokeResult:
        """Wait for the result of `request`, which `env` is running."""
        while True:
            message = env.receive(deadline)
            if message is False:
                return self._timed_out(env, request)
            if message is None:
                return self._died(env, request)
            tag = message[0]
            if tag == LOG:
                self._log_output(message)
            elif tag == OK:
                if then is not None and len(message) > 2 and message[2]:
                    then.handle = env  # the environment went on to it
                return Success(response=message[1])
            elif tag == ERROR:
                return FunctionError(ErrorInfo(message[1], message[2], list(message[3])))
            elif tag == RETRY:
                return RetryLater(ErrorInfo(message[1], message[2], list(message[3])))
            elif tag == THROTTLED:
                return Throttling(ErrorInfo(message[1], message[2], list(message[3])))
            elif tag == MARSHAL:
                return InvalidResponse(ErrorInfo("Runtime.MarshalError", message[1]))
            elif tag == OOM:
                env.reap()
                self._log.info(
                    "%s: request %s exceeded the memory limit of %s MB; environment pid %s ended",
                    self.spec.name,
                    request.request_id,
                    self.spec.memory_mb,
                    env.pid,
                )
                return Crash(
                    exit_error(
                        request.request_id,
                        f"Runtime exited: memory limit of {self.spec.memory_mb} MB exceeded",
                        "Runtime.OutOfMemory",
                    )
                )
            else:
                env.reap()
                return Crash(exit_error(request.request_id, f"unexpected message {tag!r}"))

    def _timed_out(self, env: Environment, request: InvocationRequest) -> Timeout:
        env.reap()
        self._log.info(
            "%s: request %s timed out after %.2f s; environment pid %s killed",
            self.spec.name,
            request.request_id,
            self.spec.timeout_s,
            env.pid,
        )
        return Timeout(timeout_error(self.spec.timeout_s))

    def _died(self, env: Environment, request: InvocationRequest) -> Crash:
        exitcode = env.reap()
        with self._cond:
            closed = self._closed
        if closed:
            return Crash(shutdown_error(request.request_id))
        reason = exit_reason(exitcode)
        self._log.info(
            "%s: request %s: environment pid %s died: %s",
            self.spec.name,
            request.request_id,
            env.pid,
            reason,
        )
        return Crash(exit_error(request.request_id, reason))

    def _log_output(self, message: list[Any]) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        request_id = message[1]
        for line in message[2].splitlines():
            self._log.info("[%s] %s", request_id, line, extra={"aws_request_id": request_id})
