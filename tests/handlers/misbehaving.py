"""Handlers that succeed, fail and misbehave in every way an execution environment must survive."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from workers import Throttled
from workers.engine.outcomes import RetryableError

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)


def ok(event: Any, context: Any) -> dict[str, Any]:
    return {"ok": True}


def noop(event: Any, context: Any) -> None:
    return None


def echo(event: Any, context: Any) -> Any:
    return event


def raises(event: Any, context: Any) -> None:
    raise ValueError(f"bad record {event.get('n')}")


def retryable(event: Any, context: Any) -> None:
    raise RetryableError("downstream unavailable")


class RateLimited(Throttled):
    """A handler's own kind of throttle: a subclass is a throttle too."""


def throttled(event: Any, context: Any) -> None:
    raise RateLimited("429 from the downstream API")


def sleeps(event: Any, context: Any) -> dict[str, Any]:
    time.sleep(event["seconds"])
    return {"slept": event["seconds"]}


def prints_then_sleeps(event: Any, context: Any) -> None:
    print("sleeping now", flush=True)
    time.sleep(event["seconds"])


def os_exit(event: Any, context: Any) -> None:
    os._exit(event.get("status", 3))


def sigkill_self(event: Any, context: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def alloc(event: Any, context: Any) -> dict[str, Any]:
    block = bytearray(event["mb"] * 1024 * 1024)
    # Touch every page so the memory is really used, not just reserved.
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    return {"allocated_mb": event["mb"]}


def returns_garbage(event: Any, context: Any) -> Any:
    return {"items": {1, 2, 3}, "raw": object()}


async def async_echo(event: Any, context: Any) -> Any:
    await asyncio.sleep(0.01)
    return {"async": True, "event": event}


def prints(event: Any, context: Any) -> None:
    print(f"hello from the handler: {event['word']}")
    print("partial line without newline", end="")
    sys.stderr.write("a line on stderr\n")
    logger.info("a log record: %s", event["word"])


def reads_env(event: Any, context: Any) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in event["names"]}


# Under thread isolation the test shares this module with the handler: it sees STARTED and
# opens GATE.
STARTED = threading.Event()
GATE = threading.Event()


def reads_env_when_let_through(event: Any, context: Any) -> dict[str, str | None]:
    STARTED.set()
    if not GATE.wait(timeout=20):
        raise TimeoutError("the test never opened the gate")
    return {name: os.environ.get(name) for name in event["names"]}


def context_attributes(event: Any, context: Any) -> dict[str, Any]:
    return {
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "aws_request_id": context.aws_request_id,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "mapping_name": context.mapping_name,
        "attempt": context.attempt,
        "identity": {
            "cognito_identity_id": context.identity.cognito_identity_id,
            "cognito_identity_pool_id": context.identity.cognito_identity_pool_id,
        },
        "client_context": context.client_context,
        "tenant_id": context.tenant_id,
    }


def logs_through_context(event: Any, context: Any) -> None:
    context.log("logged through context.log\n")


def pid(event: Any, context: Any) -> int:
    return os.getpid()
