"""connectors.rabbitmq.url accepts and rejects an amqp:// URL's query parameters as pika does."""

from __future__ import annotations

import pika
import pytest

from connectors.rabbitmq.url import query_problems

QUERIES = [
    "heartbeat=abc",
    "heartbeat=-1",
    "heartbeat=0",
    "heartbeat=30",
    "heartbeat=1.5",
    "heartbeat=",
    "heartbeat=1&heartbeat=2",
    "channel_max=0",
    "channel_max=65535",
    "channel_max=65536",
    "frame_max=4095",
    "frame_max=131072",
    "frame_max=131073",
    "connection_attempts=0",
    "connection_attempts=3",
    "socket_timeout=0",
    "socket_timeout=0.5",
    "socket_timeout=x",
    "blocked_connection_timeout=0",
    "blocked_connection_timeout=-1",
    "retry_delay=-1",
    "retry_delay=x",
    "stack_timeout=0",
    "stack_timeout=2",
    "locale=en_US",
    "client_properties={'connection_name': 'x'}",
    "client_properties=x",
    "client_properties=[1]",
    "tcp_options={'TCP_KEEPIDLE': 60}",
    "tcp_options=[1]",
    "ssl_options=None",
    "ssl_options=x",
    "ssl_options={}",
    "bogus=1",
    "heartbeat=5&socket_timeout=2",
]


def pika_accepts(url: str) -> bool:
    try:
        pika.URLParameters(url)
    except (ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("scheme", ["amqp", "amqps"])
@pytest.mark.parametrize("query", QUERIES)
def test_the_same_verdict_as_pika(scheme: str, query: str) -> None:
    url = f"{scheme}://guest:guest@localhost:5672/%2f?{query}"
    problems = query_problems(url)
    assert (not problems) == pika_accepts(url), problems
