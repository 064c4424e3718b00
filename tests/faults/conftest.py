"""Fixtures of the fault suite: one `Rig` per broker (a fresh topic, stream or queue, its source
config, a durable producer, and what the broker says was checkpointed), on the shared brokers or
on private ones that a scenario may kill, restart, cut or freeze."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import brokers
from tests.faults.load import KafkaSender, RabbitSender, RedisSender, Sender, SQSSender
from tests.faults.private import PrivateRedis, ProxiedTansu


class Rig:
    """A broker, a fresh source on it named `name`, and how to inspect its checkpoints."""

    broker = ""
    # The source keeps records of one key in order (checked by the scenarios).
    ordered = True
    # How the mapping spreads work: records of one key stay in order within a lane.
    mapping: dict[str, Any] = {}

    def __init__(self, name: str) -> None:
        self.name = name

    def source(self) -> dict[str, Any]:
        raise NotImplementedError

    def sender(self) -> Sender:
        raise NotImplementedError

    def uncheckpointed(self, sender: Sender) -> set[str] | None:
        """Ids the broker still considers taken but not checkpointed (or not yet taken), read
        after a worker was killed; None where the broker cannot tell by id (RabbitMQ requeues
        unacked messages at once)."""
        return None

    def assert_checkpointed(self) -> None:
        """Every record of the source is checkpointed (after a run that settled them all)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class KafkaRig(Rig):
    broker = "kafka"
    mapping = {"parallelization_factor": 2}

    def __init__(self, name: str, bootstrap: str) -> None:
        super().__init__(name)
        self.bootstrap = bootstrap
        brokers.create_topic(bootstrap, name, 3)

    def source(self) -> dict[str, Any]:
        return {"type": "kafka", "bootstrap_servers": self.bootstrap, "topics": [self.name]}

    def sender(self) -> Sender:
        return KafkaSender(self.bootstrap, self.name)

    def committed(self) -> dict[int, int]:
        return brokers.committed_offsets(self.bootstrap, self.name, self.name)

    def assert_checkpointed(self) -> None:
        ends = brokers.end_offsets(self.bootstrap, self.name)
        assert self.committed() == {p: e for p, e in ends.items() if e > 0}, ends

    def uncheckpointed(self, sender: Sender) -> set[str] | None:
        assert isinstance(sender, KafkaSender)
        committed = self.committed()
        return {
            ident
            for ident, (partition, offset) in sender.where.items()
            if offset >= committed.get(partition, 0)
        }


class RedisRig(Rig):
    broker = "redis"
    # Entries carry their key as a field: two key-ordered lanes on the one stream.
    mapping = {"parallelization_factor": 2}

    def __init__(self, name: str, url: str) -> None:
        import redis

        super().__init__(name)
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=5)

    def source(self) -> dict[str, Any]:
        return {
            "type": "redis",
            "url": self.url,
            "streams": [self.name],
            "consumer_name": "faults",
            "partition_key_field": "k",
        }

    def sender(self) -> Sender:
        return RedisSender(self.url, self.name)

    def assert_checkpointed(self) -> None:
        summary: Any = self.client.xpending(self.name, self.name)
        assert summary["pending"] == 0, summary
        groups: Any = self.client.xinfo_groups(self.name)
        last = next(g for g in groups if g["name"].decode() == self.name)["last-delivered-id"]
        info: Any = self.client.xinfo_stream(self.name)
        assert last == info["last-generated-id"], (last, info["last-generated-id"])

    def uncheckpointed(self, sender: Sender) -> set[str] | None:
        assert isinstance(sender, RedisSender)
        rows: Any = self.client.xpending_range(self.name, self.name, "-", "+", 100_000)
        pending = {row["message_id"].decode() for row in rows}
        groups: Any = self.client.xinfo_groups(self.name)
        last = next(g for g in groups if g["name"].decode() == self.name)["last-delivered-id"]
        last_id = _entry_id(last.decode())
        return {
            ident
            for ident, entry in sender.where.items()
            if entry in pending or _entry_id(entry) > last_id
        }

    def close(self) -> None:
        # A private server may be gone already.
        with contextlib.suppress(Exception):
            self.client.delete(self.name)
        self.client.close()


def _entry_id(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)


class RabbitRig(Rig):
    broker = "rabbitmq"

    def __init__(self, name: str, url: str) -> None:
        import pika

        super().__init__(name)
        self.url = url
        connection = pika.BlockingConnection(pika.URLParameters(url))
        connection.channel().queue_declare(name, durable=True)
        connection.close()

    def source(self) -> dict[str, Any]:
        return {"type": "rabbitmq", "url": self.url, "queue": self.name}

    def sender(self) -> Sender:
        return RabbitSender(self.url, self.name)

    def assert_checkpointed(self) -> None:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ok = connection.channel().queue_declare(self.name, passive=True)
        finally:
            connection.close()
        # Nothing ready, and no consumer left that could hold unacked messages.
        assert (ok.method.message_count, ok.method.consumer_count) == (0, 0), ok.method

    def close(self) -> None:
        import pika

        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            connection.channel().queue_delete(self.name)
            connection.close()
        except Exception:  # a private node may be gone already
            pass


class SQSRig(Rig):
    """A standard queue on moto's server, with a short visibility timeout so that what a killed
    worker held comes back within seconds. Standard queues promise no order, so order per key
    is not checked; FIFO queues would, but moto redelivers a FIFO group out of order after a
    visibility timeout (docs/brokers.md)."""

    broker = "sqs"
    ordered = False
    mapping = {"parallelization_factor": 2}
    visibility_timeout_s = 5

    def __init__(self, name: str, server: brokers.MotoServer, via: str | None = None) -> None:
        """`via`: host:port the worker reaches the server through (a proxy); the sender and the
        checks go to the server directly."""
        super().__init__(name)
        self.server = server
        self.client = server.client()
        self.queue_url = server.create_queue(name, VisibilityTimeout=str(self.visibility_timeout_s))
        self.via = via

    def source(self) -> dict[str, Any]:
        url = self.queue_url
        if self.via is not None:
            url = urlsplit(url)._replace(netloc=self.via).geturl()
        return {"type": "sqs", "queue_url": url}

    def sender(self) -> Sender:
        return SQSSender(self.server.client(), self.queue_url)

    def assert_checkpointed(self) -> None:
        attributes = self.client.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        assert set(attributes.values()) == {"0"}, attributes

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.delete_queue(QueueUrl=self.queue_url)


BROKERS = ["kafka", "redis", "rabbitmq", "sqs"]


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """A fresh source on the shared broker named by the test's parameter."""
    kind = request.param
    name = brokers.unique_name(f"faults-{kind}")
    made: Rig
    if kind == "kafka":
        made = KafkaRig(name, request.getfixturevalue("kafka_broker").bootstrap)
    elif kind == "redis":
        made = RedisRig(name, request.getfixturevalue("redis_url"))
    elif kind == "sqs":
        made = SQSRig(name, request.getfixturevalue("sqs_server"))
    else:
        made = RabbitRig(name, request.getfixturevalue("rabbitmq_url"))
    yield made
    made.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.close()


@pytest.fixture
def proxied_kafka() -> Iterator[ProxiedTansu]:
    broker = ProxiedTansu(binary=brokers.require_tansu())
    broker.start()
    yield broker
    broker.close()
