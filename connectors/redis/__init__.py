"""Redis Streams, through redis-py."""

from __future__ import annotations

from typing import Any

from connectors.redis import config
from connectors.redis.shape import RedisShape
from workers.engine.ports import Connector, lazy


def _shape(event: dict[str, Any]) -> RedisShape:
    return RedisShape("")


CONNECTOR = Connector(
    name="redis",
    source_settings=config.RedisSource,
    destination_settings=config.RedisDestination,
    event_sources=("redis:streams",),
    shape_for_event=_shape,
    open_source=lazy("connectors.redis.source", "RedisSource"),
    open_destination=lazy("connectors.redis.destination", "RedisDestination"),
    open_store=lazy("connectors.redis.store", "RedisDeadLetterStore"),
    open_publisher=lazy("connectors.redis.publisher", "RedisSourcePublisher"),
    probe_source=lazy("connectors.redis.probe", "probe_redis"),
    probe_destination=lazy("connectors.redis.probe", "probe_destination"),
    open_rewinder=lazy("connectors.redis.rewind", "RedisRewinder"),
)
