"""Thread isolation: a function's handler on threads of the worker's own process, with its
variables and import path lent to the process while it runs (see `ThreadInvoker`)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from workers.engine.invoker import FunctionSpec, InvocationRequest
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
from workers.invoke.context import LambdaContext, new_log_stream_name
from workers.invoke.loading import InitFailure, error_info, function_environment, load_handler
from workers.invoke.scope import Layer, ProcessScope
from workers.invoke.shared import (
    ENCODE_OPTIONS,
    ERROR,
    RETRY,
    THROTTLED,
    AsyncRunner,
    Stats,
    call_handler,
    exit_error,
    exit_reason,
    marshal_message,
    shutdown_error,
    timeout_error,
)


class _Job:
    """One invocation handed to a handler thread; `finish` is first-wins, `wait` blocks on it."""

    __slots__ = ("_done", "_lock", "context", "event", "handler", "result")

    def __init__(self, handler: Callable[..., Any], event: Any, context: LambdaContext) -> None:
        self.handler = handler
        self.event = event
        self.context = context
        self.result: InvokeResult | None = None
        # A held lock rather than an Event: released once, it is the cheaper hand-off.
        self._done = threading.Lock()
        self._done.acquire()
        self._lock = threading.Lock()  # the result is set once, by whoever comes first

    def finish(self, result: InvokeResult) -> bool:
        """Record the handler's result, a timeout or a shutdown, whichever comes first."""
        with self._lock:
            if self.result is not None:
                return False
            self.result = result
        self._done.release()
        return True

    def wait(self, timeout_s: float) -> bool:
        return self._done.acquire(timeout=timeout_s)


