"""`workers validate --connect` for on-failure destinations: what every connector's check shares."""

from __future__ import annotations

from workers.engine.ports import ConnectorConfigError

CONNECT_TIMEOUT_S = 5.0


class DestinationUnusable(ConnectorConfigError):
    """The on-failure destination cannot take letters as configured."""
