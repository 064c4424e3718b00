"""The connectors this installation has, found through the `esm_workers.connectors` entry points.

A connector package registers a `workers.engine.ports.Connector` in its `pyproject.toml`:

    [project.entry-points."esm_workers.connectors"]
    kafka = "connectors.kafka:CONNECTOR"

Only the connector a mapping uses opens its driver, so a deployment needs only its broker's extra.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from workers.engine.ports import (
    Connector,
    DeadLetterStore,
    Destination,
    EventShape,
    Source,
    SourcePublisher,
)
from workers.engine.probing import SourceFacts
from workers.engine.rewind import Rewinder, RewindRefused

GROUP = "esm_workers.connectors"

log = logging.getLogger("connectors")


@functools.cache
def connectors() -> dict[str, Connector]:
    """Every registered connector by name, in entry-point order."""
    found: dict[str, Connector] = {}
    for entry in entry_points(group=GROUP):
        connector = entry.load()
        if not isinstance(connector, Connector):
            raise TypeError(f"entry point {entry.value!r} of {GROUP} is not a Connector")
        if connector.name in found:
            raise ValueError(f"two connectors are named {connector.name!r} ({entry.value!r})")
        found[connector.name] = connector
    return found


def _named(kind: str, what: str, mapping_name: str) -> Connector:
    connector = connectors().get(kind)
    if connector is None:
        raise ValueError(f"mapping {mapping_name}: no connector for {what} type {kind!r}")
    return connector


def _part(connector: Connector, part: str, what: str, mapping_name: str) -> Any:
    opener = getattr(connector, part)
    if opener is None:
        raise ValueError(f"mapping {mapping_name}: {connector.name} {what}")
    return opener


def open_source(mapping: Any, instance: int = 0) -> Source:
    connector = _named(mapping.source.type, "source", mapping.name)
    opener = _part(connector, "open_source", "is not a source", mapping.name)
    source: Source = opener(mapping, instance)
    return source


def open_destination(mapping: Any) -> Destination | None:
    if mapping.destination_config is None:
        return None
    dst = mapping.destination_config.on_failure
    connector = _named(dst.type, "destination", mapping.name)
    opener = _part(connector, "open_destination", "is not a destination", mapping.name)
    destination: Destination = opener(dst, mapping)
    return destination


def open_dead_letter_store(mapping: Any) -> DeadLetterStore:
    """The mapping's on-failure destination, read back for `workers dlq`."""
    if mapping.destination_config is None:
        raise ValueError(f"mapping {mapping.name} has no on-failure destination")
    dst = mapping.destination_config.on_failure
    connector = _named(dst.type, "destination", mapping.name)
    opener = _part(connector, "open_store", "letters cannot be read back", mapping.name)
    store: DeadLetterStore = opener(dst, mapping)
    return store


def open_source_publisher(mapping: Any) -> SourcePublisher:
    """Publishes records back onto the mapping's source (`dlq replay --to source`)."""
    src = mapping.source
    connector = _named(src.type, "source", mapping.name)
    opener = _part(connector, "open_publisher", "sources cannot be published to", mapping.name)
    publisher: SourcePublisher = opener(src)
    return publisher


def open_rewinder(mapping: Any) -> Rewinder:
    """The mapping's consumer group on its source (`workers rewind`)."""
    src = mapping.source
    opener = _named(src.type, "source", mapping.name).open_rewinder
    if opener is None:
        raise RewindRefused(
            f"mapping {mapping.name}: a {src.type} source cannot be rewound: not possible on a"
            " queue, which deletes each message once it is acked, so there is no earlier"
            " position to go back to (dead letters can be replayed: `workers dlq replay`)"
        )
    rewinder: Rewinder = opener(mapping)
    return rewinder


@dataclass(frozen=True, slots=True)
class Probed:
    """What `validate --connect` found of a mapping."""

    destination: list[str]  # what was checked of the destination (nothing when there is none)
    source: SourceFacts  # what the source's probe found out


def probe(mapping: Any) -> Probed:
    """Connect to the mapping's source and destination and disconnect (`validate --connect`)."""
    checked = []
    if mapping.destination_config is not None:
        dst = mapping.destination_config.on_failure
        check = _named(dst.type, "destination", mapping.name).probe_destination
        if check is not None:
            checked.append(check(dst))
    facts = SourceFacts()
    probe_source = _named(mapping.source.type, "source", mapping.name).probe_source
    if probe_source is not None:
        found = probe_source(mapping.source)
        if isinstance(found, SourceFacts):
            facts = found
    return Probed(checked, facts)


def shape_for_event(event: dict[str, Any]) -> EventShape:
    """The shape that built `event` (a handler's event, a dead letter's payload)."""
    source = event.get("eventSource")
    records = event.get("Records")
    if source is None and isinstance(records, list) and records and isinstance(records[0], dict):
        # Lambda's SQS event names its source in each record, not at the top.
        source = records[0].get("eventSource")
    for connector in connectors().values():
        if source in connector.event_sources and connector.shape_for_event is not None:
            return connector.shape_for_event(event)
    raise ValueError(f"not an event esm-workers builds: eventSource {source!r}")
