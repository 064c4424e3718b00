"""One class per broker: bring the broker up (Kafka, SQS) or connect (RabbitMQ, Redis, kombu),
pre-fill a topic/stream/queue, describe it to the engine, the raw loop and FastStream, and clean
up."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.common import BenchError, key_of, log, value_of

REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# The same RabbitMQ, as kombu spells its default vhost.
KOMBU_URL = "amqp://guest:guest@127.0.0.1:5672//"
# Tansu joins a member only after about half of session.timeout.ms (docs/brokers.md).
KAFKA_SESSION_MS = 6000

ValueFn = Callable[[int], bytes]


@dataclass(slots=True)
class Dataset:
    """A pre-filled topic (one partition), stream or queue of `records` keyed records."""

    name: str
    records: int
    keys: int
    # Consumed by reading it (a RabbitMQ queue): a dataset serves one measurement only.
    single_use: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class LiveProducer(Protocol):
    def send(self, records: Sequence[tuple[bytes, bytes]]) -> None: ...

    def close(self) -> None: ...


class Target(Protocol):
    name: str
    # Whether records of one key stay in order (a partition, a stream), or lanes take them
    # round-robin (a queue).
    ordered: bool
    # Measurements (bench.common.MEASUREMENTS) this broker does not take, and why.
    not_measured: dict[str, str]

    def setup(self) -> None: ...

    def close(self) -> None: ...

    def dataset(self, label: str, n: int, *, keys: int, values: ValueFn | None = None) -> Dataset:
        """A pre-filled dataset; reused by label where reading it leaves it in place."""
        ...

    def empty(self, label: str) -> Dataset:
        """An empty topic/stream/queue, for live production."""
        ...

    def release(self, ds: Dataset) -> None: ...

    def source(self, ds: Dataset, group: str) -> dict[str, Any]:
        """The mapping's `source` section reading `ds` from its start as a new group."""
        ...

    def client_spec(self, ds: Dataset, group: str) -> dict[str, Any]:
        """What bench.raw and bench.peers need to read `ds` as a new group."""
        ...

    def producer(self, ds: Dataset) -> LiveProducer: ...


def default_values(i: int) -> bytes:
    return value_of(i)


_run_id = uuid.uuid4().hex[:8]
_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"esm-bench-{_run_id}-{prefix}-{next(_counter)}"


# --- Kafka (Tansu) -----------------------------------------------------------------------------


