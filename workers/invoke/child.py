"""What runs inside an execution environment's child process: import the handler once, then
serve invocations from the pipe, with the handler's output sent back as log messages."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import orjson

from workers.engine.invoker import PackedEvent, unpack
from workers.engine.outcomes import ErrorInfo
from workers.engine.responses import whole_success
from workers.invoke.context import LambdaContext
from workers.invoke.lifeline import die_with_parent
from workers.invoke.loading import InitFailure, error_info, load_handler
from workers.invoke.shared import (
    ENCODE_OPTIONS,
    ERROR,
    INIT_ERROR,
    INVOKE,
    LOG,
    MARSHAL,
    OK,
    OOM,
    READY,
    STAGED,
    AsyncRunner,
    call_handler,
    marshal_message,
)

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized


@dataclass(frozen=True)
class ChildConfig:
    function_name: str
    handler: str
    memory_mb: int
    environ: dict[str, str]
    paths: tuple[str, ...]  # first on sys.path, in order: the code paths, the working directory
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
            payload = orjson.dumps([LOG, self.request_id, text])
        except orjson.JSONEncodeError:  # lone surrogates
            payload = orjson.dumps([LOG, self.request_id, _printable(text)])
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


def child_main(conn: Connection, config: ChildConfig, holding: Synchronized[int]) -> None:
    # Ctrl-C reaches the whole process group, but the worker drains in-flight invocations on
    # SIGINT: the environments must outlive it. SIGTERM keeps its default so stray ones can go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # But not their poller: an environment busy in a handler would never see its pipe close.
    die_with_parent()
    os.environ.clear()
    os.environ.update(config.environ)
    for path in reversed(config.paths):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
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
        handler = load_handler(config.handler)
    except InitFailure as failure:
        stdout.flush()
        stderr.flush()
        error = failure.error
        channel.send(orjson.dumps([INIT_ERROR, error.error_type, error.message, error.stack_trace]))
        return
    init_ms = (time.perf_counter() - started) * 1000
    # What the runtime and the handler's init built lives as long as the environment: the
    # collector need not walk it again after each invocation's garbage.
    gc.freeze()
    _limit_address_space(config.memory_mb)
    stdout.flush()
    stderr.flush()
    channel.send(orjson.dumps([READY, init_ms]))
    _serve(channel, handler, config, (stdout, stderr), holding)


def _serve(
    channel: _Channel,
    handler: Callable[..., Any],
    config: ChildConfig,
    outputs: tuple[_PipeWriter, _PipeWriter],
    holding: Synchronized[int],
) -> None:
    runner = AsyncRunner()
    frame: _Frame | None = None
    while True:
        try:
            if frame is None:
                try:
                    frame = _Frame(channel.conn.recv_bytes())
                except (EOFError, OSError):
                    return  # the worker closed the pipe or died
                if frame.header[5] != INVOKE:
                    frame = None  # a staged batch nothing went on to: never expected here
                    continue
            follows = frame.header[7]
            tag, value = _invoke_once(channel, handler, config, runner, frame)
            del frame
            for output in outputs:
                output.flush()
            # What the worker sent behind this invocation: a staged batch, or word of none.
            frame = _follower(channel) if follows else None
            go_on = (
                frame is not None
                and tag == OK
                and not holding.value  # the mapping stopping or disabled: nothing new starts
                and whole_success(value, frame.header[6])
            )
            reply, go_on = _reply(tag, value, go_on)
            if not go_on:
                frame = None  # its records are invoked again in the usual way
            channel.send(reply)
        except MemoryError:
            # Past RLIMIT_AS the interpreter's state is unknown: report it, and exit so that the
            # worker replaces this environment.
            try:
                for output in outputs:
                    output.flush()
                channel.send(orjson.dumps([OOM]))
            finally:
                os._exit(1)


class _Frame:
    """A frame from the worker: its header, read once, and the event after it.

    The header: [request id, mapping, attempt, timeout (s), unpacker, kind, report item
    failures, whether a frame follows this invocation's] (see `ProcessInvoker._frame`).
    """

    __slots__ = ("data", "header", "newline")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.newline = data.index(b"\n")
        self.header: list[Any] = orjson.loads(memoryview(data)[: self.newline])


def _follower(channel: _Channel) -> _Frame | None:
    """The staged batch the worker sent behind the invocation that ended, if it sent one."""
    try:
        frame = _Frame(channel.conn.recv_bytes())
    except (EOFError, OSError):
        return None  # the worker is gone; the reply goes nowhere either
    return frame if frame.header[5] == STAGED else None


def _invoke_once(
    channel: _Channel,
    handler: Callable[..., Any],
    config: ChildConfig,
    runner: AsyncRunner,
    frame: _Frame,
) -> tuple[str, Any]:
    data, newline = frame.data, frame.newline
    request_id, mapping_name, attempt, timeout_s, unpacker = frame.header[:5]
    deadline = time.monotonic() + timeout_s
    channel.request_id = request_id
    try:
        event = (
            orjson.loads(memoryview(data)[newline + 1 :])
            if unpacker is None
            else unpack(PackedEvent(unpacker, data[newline + 1 :]))
        )
    except Exception as exc:  # the event could not be built: the batch fails, never the child
        built = error_info(exc)
        return ERROR, ErrorInfo("Runtime.EventBuildError", built.message, built.stack_trace)
    context = LambdaContext(
        function_name=config.function_name,
        memory_limit_in_mb=config.memory_mb,
        aws_request_id=request_id,
        log_stream_name=config.log_stream_name,
        deadline_monotonic=deadline,
        mapping_name=mapping_name,
        attempt=attempt,
    )
    return call_handler(handler, event, context, runner)


def _reply(tag: str, value: Any, go_on: bool) -> tuple[bytes, bool]:
    """The reply to the worker, and whether the staged batch may still start (not if the
    response cannot be encoded: the worker sees an invalid response)."""
    if tag == OK:
        try:
            return orjson.dumps([OK, value, go_on], option=ENCODE_OPTIONS), go_on
        except orjson.JSONEncodeError as exc:
            return orjson.dumps([MARSHAL, marshal_message(exc)]), False
    error: ErrorInfo = value
    reply = [tag, error.error_type, error.message, error.stack_trace]
    try:
        return orjson.dumps(reply), False
    except orjson.JSONEncodeError:
        # An error description with lone surrogates: keep it readable rather than lose it.
        stack = [_printable(line) for line in error.stack_trace]
        return orjson.dumps(
            [tag, _printable(error.error_type), _printable(error.message), stack]
        ), False


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
