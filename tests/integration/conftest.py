"""Fixtures the integration tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from tests import brokers


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the shared Redis server."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def names(client: redis.Redis) -> Iterator[Callable[[str], str]]:
    """Unique stream names for this test, deleted afterwards."""
    made: list[str] = []

    def name(prefix: str) -> str:
        made.append(brokers.unique_name(f"redis-{prefix}"))
        return made[-1]

    yield name
    if made:
        client.delete(*made)
