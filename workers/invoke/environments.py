"""Execution environments like Lambda's: warm child processes (or threads) that run a handler.

`create_invoker(spec)` picks the isolation named by `spec.isolation`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import io
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import resource
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import orjson

from workers.engine.invoker import FunctionSpec, InvocationRequest, Invoker
from workers.engine.outcomes import (
    Crash,
    ErrorInfo,
    FunctionError,
    InvalidResponse,
    InvokeResult,
    RetryableError,
    RetryLater,
    Success,
    Timeout,
)
from workers.invoke.context import LATEST, LambdaContext, log_group_name, new_log_stream_name
from workers.invoke.lifeline import die_with_parent

__all__ = ["ProcessInvoker", "Stats", "ThreadInvoker", "create_invoker"]

# Lambda gives the init phase 10 s of its own; a longer function timeout raises that allowance.
INIT_TIMEOUT_S = 10.0
# After SIGKILL a process is gone within milliseconds unless stuck in the kernel (D state).
_REAP_TIMEOUT_S = 5.0

# Child -> parent message tags; every message is an orjson array whose first item is a tag.
_READY = "ready"
_INIT_ERROR = "init_error"
_LOG = "log"
_OK = "ok"
_ERROR = "error"
_RETRY = "retry"
_MARSHAL = "marshal"
_OOM = "oom"

_ENCODE_OPTIONS = orjson.OPT_NON_STR_KEYS
_RUNTIME_FILES = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(asyncio.__file__)))

# Go's names for the signals, as Lambda prints them ("Runtime exited with error: signal: killed").
_SIGNAL_NAMES = {
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGTERM: "terminated",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating point exception",
    signal.SIGILL: "illegal instruction",
    signal.SIGINT: "interrupt",
    signal.SIGHUP: "hangup",
    signal.SIGPIPE: "broken pipe",
    signal.SIGQUIT: "quit",
}


@dataclass(slots=True)
class Stats:
    """Counters of one invoker; `environments` is how many execution environments are alive."""

    cold_starts: int = 0
    invocations: int = 0
    timeouts: int = 0
    crashes: int = 0
    environments: int = 0


def create_invoker(spec: FunctionSpec, *, log: logging.Logger | None = None) -> Invoker:
    if spec.isolation == "thread":
        return ThreadInvoker(spec, log=log)
    return ProcessInvoker(spec, log=log)


# --------------------------------------------------------------------------------------------
# Shared by both isolations: loading the handler, describing errors, the environment variables.


class _InitFailure(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _load_handler(handler: str) -> Callable[..., Any]:
    """Import `module:function` (or Lambda's `module.function`) with Lambda's init error types."""
    if ":" in handler:
        module_name, _, attribute = handler.partition(":")
    else:
        module_name, _, attribute = handler.rpartition(".")
    if not module_name or not attribute:
        raise _InitFailure(
            ErrorInfo(
                "Runtime.MalformedHandlerName",
                f"Bad handler '{handler}': expected 'module:function'",
            )
        )
    # Messages and types follow Lambda's Python bootstrap (awslambdaric, `_get_handler`).
    try:
        module = import_module(module_name.replace("/", "."))
    except ImportError as exc:
        raise _InitFailure(
            ErrorInfo(
                "Runtime.ImportModuleError",
                f"Unable to import module '{module_name}': {_safe_str(exc)}",
            )
        ) from None
    except SyntaxError as exc:
        raise _InitFailure(
            ErrorInfo(
                "Runtime.UserCodeSyntaxError",
                f"Syntax error in module '{module_name}': {_safe_str(exc)}",
                [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}'],
            )
        ) from None
    except Exception as exc:
        # Module-level code raised: Lambda reports the exception itself.
        raise _InitFailure(_error_info(exc)) from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        raise _InitFailure(
            ErrorInfo(
                "Runtime.HandlerNotFound",
                f"Handler '{attribute}' missing on module '{module_name}'",
            )
        )
    return function  # type: ignore[no-any-return]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _stack(exc: BaseException) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)
    # The user's stack starts at their handler: drop the runtime's own frames above it.
    first = 0
    while first < len(frames) and _is_runtime_frame(frames[first].filename):
        first += 1
    if first == len(frames):
        first = 0
    return traceback.format_list(frames[first:])


def _is_runtime_frame(filename: str) -> bool:
    return filename.startswith(_RUNTIME_FILES) or filename.startswith("<frozen importlib")


def _error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(type(exc).__name__, _safe_str(exc), _stack(exc))


# The region a function sees when neither the environment nor the function names one; code
# that creates an AWS SDK client at import time fails without any.
DEFAULT_REGION = "us-east-1"


def _function_environment(
    spec: FunctionSpec, log_stream_name: str, task_root: str
) -> dict[str, str]:
    """The function's variables, then Lambda's reserved ones (which a function cannot override).

    As in Lambda's Python runtime: AWS_REGION and AWS_DEFAULT_REGION (inherited when set, else
    us-east-1), AWS_EXECUTION_ENV naming the Python version, and LAMBDA_TASK_ROOT the directory
    the handler is imported from.
    """
    environment = {key: str(value) for key, value in spec.environment.items()}
    region = (
        environment.get("AWS_REGION")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION
    )
    environment.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", region))
    environment.update(
        AWS_REGION=region,
        AWS_EXECUTION_ENV=f"AWS_Lambda_python{sys.version_info.major}.{sys.version_info.minor}",
        LAMBDA_TASK_ROOT=task_root,
        AWS_LAMBDA_FUNCTION_NAME=spec.name,
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE=str(spec.memory_mb),
        AWS_LAMBDA_FUNCTION_VERSION=LATEST,
        AWS_LAMBDA_FUNCTION_TIMEOUT=str(math.ceil(spec.timeout_s)),
        AWS_LAMBDA_LOG_GROUP_NAME=log_group_name(spec.name),
        AWS_LAMBDA_LOG_STREAM_NAME=log_stream_name,
        _HANDLER=spec.handler,
    )
    return environment


def _timeout_error(timeout_s: float) -> ErrorInfo:
    # Lambda's exact wording: https://docs.aws.amazon.com/lambda/latest/dg/troubleshooting-invocation.html
    return ErrorInfo("Sandbox.Timedout", f"Task timed out after {timeout_s:.2f} seconds")


def _exit_error(request_id: str, reason: str, error_type: str = "Runtime.ExitError") -> ErrorInfo:
    return ErrorInfo(error_type, f"RequestId: {request_id} Error: {reason}")


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None or exitcode == 0:
        return "Runtime exited without providing a reason"
    if exitcode < 0:
        try:
            name = _SIGNAL_NAMES.get(signal.Signals(-exitcode), signal.Signals(-exitcode).name)
        except ValueError:
            name = f"signal {-exitcode}"
        return f"Runtime exited with error: signal: {name}"
    return f"Runtime exited with error: exit status {exitcode}"


def _shutdown_error(request_id: str) -> ErrorInfo:
    return _exit_error(request_id, "Runtime exited: execution environment was shut down")


def _marshal_message(exc: Exception) -> str:
    return f"Unable to marshal response: {_safe_str(exc)}"


# --------------------------------------------------------------------------------------------
# The child process: imports the handler once, then serves invocations from its pipe.


@dataclass(frozen=True)
class _ChildConfig:
    function_name: str
    handler: str
    memory_mb: int
    environ: dict[str, str]
    cwd: str
    log_stream_name: str


class _Channel:
    """The child's end of the pipe; the lock keeps frames whole when handler threads print."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.request_id = "init"
        self._lock = threading.Lock()

    def send(self, payload: bytes) -> None:
        with self._lock:
            self.conn.send_bytes(payload)

    def log(self, text: str) -> None:
        try:
            payload = orjson.dumps([_LOG, self.request_id, text])
        except orjson.JSONEncodeError:  # lone surrogates
            payload = orjson.dumps([_LOG, self.request_id, _printable(text)])
        # If the worker is gone, output has nowhere to go.
        with contextlib.suppress(OSError, ValueError):
            self.send(payload)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _PipeWriter(io.TextIOBase):
    """sys.stdout/sys.stderr of the child: whole lines go to the worker's log over the pipe."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, channel: _Channel, fd: int) -> None:
        super().__init__()
        self._channel = channel
        self._fd = fd
        self._pending = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # Code that needs a real descriptor (faulthandler, subprocess) gets the inherited one.
        return self._fd

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self._lock:
            if "\n" not in s:
                self._pending += s
                return len(s)
            lines, _, self._pending = (self._pending + s).rpartition("\n")
        self._channel.log(lines)
        return len(s)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, ""
        if pending:
            self._channel.log(pending)


def _child_main(conn: Connection, config: _ChildConfig) -> None:
    # Ctrl-C reaches the whole process group, but the worker drains in-flight invocations on
    # SIGINT: the environments must outlive it. SIGTERM keeps its default so stray ones can go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # But not their poller: an environment busy in a handler would never see its pipe close.
    die_with_parent()
    os.environ.clear()
    os.environ.update(config.environ)
    if not sys.path or sys.path[0] != config.cwd:
        sys.path.insert(0, config.cwd)
    channel = _Channel(conn)
    stdout, stderr = _PipeWriter(channel, 1), _PipeWriter(channel, 2)
    sys.stdout, sys.stderr = stdout, stderr
    # Lambda's runtime puts a handler on the root logger, so `logger.setLevel(INFO)` is enough
    # for a handler's log lines to appear (and `logging.basicConfig` is a no-op, as there).
    root_handler = logging.StreamHandler(stderr)
    root_handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    logging.getLogger().addHandler(root_handler)
    _limit_malloc_arenas()

    started = time.perf_counter()
    try:
        handler = _load_handler(config.handler)
    except _InitFailure as failure:
        stdout.flush()
        stderr.flush()
        error = failure.error
        channel.send(
            orjson.dumps([_INIT_ERROR, error.error_type, error.message, error.stack_trace])
        )
        return
    init_ms = (time.perf_counter() - started) * 1000
    _limit_address_space(config.memory_mb)
    stdout.flush()
    stderr.flush()
    channel.send(orjson.dumps([_READY, init_ms]))
    _serve(channel, handler, config, (stdout, stderr))


def _serve(
    channel: _Channel,
    handler: Callable[..., Any],
    config: _ChildConfig,
    outputs: tuple[_PipeWriter, _PipeWriter],
) -> None:
    runner = _AsyncRunner()
    while True:
        try:
            try:
                data = channel.conn.recv_bytes()
            except (EOFError, OSError):
                return  # the worker closed the pipe or died
            reply = _invoke_once(channel, handler, config, runner, data)
            del data
            for output in outputs:
                output.flush()
            channel.send(reply)
        except MemoryError:
            # Past RLIMIT_AS the interpreter's state is unknown: report it, and exit so that the
            # worker replaces this environment.
            try:
                for output in outputs:
                    output.flush()
                channel.send(orjson.dumps([_OOM]))
            finally:
                os._exit(1)


def _invoke_once(
    channel: _Channel,
    handler: Callable[..., Any],
    config: _ChildConfig,
    runner: _AsyncRunner,
    data: bytes,
) -> bytes:
    request_id, mapping_name, attempt, deadline, event = orjson.loads(data)
    channel.request_id = request_id
    context = LambdaContext(
        function_name=config.function_name,
        memory_limit_in_mb=config.memory_mb,
        aws_request_id=request_id,
        log_stream_name=config.log_stream_name,
        deadline_monotonic=deadline,
        mapping_name=mapping_name,
        attempt=attempt,
    )
    tag, value = _call_handler(handler, event, context, runner)
    if tag == _OK:
        try:
            return orjson.dumps([_OK, value], option=_ENCODE_OPTIONS)
        except orjson.JSONEncodeError as exc:
            return orjson.dumps([_MARSHAL, _marshal_message(exc)])
    error: ErrorInfo = value
    reply = [tag, error.error_type, error.message, error.stack_trace]
    try:
        return orjson.dumps(reply)
    except orjson.JSONEncodeError:
        # An error description with lone surrogates: keep it readable rather than lose it.
        stack = [_printable(line) for line in error.stack_trace]
        return orjson.dumps([tag, _printable(error.error_type), _printable(error.message), stack])


class _AsyncRunner:
    """One event loop per execution environment, created on the first async invocation."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, awaitable: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        return self._loop.run_until_complete(awaitable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None


