"""ProcessScope: functions' variables and import paths lent to the process and taken back."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from workers.invoke.scope import Layer, ProcessScope

NAME = "ESM_TEST_SCOPE_VARIABLE"


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(NAME, raising=False)
    yield


def test_a_layer_stays_while_nothing_else_runs_and_goes_when_another_enters() -> None:
    scope = ProcessScope()
    alpha, beta = Layer({NAME: "alpha"}, ("/alpha",)), Layer({}, ("/beta",))

    scope.enter(alpha)
    assert (os.environ.get(NAME), sys.path[0]) == ("alpha", "/alpha")
    scope.leave(alpha)
    # Nothing else runs: left in place, so the next call of alpha costs nothing.
    assert (os.environ.get(NAME), sys.path[0]) == ("alpha", "/alpha")
    assert NAME not in scope.unlayered()

    scope.enter(beta)
    assert NAME not in os.environ
    assert "/alpha" not in sys.path
    assert sys.path[0] == "/beta"
    scope.leave(beta)
    scope.retire(beta)
    assert "/beta" not in sys.path


def test_overlapping_layers_later_wins_and_the_earlier_value_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(NAME, "worker")
    scope = ProcessScope()
    alpha, beta = Layer({NAME: "alpha"}, ("/same",)), Layer({NAME: "beta"}, ("/same",))

    scope.enter(alpha)
    scope.enter(beta)
    assert os.environ[NAME] == "beta"
    scope.leave(beta)  # alpha still runs: beta's value goes at once
    assert os.environ[NAME] == "alpha"
    assert "/same" in sys.path  # still alpha's
    scope.enter(alpha)  # a second call of alpha
    scope.leave(alpha)
    assert os.environ[NAME] == "alpha"
    scope.retire(alpha)  # closed with a call still running: kept until it ends
    assert os.environ[NAME] == "alpha"
    scope.leave(alpha)
    assert os.environ[NAME] == "worker"
    assert "/same" not in sys.path


def test_a_path_already_on_sys_path_is_left_there() -> None:
    scope = ProcessScope()
    present = sys.path[-1]
    layer = Layer({}, (present,))

    scope.enter(layer)
    scope.leave(layer)
    scope.retire(layer)

    assert sys.path[-1] == present


def test_one_scope_per_process() -> None:
    assert ProcessScope.current() is ProcessScope.current()
