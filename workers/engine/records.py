"""The record as the engine sees it: coordinates, key, payload and broker timestamp.

Connectors turn broker messages into `Record`s; the engine never looks inside `meta`, which holds
what a connector needs to build its Lambda event shape and to settle the record later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workers.engine.outcomes import ErrorInfo


@dataclass(slots=True, eq=False)
class Record:
    """One source record.

    `source` names the ordered unit it came from (a Kafka "topic-partition", a Redis stream, a
    RabbitMQ queue) and `position` its place there (offset, stream sequence, delivery order), so
    `(source, position)` is unique while the record is in flight.
    """

    source: str
    position: int
    value: bytes
    key: bytes | None = None
    timestamp_ms: int = 0
    headers: Sequence[tuple[str, bytes]] = ()
    # Deliveries the broker already counted before this one (x-delivery-count, XPENDING).
    attempts: int = 0
    redelivered: bool = False
    # Approximate bytes this record adds to an invocation payload (the event shape's encoding).
    size: int = 0
    # Connector-private data (delivery tag, stream id, topic, ...).
    meta: Any = None
    # Set when the connector could not turn the broker's message into a record of its event
    # shape (see workers.engine.ports.undecodable): the engine dead-letters it without invoking.
    fault: ErrorInfo | None = None

    @property
    def ident(self) -> tuple[str, int]:
        return (self.source, self.position)

    def __repr__(self) -> str:
        return f"Record({self.source}@{self.position})"
