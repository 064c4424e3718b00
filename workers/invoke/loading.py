"""Loading a handler as Lambda's Python runtime does: `module:function` (or `module.function`)
imported from the task root, Lambda's init error types, and the variables a function sees."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from workers.engine.invoker import FunctionSpec
from workers.engine.outcomes import ErrorInfo
from workers.invoke.context import LATEST, log_group_name

# Frames of the runtime itself (this package, asyncio) are cut from the top of a handler's stack.
_RUNTIME_FILES = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(asyncio.__file__)),
)


class InitFailure(Exception):
    """The handler could not be loaded; `error` is what Lambda reports for it."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def load_handler(handler: str) -> Callable[..., Any]:
    """Import `module:function` (or Lambda's `module.function`) with Lambda's init error types."""
    if ":" in handler:
        module_name, _, attribute = handler.partition(":")
    else:
        module_name, _, attribute = handler.rpartition(".")
    if not module_name or not attribute:
        raise InitFailure(
            ErrorInfo(
                "Runtime.MalformedHandlerName",
                f"Bad handler '{handler}': expected 'module:function'",
            )
        )
    # Messages and types follow Lambda's Python bootstrap (awslambdaric, `_get_handler`).
    try:
        module = import_module(module_name.replace("/", "."))
    except ImportError as exc:
        raise InitFailure(
            ErrorInfo(
                "Runtime.ImportModuleError",
                f"Unable to import module '{module_name}': {safe_str(exc)}",
            )
        ) from None
    except SyntaxError as exc:
        raise InitFailure(
            ErrorInfo(
                "Runtime.UserCodeSyntaxError",
                f"Syntax error in module '{module_name}': {safe_str(exc)}",
                [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}'],
            )
        ) from None
    except Exception as exc:
        # Module-level code raised: Lambda reports the exception itself.
        raise InitFailure(error_info(exc)) from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        raise InitFailure(
            ErrorInfo(
                "Runtime.HandlerNotFound",
                f"Handler '{attribute}' missing on module '{module_name}'",
            )
        )
    return function  # type: ignore[no-any-return]


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def error_info(exc: BaseException) -> ErrorInfo:
    """The exception as Lambda reports it: type name, message, the user's part of the stack."""
    return ErrorInfo(type(exc).__name__, safe_str(exc), _stack(exc))


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


def function_environment(
    spec: FunctionSpec, *, base: Mapping[str, str], log_stream_name: str, task_root: str
) -> dict[str, str]:
    """The function's variables, then Lambda's reserved ones (which a function cannot override).

    As in Lambda's Python runtime: AWS_REGION and AWS_DEFAULT_REGION (inherited from `base`,
    the worker's own environment, when set there, else the function's `region`, us-east-1 by
    default), AWS_EXECUTION_ENV naming the Python version, and LAMBDA_TASK_ROOT the directory
    the handler is imported from.
    """
    variables = {key: str(value) for key, value in spec.environment.items()}
    region = (
        variables.get("AWS_REGION")
        or base.get("AWS_REGION")
        or base.get("AWS_DEFAULT_REGION")
        or spec.region
    )
    variables.setdefault("AWS_DEFAULT_REGION", base.get("AWS_DEFAULT_REGION", region))
    variables.update(
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
    return variables


@contextmanager
def applied(spec: FunctionSpec, *, log_stream_name: str) -> Iterator[None]:
    """The function's variables (Lambda's reserved ones included) and code paths applied to this
    process while a block runs: a one-off import of its module, to check it.

    The modules imported from its code paths are forgotten afterwards, so that another
    function's module of the same name (each SAM function's `app.py`) is imported from its own
    code; libraries they imported from elsewhere stay imported.
    """
    overlay = function_environment(
        spec,
        base=os.environ,
        log_stream_name=log_stream_name,
        task_root=spec.task_root(os.getcwd()),
    )
    saved = {name: os.environ.get(name) for name in overlay}
    saved_path, before = list(sys.path), set(sys.modules)
    os.environ.update(overlay)
    sys.path[:0] = [p for p in spec.code_paths if p not in sys.path]
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        if spec.code_paths:
            sys.path[:] = saved_path
            roots = tuple(os.path.join(p, "") for p in spec.code_paths)
            for name in set(sys.modules) - before:
                where = getattr(sys.modules[name], "__file__", None) or ""
                if where.startswith(roots):
                    del sys.modules[name]
