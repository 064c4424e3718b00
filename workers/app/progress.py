"""Progress of `workers run`: a live table on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from workers.app.supervisor import Supervisor

log = logging.getLogger("workers.progress")

COLUMNS = ("polled", "invoked", "succeeded", "retried", "dead_lettered", "dropped")


class LogProgress:
    """A line per mapping every `interval_s` seconds, for logs that are not a terminal."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = time.monotonic()

    def __call__(self, supervisor: Supervisor) -> None:
        if time.monotonic() - self._last < self.interval_s:
            return
        self._last = time.monotonic()
        for mapping, counts in supervisor.summary().items():
            log.info(
                "mapping %s: %s", mapping, " ".join(f"{c}={counts.get(c, 0)}" for c in COLUMNS)
            )

    def close(self) -> None:
        pass


class LiveProgress:
    """A rich table refreshed in place while the run goes on."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.live = Live(self._table({}), console=self.console, refresh_per_second=4)
        self.live.start()

    def __call__(self, supervisor: Supervisor) -> None:
        self.live.update(self._table(supervisor.summary()))

    def _table(self, summary: dict[str, Any]) -> Table:
        table = Table(title="esm-workers")
        table.add_column("mapping")
        for column in COLUMNS:
            table.add_column(column.replace("_", " "), justify="right")
        for mapping, counts in summary.items():
            table.add_row(mapping, *(f"{counts.get(c, 0):,}" for c in COLUMNS))
        return table

    def close(self) -> None:
        self.live.stop()


def progress_for_terminal() -> LogProgress | LiveProgress:
    return LiveProgress() if sys.stderr.isatty() else LogProgress()
