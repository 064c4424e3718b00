"""Execution environments like Lambda's: warm child processes (or threads) that run a handler.

`create_invoker(spec)` picks the isolation named by `spec.isolation`.
"""

from __future__ import annotations

import logging

from workers.engine.invoker import FunctionSpec, Invoker
from workers.invoke.process_pool import ProcessInvoker
from workers.invoke.scope import ProcessScope
from workers.invoke.shared import Stats
from workers.invoke.thread_pool import ThreadInvoker

__all__ = ["ProcessInvoker", "ProcessScope", "Stats", "ThreadInvoker", "create_invoker"]


def create_invoker(
    spec: FunctionSpec, *, log: logging.Logger | None = None, scope: ProcessScope | None = None
) -> Invoker:
    """The invoker for `spec.isolation`; `scope` defaults to this process's own."""
    if spec.isolation == "thread":
        return ThreadInvoker(spec, log=log, scope=scope)
    return ProcessInvoker(spec, log=log, scope=scope)
