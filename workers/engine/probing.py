"""`workers validate --connect`: what every connector's checks share."""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.ports import ConnectorConfigError

CONNECT_TIMEOUT_S = 5.0


class DestinationUnusable(ConnectorConfigError):
    """The on-failure destination cannot take letters as configured."""


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What a source's probe found out that the mapping's settings should agree with."""

    # The broker takes a record away (to a dead-letter queue of its own) once it has been
    # delivered this many times: an SQS redrive policy's maxReceiveCount. None: it does not.
    max_deliveries: int | None = None
    # Where that limit is set, for messages: "queue orders's redrive policy (maxReceiveCount)".
    max_deliveries_set_by: str = ""
