"""Log output for `workers` and its poller processes: readable lines, or JSON lines with
`--log-format json` (the format passes to pollers through the environment)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import orjson

# Read by every process `workers` starts, so pollers log in the format the command was given.
FORMAT_ENV = "WORKERS_LOG_FORMAT"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ms), level, logger, the poller it came from, message,
    and the exception's type, message and traceback when there is one."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, object] = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        if self.tag:
            entry["poller"] = self.tag
        entry["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            entry["errorType"] = record.exc_info[0].__name__
            entry["errorMessage"] = str(record.exc_info[1])
            entry["stackTrace"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: int = logging.INFO, tag: str = "", fmt: str | None = None) -> None:
    """Log to stderr at `level`; `tag` names the poller process (mapping#instance)."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        prefix = f"[{tag}] " if tag else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s {prefix}%(message)s")
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