class _HandlerThread:
    """A thread that runs handlers; one abandoned by a timeout rejoins the pool when done."""

    def __init__(self, invoker: ThreadInvoker) -> None:
        self._invoker = invoker
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._runner = AsyncRunner()
        self._thread = threading.Thread(
            target=self._main, name=f"esm-handler:{invoker.spec.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job | None) -> None:
        self._jobs.put(job)

    def _main(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                job.finish(self._call(job))
                del job
                if not self._invoker._rejoin(self):
                    return
        finally:
            self._runner.close()
            self._invoker._thread_exited(self)

    def _call(self, job: _Job) -> InvokeResult:
        scope, layer = self._invoker.scope, self._invoker.layer
        # Entered on this thread, not the caller's: a handler that outlives its timeout keeps
        # its variables until it returns.
        scope.enter(layer)
        try:
            tag, value = call_handler(job.handler, job.event, job.context, self._runner)
        except MemoryError as exc:
            # The whole worker is short of memory; nothing to recycle under thread isolation.
            return FunctionError(error_info(exc))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            return Crash(exit_error(job.context.aws_request_id, exit_reason(code)))
        finally:
            scope.leave(layer)
        if tag == RETRY:
            return RetryLater(value)
        if tag == THROTTLED:
            return Throttling(value)
        if tag == ERROR:
            return FunctionError(value)
        # Round-trip through JSON so that a response means the same as under process isolation.
        try:
            return Success(response=orjson.loads(orjson.dumps(value, option=ENCODE_OPTIONS)))
        except orjson.JSONEncodeError as exc:
            return InvalidResponse(ErrorInfo("Runtime.MarshalError", marshal_message(exc)))


class ThreadInvoker:
    """Runs the handler on threads of the worker process (`isolation: thread`).

    Cheaper than processes, with little containment. The function's variables and its import
    path (its code paths, then the working directory it was created in) are applied to
    os.environ and sys.path while its import or a call of its handler runs, through the
    process's `ProcessScope`, and
    taken back before another function of the process runs alone. What a thread cannot
    isolate, because the process has one of each:
    - os.environ and sys.path: two thread-isolated functions running at the same moment see
      each other's variables (the later one wins a name both set), and the worker's own code
      sees a function's variables between its invocations; variables a handler sets itself
      (other than the function's own) stay set for everything in the process; threads a
      handler starts see whatever is set when they look; C code reads the same environment;
    - sys.modules and module globals: a module is imported once per process, so two functions
      whose handler modules have the same name get the first one imported, and caches,
      clients and logging configuration made at import are shared;
    - the working directory, signal handlers, stdout and stderr;
    - the handler gets the caller's event object itself, not a copy (the engine builds a fresh
      event for every invocation);
    - `memory_mb` is not enforced, and a crash (os._exit, a segfault) takes the worker down;
    - handler output goes to the worker's own stdout/stderr, without the request id;
    - a thread cannot be killed: an invocation past `timeout_s` returns Timeout while its thread
      runs on until the handler returns, still using CPU and memory, possibly alongside
      `concurrency` newer invocations.
    """

    def __init__(
        self,
        spec: FunctionSpec,
        *,
        log: logging.Logger | None = None,
        scope: ProcessScope | None = None,
    ) -> None:
        if spec.concurrency < 1:
            raise ValueError(f"function {spec.name!r}: concurrency must be at least 1")
        self.spec = spec
        self.stats = Stats()
        self._log = log or logging.getLogger(f"workers.function.{spec.name}")
        self._log_stream_name = new_log_stream_name()
        self.scope = scope or ProcessScope.current()
        cwd = os.getcwd()
        variables = function_environment(
            spec,
            base=self.scope.unlayered(),
            log_stream_name=self._log_stream_name,
            task_root=spec.task_root(cwd),
        )
        self.layer = Layer(variables, spec.import_paths(cwd))
        self._slots = threading.BoundedSemaphore(spec.concurrency)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # held during the import, which may be slow
        self._handler: Callable[..., Any] | None = None
        self._idle: list[_HandlerThread] = []
        self._threads: set[_HandlerThread] = set()
        self._jobs: set[_Job] = set()
        self._closed = False

    def invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        result = self._invoke(event, request)
        with self._lock:
            self.stats.invocations += 1
            if isinstance(result, Timeout):
                self.stats.timeouts += 1
            elif isinstance(result, Crash):
                self.stats.crashes += 1
        return result

    def _invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        if self._closed:
            return Crash(shutdown_error(request.request_id))
        with self._slots:
            handler = self._handler or self._load()
            if isinstance(handler, FunctionError):
                return handler
            timeout_s = self.spec.timeout_s
            deadline = time.monotonic() + timeout_s
            context = LambdaContext(
                function_name=self.spec.name,
                memory_limit_in_mb=self.spec.memory_mb,
                aws_request_id=request.request_id,
                log_stream_name=self._log_stream_name,
                deadline_monotonic=deadline,
                mapping_name=request.mapping_name,
                attempt=request.attempt,
            )
            job = _Job(handler, event, context)
            with self._lock:
                if self._closed:
                    return Crash(shutdown_error(request.request_id))
                self._jobs.add(job)
                thread = self._idle.pop() if self._idle else self._new_thread()
            thread.submit(job)
            if not job.wait(timeout_s) and job.finish(Timeout(timeout_error(timeout_s))):
                self._log.warning(
                    "%s: request %s timed out after %.2f s; its thread keeps running",
                    self.spec.name,
                    request.request_id,
                    timeout_s,
                )
            with self._lock:
                self._jobs.discard(job)
            assert job.result is not None
            return job.result

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            jobs, self._jobs = self._jobs, set()
            idle, self._idle = self._idle, []
        for job in jobs:
            job.finish(Crash(shutdown_error(job.context.aws_request_id)))
        for thread in idle:
            thread.submit(None)
        self.scope.retire(self.layer)

    def _load(self) -> Callable[..., Any] | FunctionError:
        with self._load_lock:
            if self._handler is not None:
                return self._handler
            started = time.perf_counter()
            # Module-level code sees the function's variables and imports from its directory.
            self.scope.enter(self.layer)
            try:
                handler = load_handler(self.spec.handler)
            except InitFailure as failure:
                # Not cached: the next invocation imports again, as Lambda re-runs a failed init.
                return FunctionError(failure.error)
            finally:
                self.scope.leave(self.layer)
            self._handler = handler
            with self._lock:
                self.stats.cold_starts += 1
        self._log.debug(
            "cold start of %s: handler imported in %.1f ms",
            self.spec.name,
            (time.perf_counter() - started) * 1000,
        )
        return handler

    def _new_thread(self) -> _HandlerThread:
        # Under self._lock.
        thread = _HandlerThread(self)
        self._threads.add(thread)
        self.stats.environments = len(self._threads)
        thread.start()
        return thread

    def _rejoin(self, thread: _HandlerThread) -> bool:
        with self._lock:
            # Threads abandoned by timeouts come back here too; keep at most `concurrency`.
            if self._closed or len(self._idle) >= self.spec.concurrency:
                return False
            self._idle.append(thread)
            return True

    def _thread_exited(self, thread: _HandlerThread) -> None:
        with self._lock:
            self._threads.discard(thread)
            self.stats.environments = len(self._threads)
