"""Redis Streams, through redis-py."""

from __future__ import annotations

from typing import Any

from connectors.redis import config
from connectors.redis.shape import RedisShape
from workers.engine.ports import Connector, DeadLetterStore, Destination, Source, SourcePublisher


def _source(mapping: Any, instance: int) -> Source:
    from connectors.redis.source import RedisSource

    return RedisSource(mapping, instance)


def _destination(dst: Any, mapping: Any) -> Destination:
    from connectors.redis.destination import RedisDestination

    return RedisDestination(dst, mapping)


def _store(dst: Any, mapping: Any) -> DeadLetterStore:
    from connectors.redis.store import RedisDeadLetterStore

    return RedisDeadLetterStore(dst, mapping)


def _publisher(src: Any) -> SourcePublisher:
    from connectors.redis.publisher import RedisSourcePublisher

    return RedisSourcePublisher(src)


def _probe_source(src: Any) -> None:
    from connectors.redis.probe import probe_redis

    probe_redis(src)


def _probe_destination(dst: Any) -> str:
    from connectors.redis.probe import probe_destination

    return probe_destination(dst)


def _shape(event: dict[str, Any]) -> RedisShape:
    return RedisShape("")


CONNECTOR = Connector(
    name="redis",
    source_settings=config.RedisSource,
    destination_settings=config.RedisDestination,
    event_sources=("redis:streams",),
    shape_for_event=_shape,
    open_source=_source,
    open_destination=_destination,
    open_store=_store,
    open_publisher=_publisher,
    probe_source=_probe_source,
    probe_destination=_probe_destination,
)
