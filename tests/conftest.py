"""Shared fixtures. Broker fixtures skip their tests when a broker is unreachable, and fail them
instead when ``$CI`` is set (see tests/brokers.py and docs/brokers.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import brokers
from tests.faults.private import PrivateRabbit


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[brokers.Tansu]:
    """A Tansu broker on a free 127.0.0.1 port for the whole session; ``.bootstrap`` is its
    address. Tests that stop, kill or restart a broker use ``own_kafka_broker``."""
    broker = brokers.Tansu(binary=brokers.require_tansu())
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def own_kafka_broker() -> Iterator[brokers.Tansu]:
    """A Tansu broker for this test alone, free to be stopped, killed and started again."""
    broker = brokers.Tansu(binary=brokers.require_tansu())
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node for this test alone (tests/faults/private.py), free to be stopped and
    killed: the shared RabbitMQ serves the other worker's tests meanwhile."""
    node = PrivateRabbit()
    node.start()
    yield node
    node.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a Redis that answers PING (``$ESM_TEST_REDIS_URL``, default 127.0.0.1:6379)."""
    url = brokers.redis_url()
    brokers.require(f"Redis at {brokers.redacted(url)}", brokers.redis_reachable(url))
    return url


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """URL of a RabbitMQ that accepts a login (``$ESM_TEST_RABBITMQ_URL``, default guest on
    127.0.0.1:5672)."""
    url = brokers.rabbitmq_url()
    brokers.require(f"RabbitMQ at {brokers.redacted(url)}", brokers.rabbitmq_reachable(url))
    return url


@pytest.fixture(scope="session")
def sqs_server() -> Iterator[brokers.MotoServer]:
    """moto's SQS server on a free 127.0.0.1 port for the whole session; ``.endpoint_url`` is its
    address. The test credentials (``brokers.SQS_TEST_ENVIRONMENT``) are set in the environment
    for the session, so sources opened through the standard AWS chain, and `workers`
    subprocesses, find them. It fails, never skips, under ``$CI``."""
    brokers.require_moto()
    server = brokers.MotoServer()
    saved = {name: os.environ.get(name) for name in brokers.SQS_TEST_ENVIRONMENT}
    os.environ.update(brokers.SQS_TEST_ENVIRONMENT)
    try:
        try:
            server.start()
        except brokers.BrokerError as exc:
            brokers.skip_or_fail(f"the local SQS server did not start: {exc}")
        yield server
    finally:
        server.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