def _call_handler(
    handler: Callable[..., Any], event: Any, context: LambdaContext, runner: _AsyncRunner
) -> tuple[str, Any]:
    """(_OK, return value) or (_ERROR / _RETRY, ErrorInfo); MemoryError propagates."""
    try:
        result = handler(event, context)
        if inspect.isawaitable(result):
            result = runner.run(result)
    except RetryableError as exc:
        return _RETRY, _error_info(exc)
    except MemoryError:
        raise
    except Exception as exc:
        return _ERROR, _error_info(exc)
    return _OK, result


def _limit_malloc_arenas() -> None:
    # glibc reserves 64 MiB of address space for each malloc arena (up to one per thread);
    # under RLIMIT_AS that reserve would count as memory the handler never used.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _limit_address_space(memory_mb: int) -> None:
    """Cap the address space at what the interpreter and handler module use, plus memory_mb."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[0])
    except (OSError, ValueError, IndexError):
        return  # not Linux: no limit
    limit = pages * os.sysconf("SC_PAGE_SIZE") + memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# --------------------------------------------------------------------------------------------
# The worker side of process isolation.


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class _Environment:
    """One child process and the worker's end of its pipe.

    The thread that checked it out (or is starting it) owns it; `close()` of the invoker may
    kill and reap it from another thread, but only the owner releases its descriptors.
    """

    __slots__ = ("_lock", "_poller", "_released", "conn", "conn_fd", "exitcode", "pid", "process")

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.pid = process.pid
        self.conn = conn
        self.conn_fd = conn.fileno()
        self.exitcode: int | None = None
        # One poll set over the pipe and the process sentinel, built once: a reply and a death
        # both wake the waiting thread at once.
        self._poller = select.poll()
        self._poller.register(self.conn_fd, select.POLLIN)
        self._poller.register(process.sentinel, select.POLLIN)
        self._lock = threading.Lock()
        self._released = False

    def receive(self, deadline: float) -> list[Any] | Literal[False] | None:
        """The next message; None if the process died; False once the deadline has passed."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = self._poller.poll(math.ceil(remaining * 1000))
            if not ready:
                continue
            # The pipe before the sentinel: what the child sent before it died still counts.
            if not any(fd == self.conn_fd for fd, _ in ready):
                return None
            try:
                message = orjson.loads(self.conn.recv_bytes())
            except (EOFError, OSError, orjson.JSONDecodeError):
                return None
            return message if isinstance(message, list) and message else None

    def alive(self) -> bool:
        return not _readable(self.process.sentinel)

    def kill(self) -> None:
        with self._lock:
            if self.exitcode is None and not self._released and self.alive():
                self.process.kill()

    def reap(self) -> int | None:
        """Kill if needed and wait for the process; safe from any thread, any number of times."""
        with self._lock:
            if self.exitcode is None and not self._released:
                if self.alive():
                    self.process.kill()
                self.process.join(_REAP_TIMEOUT_S)
                self.exitcode = self.process.exitcode
            return self.exitcode

    def release(self) -> None:
        """Reap, then close the pipe and the process handle (by the owner only)."""
        self.reap()
        with self._lock:
            if self._released:
                return
            self._released = True
            self.conn.close()
            if self.exitcode is not None:
                self.process.close()