class KafkaTarget:
    name = "kafka"
    ordered = True
    not_measured: dict[str, str] = {}

    def __init__(self) -> None:
        self._broker: Any = None
        self.bootstrap = ""
        self._cache: dict[tuple[str, int, int], Dataset] = {}

    def setup(self) -> None:
        from workers.embedded import EmbeddedKafka

        self._broker = EmbeddedKafka()
        self._broker.start()
        self.bootstrap = self._broker.bootstrap
        self._wait_metadata()
        log(f"kafka: Tansu on {self.bootstrap}")

    def _wait_metadata(self) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if admin.list_topics(timeout=5).brokers:
                    return
            except KafkaException:
                time.sleep(0.1)
        raise BenchError(f"Tansu on {self.bootstrap} does not answer metadata")

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    def _create_topic(self, name: str) -> None:
        from confluent_kafka.admin import (  # type: ignore[attr-defined]  # no __all__
            AdminClient,
            NewTopic,
        )

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
        futures[name].result(timeout=15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found = admin.list_topics(topic=name, timeout=5).topics.get(name)
            if (
                found is not None
                and found.error is None
                and found.partitions
                and all(p.leader >= 0 for p in found.partitions.values())
            ):
                return
            time.sleep(0.05)
        raise BenchError(f"topic {name} has no leader")

    def dataset(self, label: str, n: int, *, keys: int, values: ValueFn | None = None) -> Dataset:
        cache_key = (label, n, keys)
        if values is None and cache_key in self._cache:
            return self._cache[cache_key]
        ds = self.empty(label)
        make = values or default_values
        producer = self.producer(ds, linger_ms=20)
        for start in range(0, n, 1000):
            producer.send([(key_of(i, keys), make(i)) for i in range(start, min(n, start + 1000))])
        producer.close()
        if producer.delivered != n:
            raise BenchError(f"kafka: {producer.delivered}/{n} records delivered to {ds.name}")
        ds.records, ds.keys = n, keys
        if values is None:
            self._cache[cache_key] = ds
        return ds

    def empty(self, label: str) -> Dataset:
        name = unique(label)
        self._create_topic(name)
        return Dataset(name, 0, 0)

    def release(self, ds: Dataset) -> None:
        pass  # the in-memory broker goes away with the run

    def source(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {
            "type": "kafka",
            "bootstrap_servers": self.bootstrap,
            "topics": [ds.name],
            "consumer_group_id": group,
            "starting_position": "TRIM_HORIZON",
            "client_config": {
                "session.timeout.ms": KAFKA_SESSION_MS,
                "heartbeat.interval.ms": 500,
            },
        }

    def client_spec(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {
            "broker": "kafka",
            "bootstrap": self.bootstrap,
            "topic": ds.name,
            "group": group,
            "records": ds.records,
            "session_ms": KAFKA_SESSION_MS,
        }

    def producer(self, ds: Dataset, linger_ms: int = 0) -> _KafkaProducer:
        return _KafkaProducer(self.bootstrap, ds.name, linger_ms)


class _KafkaProducer:
    def __init__(self, bootstrap: str, topic: str, linger_ms: int) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.delivered = 0
        self.failed = 0
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": linger_ms,
                "batch.num.messages": 10_000,
                "queue.buffering.max.messages": 200_000,
            }
        )

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        produce = self._producer.produce
        for key, value in records:
            while True:
                try:
                    produce(self.topic, value=value, key=key, on_delivery=self._on_delivery)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        self._producer.poll(0)

    def close(self) -> None:
        left = self._producer.flush(60)
        if left or self.failed:
            raise BenchError(f"kafka: {left} records unflushed, {self.failed} failed")


# --- Redis Streams -----------------------------------------------------------------------------


class RedisTarget:
    name = "redis"
    ordered = True
    not_measured: dict[str, str] = {}

    def __init__(self) -> None:
        self._client: Any = None
        self._streams: list[str] = []
        self._cache: dict[tuple[str, int, int], Dataset] = {}

    def setup(self) -> None:
        import redis

        self._client = redis.Redis.from_url(REDIS_URL, socket_timeout=30)
        self._client.ping()

    def close(self) -> None:
        if self._client is None:
            return
        for start in range(0, len(self._streams), 100):
            self._client.delete(*self._streams[start : start + 100])
        self._client.close()
        self._client = None

    def dataset(self, label: str, n: int, *, keys: int, values: ValueFn | None = None) -> Dataset:
        cache_key = (label, n, keys)
        if values is None and cache_key in self._cache:
            return self._cache[cache_key]
        ds = self.empty(label)
        make = values or default_values
        producer = self.producer(ds)
        for start in range(0, n, 1000):
            producer.send([(key_of(i, keys), make(i)) for i in range(start, min(n, start + 1000))])
        length = self._client.xlen(ds.name)
        if length != n:
            raise BenchError(f"redis: {length}/{n} entries in {ds.name}")
        ds.records, ds.keys = n, keys
        if values is None:
            self._cache[cache_key] = ds
        return ds

    def empty(self, label: str) -> Dataset:
        name = unique(label)
        self._streams.append(name)
        return Dataset(name, 0, 0)

    def release(self, ds: Dataset) -> None:
        pass  # streams are reused with new groups, deleted at close

    def source(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {
            "type": "redis",
            "url": REDIS_URL,
            "streams": [ds.name],
            "consumer_group": group,
            "consumer_name": "bench",
            "starting_position": "TRIM_HORIZON",
            "partition_key_field": "k",
        }

    def client_spec(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {
            "broker": "redis",
            "url": REDIS_URL,
            "stream": ds.name,
            "group": group,
            "records": ds.records,
        }

    def producer(self, ds: Dataset) -> _RedisProducer:
        return _RedisProducer(self._client, ds.name)


class _RedisProducer:
    def __init__(self, client: Any, stream: str) -> None:
        self._client = client
        self.stream = stream

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, value in records:
            pipe.xadd(self.stream, {"k": key, "v": value})
        pipe.execute()

    def close(self) -> None:
        pass


# --- RabbitMQ ----------------------------------------------------------------------------------


class RabbitMQTarget:
    name = "rabbitmq"
    ordered = False
    not_measured: dict[str, str] = {}

    def __init__(self) -> None:
        self._connection: Any = None
        self._channel: Any = None
        self._queues: list[str] = []

    def setup(self) -> None:
        self._ensure()

    def _ensure(self) -> Any:
        """The setup channel, reconnected if the broker closed it while a measurement ran."""
        import pika
        import pika.exceptions

        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(time_limit=0)
                if self._channel.is_open:
                    return self._channel
            except pika.exceptions.AMQPError:
                pass
        params = pika.URLParameters(RABBITMQ_URL)
        params.client_properties = {"connection_name": "esm-bench setup"}
        self._connection = pika.BlockingConnection(params)
        self._channel = self._connection.channel()
        return self._channel

    def close(self) -> None:
        if self._connection is None:
            return
        channel = self._ensure()
        for queue in self._queues:
            channel.queue_delete(queue)
        self._connection.close()
        self._connection = None

    def dataset(self, label: str, n: int, *, keys: int, values: ValueFn | None = None) -> Dataset:
        ds = self.empty(label)
        make = values or default_values
        producer = self.producer(ds)
        for start in range(0, n, 1000):
            producer.send([(key_of(i, keys), make(i)) for i in range(start, min(n, start + 1000))])
        deadline = time.monotonic() + 30
        while True:
            declared = self._ensure().queue_declare(ds.name, passive=True)
            count = declared.method.message_count
            if count == n:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"rabbitmq: {count}/{n} messages in {ds.name}")
            time.sleep(0.05)
        ds.records, ds.keys = n, keys
        return ds

    def empty(self, label: str) -> Dataset:
        name = unique(label)
        self._ensure().queue_declare(name, durable=False)
        self._queues.append(name)
        return Dataset(name, 0, 0, single_use=True)

    def release(self, ds: Dataset) -> None:
        if ds.name in self._queues:
            self._ensure().queue_delete(ds.name)
            self._queues.remove(ds.name)

    def source(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {"type": "rabbitmq", "url": RABBITMQ_URL, "queue": ds.name}

    def client_spec(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {"broker": "rabbitmq", "url": RABBITMQ_URL, "queue": ds.name, "records": ds.records}

    def producer(self, ds: Dataset) -> _RabbitProducer:
        return _RabbitProducer(self._ensure(), ds.name)


class _RabbitProducer:
    def __init__(self, channel: Any, queue: str) -> None:
        import pika

        self._channel = channel
        self.queue = queue
        self._props = pika.BasicProperties(content_type="application/json", delivery_mode=1)

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        publish = self._channel.basic_publish
        for _key, value in records:
            publish("", self.queue, value, self._props)

    def close(self) -> None:
        pass


# --- kombu, over the same RabbitMQ ---------------------------------------------------------------


class KombuTarget(RabbitMQTarget):
    """RabbitMQ queues filled with pika as for `rabbitmq`, read through kombu (`type: kombu`)."""

    name = "kombu"
    not_measured = {"faststream": "FastStream has no kombu subscriber"}

    def source(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {"type": "kombu", "url": KOMBU_URL, "queue": ds.name}

    def client_spec(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {"broker": "kombu", "url": KOMBU_URL, "queue": ds.name, "records": ds.records}


# --- SQS (moto's server) -------------------------------------------------------------------------

# SendMessageBatch and DeleteMessageBatch take at most 10 entries.
SQS_BATCH = 10
_NOT_ON_MOTO = (
    "not measured on moto, whose cost per message grows with the queue's depth (bench/README.md)"
)


class SQSTarget:
    """Standard queues on moto's server (`workers.embedded.EmbeddedSQS`), started on a free port.

    moto is not SQS: every message it sends or receives scans the whole queue (its queue
    attributes are computed per message), so the cost per message grows with the queue's depth
    and datasets stay small. Numbers here measure moto, not AWS.
    """

    name = "sqs"
    ordered = False
    not_measured = {
        "faststream": "FastStream has no SQS subscriber",
        "parallel": _NOT_ON_MOTO,
        "latency": _NOT_ON_MOTO,
        "bisect": _NOT_ON_MOTO,
    }

    def __init__(self) -> None:
        self._server: Any = None
        self._client: Any = None
        self._saved_env: dict[str, str | None] = {}
        self._queues: dict[str, str] = {}  # name -> URL

    def setup(self) -> None:
        from workers.embedded import LOCAL_SQS_ENVIRONMENT, EmbeddedSQS

        # `workers run` and the raw loop take credentials from the AWS chain (the environment);
        # moto accepts any, and these are not real ones.
        self._saved_env = {k: os.environ.get(k) for k in LOCAL_SQS_ENVIRONMENT}
        os.environ.update(LOCAL_SQS_ENVIRONMENT)
        self._server = EmbeddedSQS()
        self._server.start()
        self._client = self._server.client()
        log(f"sqs: moto on {self._server.endpoint_url}")

    @property
    def region(self) -> str:
        return os.environ.get("AWS_DEFAULT_REGION", "us-east-1")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()  # its queues go with it
            self._server = None
            self._queues.clear()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def dataset(self, label: str, n: int, *, keys: int, values: ValueFn | None = None) -> Dataset:
        ds = self.empty(label)
        make = values or default_values
        producer = self.producer(ds)
        for start in range(0, n, 1000):
            producer.send([(key_of(i, keys), make(i)) for i in range(start, min(n, start + 1000))])
        attributes = self._client.get_queue_attributes(
            QueueUrl=ds.extra["url"], AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        count = int(attributes["ApproximateNumberOfMessages"])
        if count != n:
            raise BenchError(f"sqs: {count}/{n} messages in {ds.name}")
        ds.records, ds.keys = n, keys
        return ds

    def empty(self, label: str) -> Dataset:
        name = unique(label)
        url = self._server.create_queue(name)
        self._queues[name] = url
        return Dataset(name, 0, 0, single_use=True, extra={"url": url})

    def release(self, ds: Dataset) -> None:
        url = self._queues.pop(ds.name, None)
        if url is not None:
            self._client.delete_queue(QueueUrl=url)

    def source(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {
            "type": "sqs",
            "queue_url": ds.extra["url"],
            "endpoint_url": self._server.endpoint_url,
            "region": self.region,
        }

    def client_spec(self, ds: Dataset, group: str) -> dict[str, Any]:
        return {
            "broker": "sqs",
            "endpoint": self._server.endpoint_url,
            "region": self.region,
            "queue_url": ds.extra["url"],
            "records": ds.records,
        }

    def producer(self, ds: Dataset) -> _SQSProducer:
        return _SQSProducer(self._client, ds.extra["url"])


class _SQSProducer:
    def __init__(self, client: Any, url: str) -> None:
        self._client = client
        self.url = url

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        for start in range(0, len(records), SQS_BATCH):
            entries = [
                {"Id": str(i), "MessageBody": value.decode()}
                for i, (_key, value) in enumerate(records[start : start + SQS_BATCH])
            ]
            reply = self._client.send_message_batch(QueueUrl=self.url, Entries=entries)
            if reply.get("Failed"):
                raise BenchError(f"sqs: SendMessageBatch failed: {reply['Failed'][:2]}")

    def close(self) -> None:
        pass


TARGETS: dict[str, Callable[[], Target]] = {
    "kafka": KafkaTarget,
    "redis": RedisTarget,
    "rabbitmq": RabbitMQTarget,
    "sqs": SQSTarget,
    "kombu": KombuTarget,
}
