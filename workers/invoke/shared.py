"""What both isolations share: calling a handler, the invoker's counters, the wire tags of the
child's pipe, and the errors Lambda reports when a runtime times out or ends."""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from workers.engine.outcomes import ErrorInfo, RetryableError, Throttled
from workers.invoke.context import LambdaContext
from workers.invoke.loading import error_info, safe_str

# Child -> parent message tags; every message is an orjson array whose first item is a tag.
# OK, ERROR, RETRY and THROTTLED are also what `call_handler` answers under both isolations.
READY = "ready"
INIT_ERROR = "init_error"
LOG = "log"
OK = "ok"
ERROR = "error"
RETRY = "retry"
THROTTLED = "throttled"
MARSHAL = "marshal"
OOM = "oom"
# What a frame from the worker to an environment carries (its header's sixth field): an
# invocation, a lane's next batch staged behind it, or word that no staged batch comes.
INVOKE = 0
STAGED = 1
NOTHING_STAGED = 2

ENCODE_OPTIONS = orjson.OPT_NON_STR_KEYS

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
    """Counters of one invoker; `environments` is how many execution environments are alive.

    Written only under the owning invoker's lock; read without it (each is one int).
    """

    cold_starts: int = 0
    invocations: int = 0
    timeouts: int = 0
    crashes: int = 0
    environments: int = 0


class AsyncRunner:
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


def call_handler(
    handler: Callable[..., Any], event: Any, context: LambdaContext, runner: AsyncRunner
) -> tuple[str, Any]:
    """(OK, return value) or (ERROR / RETRY / THROTTLED, ErrorInfo); MemoryError propagates."""
    try:
        result = handler(event, context)
        if inspect.isawaitable(result):
            result = runner.run(result)
    except Throttled as exc:
        return THROTTLED, error_info(exc)
    except RetryableError as exc:
        return RETRY, error_info(exc)
    except MemoryError:
        raise
    except Exception as exc:
        return ERROR, error_info(exc)
    return OK, result


def timeout_error(timeout_s: float) -> ErrorInfo:
    # Lambda's exact wording: https://docs.aws.amazon.com/lambda/latest/dg/troubleshooting-invocation.html
    return ErrorInfo("Sandbox.Timedout", f"Task timed out after {timeout_s:.2f} seconds")


def exit_error(request_id: str, reason: str, error_type: str = "Runtime.ExitError") -> ErrorInfo:
    return ErrorInfo(error_type, f"RequestId: {request_id} Error: {reason}")


def exit_reason(exitcode: int | None) -> str:
    if exitcode is None or exitcode == 0:
        return "Runtime exited without providing a reason"
    if exitcode < 0:
        try:
            name = _SIGNAL_NAMES.get(signal.Signals(-exitcode), signal.Signals(-exitcode).name)
        except ValueError:
            name = f"signal {-exitcode}"
        return f"Runtime exited with error: signal: {name}"
    return f"Runtime exited with error: exit status {exitcode}"


def shutdown_error(request_id: str) -> ErrorInfo:
    return exit_error(request_id, "Runtime exited: execution environment was shut down")


def marshal_message(exc: Exception) -> str:
    return f"Unable to marshal response: {safe_str(exc)}"