_open_invokers: weakref.WeakSet[ProcessInvoker] = weakref.WeakSet()


@atexit.register
def _close_open_invokers() -> None:
    # Runs before multiprocessing's own exit handler (registered earlier), which would otherwise
    # wait forever for children that are waiting on their pipe.
    for invoker in list(_open_invokers):
        invoker.close()


StartMethod = Literal["forkserver", "spawn"]


def _multiprocessing_context(method: StartMethod | None) -> ForkServerContext | SpawnContext:
    # forkserver forks each environment from a small single-threaded server: no copy of the
    # worker's threads or broker client state (as fork would), and cheaper than spawn.
    if method is None:
        available = multiprocessing.get_all_start_methods()
        method = "forkserver" if "forkserver" in available else "spawn"
    if method == "forkserver":
        context = multiprocessing.get_context("forkserver")
        # Environments fork from the server with this module already imported (a no-op once
        # the server runs). "__main__" is the default: the main module is imported once there
        # rather than again in every environment.
        context.set_forkserver_preload(["__main__", __name__])
        return context
    return multiprocessing.get_context("spawn")


class ProcessInvoker:
    """Up to `spec.concurrency` warm child processes, each serving one invocation at a time.

    A timed-out or crashed environment is killed and replaced on next use. `memory_mb` is
    enforced with RLIMIT_AS over the address space the environment had after importing the
    handler, so libraries that reserve large address ranges (some JIT and GPU runtimes) need
    a higher `memory_mb` than their resident use suggests; so do handlers that start many
    threads (each stack reserves 8 MiB).
    """

    def __init__(
        self,
        spec: FunctionSpec,
        *,
        log: logging.Logger | None = None,
        start_method: StartMethod | None = None,
    ) -> None:
        if spec.concurrency < 1:
            raise ValueError(f"function {spec.name!r}: concurrency must be at least 1")
        self.spec = spec
        self.stats = Stats()
        self._log = log or logging.getLogger(f"workers.function.{spec.name}")
        self._context = _multiprocessing_context(start_method)
        self._cwd = os.getcwd()
        self._parent_environ = dict(os.environ)
        self._init_timeout_s = max(INIT_TIMEOUT_S, spec.timeout_s)
        self._cond = threading.Condition()
        self._idle: list[_Environment] = []  # a stack: the most recently used is the warmest
        self._live: set[_Environment] = set()
        self._slots_used = 0  # environments alive or starting
        self._closed = False
        _open_invokers.add(self)

    def invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        # Encoded before checkout: an event that cannot be encoded fails here, costing no
        # environment, and no environment sits idle while a large event is encoded.
        encoded_event = orjson.dumps(event)
        env = self._checkout(request)
        if not isinstance(env, _Environment):
            self._count(env)
            return env
        result: InvokeResult | None = None
        try:
            result = self._run(env, encoded_event, request)
        finally:
            self._checkin(env, result)
        self._count(result)
        return result

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
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
        _open_invokers.discard(self)

    # -- checkout / checkin --------------------------------------------------------------

    def _checkout(self, request: InvocationRequest) -> _Environment | InvokeResult:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return Crash(_shutdown_error(request.request_id))
                    if self._idle:
                        env: _Environment | None = self._idle.pop()
                        break
                    if self._slots_used < self.spec.concurrency:
                        self._slots_used += 1
                        env = None
                        break
                    self._cond.wait()
            if env is None:
                return self._start(request)
            if env.alive():
                return env
            # Died while idle (the kernel's OOM killer, an operator): not this invocation's fault.
            self._log.warning(
                "%s: environment pid %s died while idle (%s)",
                self.spec.name,
                env.pid,
                _exit_reason(env.reap()),
            )
            self._release(env)

    def _checkin(self, env: _Environment, result: InvokeResult | None) -> None:
        # After a timeout, a crash or an unexpected error the environment is gone or suspect.
        keep = isinstance(result, Success | FunctionError | RetryLater | InvalidResponse)
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

    def _release(self, env: _Environment) -> None:
        env.release()
        with self._cond:
            if env in self._live:
                self._live.discard(env)
                self._slots_used -= 1
                self.stats.environments = len(self._live)
                self._cond.notify()

    # -- starting an environment (a cold start) -----------------------------------------

    def _start(self, request: InvocationRequest) -> _Environment | InvokeResult:
        """Start a child in the slot reserved by the caller; on failure the slot is released."""
        started = time.perf_counter()
        log_stream_name = new_log_stream_name()
        environ = {
            **self._parent_environ,
            **_function_environment(self.spec, log_stream_name, self._cwd),
        }
        config = _ChildConfig(
            function_name=self.spec.name,
            handler=self.spec.handler,
            memory_mb=self.spec.memory_mb,
            environ=environ,
            cwd=self._cwd,
            log_stream_name=log_stream_name,
        )
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(child_conn, config),
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
            return Crash(_exit_error(request.request_id, f"Runtime failed to start: {exc}"))
        finally:
            child_conn.close()
        env = _Environment(process, parent_conn)
        with self._cond:
            self._live.add(env)
            self.stats.environments = len(self._live)
            closed = self._closed
        if closed:
            self._release(env)
            return Crash(_shutdown_error(request.request_id))

        deadline = time.monotonic() + self._init_timeout_s
        while True:
            message = env.receive(deadline)
            if isinstance(message, list) and message[0] == _LOG:
                self._log_output(message)
                continue
            break
        result: InvokeResult
        if isinstance(message, list) and message[0] == _READY:
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
        if isinstance(message, list) and message[0] == _INIT_ERROR:
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

    def _run(
        self, env: _Environment, encoded_event: bytes, request: InvocationRequest
    ) -> InvokeResult:
        timeout_s = self.spec.timeout_s
        deadline = time.monotonic() + timeout_s
        # [request_id, mapping_name, attempt, deadline, event] without re-encoding the event.
        header = orjson.dumps([request.request_id, request.mapping_name, request.attempt, deadline])
        payload = b"".join((header[:-1], b",", encoded_event, b"]"))
        try:
            env.conn.send_bytes(payload)
        except OSError:
            return self._died(env, request)
        del payload
        while True:
            message = env.receive(deadline)
            if message is False:
                env.reap()
                self._log.info(
                    "%s: request %s timed out after %.2f s; environment pid %s killed",
                    self.spec.name,
                    request.request_id,
                    timeout_s,
                    env.pid,
                )
                return Timeout(_timeout_error(timeout_s))
            if message is None:
                return self._died(env, request)
            tag = message[0]
            if tag == _LOG:
                self._log_output(message)
            elif tag == _OK:
                return Success(response=message[1])
            elif tag == _ERROR:
                return FunctionError(ErrorInfo(message[1], message[2], list(message[3])))
            elif tag == _RETRY:
                return RetryLater(ErrorInfo(message[1], message[2], list(message[3])))
            elif tag == _MARSHAL:
                return InvalidResponse(ErrorInfo("Runtime.MarshalError", message[1]))
            elif tag == _OOM:
                env.reap()
                self._log.info(
                    "%s: request %s exceeded the memory limit of %s MB; environment pid %s ended",
                    self.spec.name,
                    request.request_id,
                    self.spec.memory_mb,
                    env.pid,
                )
                return Crash(
                    _exit_error(
                        request.request_id,
                        f"Runtime exited: memory limit of {self.spec.memory_mb} MB exceeded",
                        "Runtime.OutOfMemory",
                    )
                )
            else:
                env.reap()
                return Crash(_exit_error(request.request_id, f"unexpected message {tag!r}"))

    def _died(self, env: _Environment, request: InvocationRequest) -> Crash:
        exitcode = env.reap()
        with self._cond:
            closed = self._closed
        if closed:
            return Crash(_shutdown_error(request.request_id))
        reason = _exit_reason(exitcode)
        self._log.info(
            "%s: request %s: environment pid %s died: %s",
            self.spec.name,
            request.request_id,
            env.pid,
            reason,
        )
        return Crash(_exit_error(request.request_id, reason))

    def _log_output(self, message: list[Any]) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        request_id = message[1]
        for line in message[2].splitlines():
            self._log.info("[%s] %s", request_id, line, extra={"aws_request_id": request_id})


