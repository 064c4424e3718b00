"""A thread-isolated function's environment variables and import path, applied to the worker's
process while its code runs and taken back once no longer needed.

os.environ and sys.path exist once per process, so a process has one `ProcessScope` that
lends them to its thread-isolated functions (see ThreadInvoker for what this cannot isolate).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True, eq=False)
class Layer:
    """One function's variables and the directories its handler is imported from."""

    variables: Mapping[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ()


class ProcessScope:
    """Applies layers to os.environ and sys.path, and restores them.

    A layer is applied while any of its imports or handler calls runs (`enter` ... `leave`).
    When it ends with nothing else running, it stays applied ("resident") so that the next
    invocation of the same function costs nothing, and is taken back as soon as another layer
    enters or its function is retired. When it ends while another layer runs, it is taken back
    at once: a function never keeps seeing the variables of one that has returned.

    While layers run at the same moment, each sees them all (the later one wins a name both
    set): the process has one os.environ.
    """

    # Keyed by process id: a forked child must not share its parent's bookkeeping.
    _per_process: ClassVar[dict[int, ProcessScope]] = {}

    @classmethod
    def current(cls) -> ProcessScope:
        """The scope of this process (the one owner of its os.environ and sys.path changes)."""
        pid = os.getpid()
        scope = cls._per_process.get(pid)
        if scope is None:
            # setdefault is atomic: two threads racing here end up with the same scope.
            scope = cls._per_process.setdefault(pid, cls())
        return scope

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Layer, int] = {}  # by how many imports and calls run, in entry order
        self._resident: Layer | None = None  # applied with nothing running
        # Layers of closed functions: taken back when their last call ends, never left resident.
        self._retired: weakref.WeakSet[Layer] = weakref.WeakSet()
        self._saved: dict[str, str | None] = {}  # each variable before any layer set it
        self._added_paths: set[str] = set()  # entries of sys.path inserted here

    def enter(self, layer: Layer) -> None:
        with self._lock:
            count = self._running.get(layer, 0)
            self._running[layer] = count + 1
            if count:
                return
            if self._resident is layer:
                self._resident = None
                return
            if self._resident is not None:
                resident, self._resident = self._resident, None
                self._take_back(resident)
            self._apply(layer)

    def leave(self, layer: Layer) -> None:
        with self._lock:
            count = self._running[layer] - 1
            if count:
                self._running[layer] = count
                return
            del self._running[layer]
            if not self._running and layer not in self._retired:
                self._resident = layer
                return
            self._retired.discard(layer)
            self._take_back(layer)

    def retire(self, layer: Layer) -> None:
        """The function is closed: take its layer back now, or when its last call ends."""
        with self._lock:
            if self._resident is layer:
                self._resident = None
                self._take_back(layer)
            else:
                self._retired.add(layer)

    def unlayered(self) -> dict[str, str]:
        """The process's variables as they are without any layer (what a child should inherit)."""
        with self._lock:
            environ = dict(os.environ)
            for name, value in self._saved.items():
                if value is None:
                    environ.pop(name, None)
                else:
                    environ[name] = value
        return environ

    # Both below run under the lock, with `_running` and `_resident` already updated.

    def _apply(self, layer: Layer) -> None:
        for name, value in layer.variables.items():
            current = os.environ.get(name)
            if name not in self._saved:
                self._saved[name] = current
            if current != value:
                os.environ[name] = value
        # Inserted last to first, so that they end up first on sys.path in their own order.
        for path in reversed(layer.paths):
            if path not in sys.path:
                sys.path.insert(0, path)
                self._added_paths.add(path)

    def _take_back(self, layer: Layer) -> None:
        # Only running layers remain applied (a resident layer exists only when none runs).
        others = list(self._running)
        for name in layer.variables:
            setters = [other for other in others if name in other.variables]
            value = setters[-1].variables[name] if setters else self._saved.pop(name, None)
            if value is None:
                os.environ.pop(name, None)
            elif os.environ.get(name) != value:
                os.environ[name] = value
        for path in layer.paths:
            if path in self._added_paths and not any(path in other.paths for other in others):
                self._added_paths.discard(path)
                if path in sys.path:
                    sys.path.remove(path)
