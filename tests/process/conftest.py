from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.engine.invoker import FunctionSpec
from workers.invoke import ProcessInvoker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def process_invokers() -> Iterator[Callable[[FunctionSpec], ProcessInvoker]]:
    """Process invokers for the test, closed after it with no environment left behind."""
    created: list[ProcessInvoker] = []

    def make(spec: FunctionSpec) -> ProcessInvoker:
        # The handler resolves against the working directory, as it does for `workers run`.
        with contextlib.chdir(ROOT):
            invoker = ProcessInvoker(spec)
        created.append(invoker)
        return invoker

    yield make
    for invoker in created:
        invoker.close()
    assert all(invoker.stats.environments == 0 for invoker in created)