# --------------------------------------------------------------------------------------------
# Thread isolation.


class _Job:
    """One invocation handed to a handler thread; `finish` is first-wins, `wait` blocks on it."""

    __slots__ = ("_done", "context", "event", "handler", "result")

    def __init__(self, handler: Callable[..., Any], event: Any, context: LambdaContext) -> None:
        self.handler = handler
        self.event = event
        self.context = context
        self.result: InvokeResult | None = None
        # A held lock rather than an Event: released once, it is the cheaper hand-off.
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self, result: InvokeResult) -> bool:
        """Record the handler's result, a timeout or a shutdown, whichever comes first."""
        with _job_lock:
            if self.result is not None:
                return False
            self.result = result
        self._done.release()
        return True

    def wait(self, timeout_s: float) -> bool:
        return self._done.acquire(timeout=timeout_s)


_job_lock = threading.Lock()


class _HandlerThread:
    """A thread that runs handlers; one abandoned by a timeout rejoins the pool when done."""

    def __init__(self, invoker: ThreadInvoker) -> None:
        self._invoker = invoker
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._runner = _AsyncRunner()
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
        try:
            tag, value = _call_handler(job.handler, job.event, job.context, self._runner)
        except MemoryError as exc:
            # The whole worker is short of memory; nothing to recycle under thread isolation.
            return FunctionError(_error_info(exc))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            return Crash(_exit_error(job.context.aws_request_id, _exit_reason(code)))
        if tag == _RETRY:
            return RetryLater(value)
        if tag == _ERROR:
            return FunctionError(value)
        # Round-trip through JSON so that a response means the same as under process isolation.
        try:
            return Success(response=orjson.loads(orjson.dumps(value, option=_ENCODE_OPTIONS)))
        except orjson.JSONEncodeError as exc:
            return InvalidResponse(ErrorInfo("Runtime.MarshalError", _marshal_message(exc)))


