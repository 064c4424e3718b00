"""Where `workers dlq replay --to source` puts a record back: the unit it came from while the
mapping still reads it, else the mapping's first unit, said once per origin."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from workers.engine.ports import ConnectorConfigError
from workers.engine.records import Record

log = logging.getLogger("workers.dlq")


class ReplayRoutes:
    """`reads(name)`: whether the mapping reads that topic or stream; `fallback`: the ones it
    names literally, in configuration order; `where`: the broker, for messages."""

    def __init__(self, where: str, reads: Callable[[str], bool], fallback: Sequence[str]) -> None:
        self.where = where
        self._reads = reads
        self._fallback = list(fallback)
        self._warned: set[str] = set()

    def target(self, origin: str | None, record: Record) -> str:
        """Where `record` goes; `origin` is the topic or stream it came from, None when it came
        from another broker (then the first unit, without a warning)."""
        if origin is not None and self._reads(origin):
            return origin
        if not self._fallback:
            raise ConnectorConfigError(
                f"record {record.source}@{record.position}: the mapping reads nothing by name to"
                " replay it onto"
            )
        target = self._fallback[0]
        if origin is not None:
            self.warn_once(
                origin,
                f"{origin} is not a source of the mapping; replaying its records onto {target}",
            )
        return target

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("replay to %s: %s", self.where, message)
