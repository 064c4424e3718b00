"""Dead letters as JSON Lines files in a directory: needs no broker."""

from __future__ import annotations

from typing import Any

from connectors.file import config
from workers.engine.ports import Connector, DeadLetterStore, Destination


def _destination(dst: Any, mapping: Any) -> Destination:
    from connectors.file.destination import FileDestination

    return FileDestination(dst.path, mapping.name)


def _store(dst: Any, mapping: Any) -> DeadLetterStore:
    from connectors.file.destination import FileDeadLetterStore

    return FileDeadLetterStore(dst.path, mapping.name)


def _probe_destination(dst: Any) -> str:
    from connectors.file.probe import probe_destination

    return probe_destination(dst)


CONNECTOR = Connector(
    name="file",
    destination_settings=config.FileDestination,
    open_destination=_destination,
    open_store=_store,
    probe_destination=_probe_destination,
)