class ThreadInvoker:
    """Runs the handler on threads of the worker process (`isolation: thread`).

    Cheaper than processes, with no containment:
    - the handler gets the caller's event object itself, not a copy (the engine builds a fresh
      event for every invocation);
    - the function's environment variables are set in os.environ once, process-wide (two
      thread-isolated functions in one worker see each other's);
    - `memory_mb` is not enforced, and a crash (os._exit, a segfault) takes the worker down;
    - handler output goes to the worker's own stdout/stderr, without the request id;
    - a thread cannot be killed: an invocation past `timeout_s` returns Timeout while its thread
      runs on until the handler returns, still using CPU and memory, possibly alongside
      `concurrency` newer invocations.
    """

    def __init__(self, spec: FunctionSpec, *, log: logging.Logger | None = None) -> None:
        if spec.concurrency < 1:
            raise ValueError(f"function {spec.name!r}: concurrency must be at least 1")
        self.spec = spec
        self.stats = Stats()
        self._log = log or logging.getLogger(f"workers.function.{spec.name}")
        self._log_stream_name = new_log_stream_name()
        cwd = os.getcwd()
        os.environ.update(_function_environment(spec, self._log_stream_name, cwd))
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
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
            return Crash(_shutdown_error(request.request_id))
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
                    return Crash(_shutdown_error(request.request_id))
                self._jobs.add(job)
                thread = self._idle.pop() if self._idle else self._new_thread()
            thread.submit(job)
            if not job.wait(timeout_s) and job.finish(Timeout(_timeout_error(timeout_s))):
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
            job.finish(Crash(_shutdown_error(job.context.aws_request_id)))
        for thread in idle:
            thread.submit(None)

    def _load(self) -> Callable[..., Any] | FunctionError:
        with self._load_lock:
            if self._handler is not None:
                return self._handler
            started = time.perf_counter()
            try:
                handler = _load_handler(self.spec.handler)
            except _InitFailure as failure:
                # Not cached: the next invocation imports again, as Lambda re-runs a failed init.
                return FunctionError(failure.error)
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
