"""Per-mapping counters: what `--summary-json` reports and the metrics are fed from."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class MappingStats:
    polled: int = 0
    filtered_out: int = 0
    invoked: int = 0  # records handed to the handler, counting re-invocations
    invocations: int = 0
    succeeded: int = 0
    retried: int = 0  # invocations that were retries of records already tried
    bisected: int = 0  # batch splits
    dead_lettered: int = 0
    dropped: int = 0  # exhausted records with no destination configured
    failed_invocations: int = 0
    checkpoints: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
            data["checkpoints"] = dict(self.checkpoints)
        return data
