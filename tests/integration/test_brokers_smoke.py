"""Each broker the integration tests need works from Python, with the drivers the connectors use:
Redis streams with a consumer group, RabbitMQ publish/consume/ack, and a Kafka consumer group on
Tansu that commits up to the end of every partition."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import cast

import pika
import pika.exceptions
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from tests import brokers

pytestmark = pytest.mark.integration

# XREADGROUP's reply over RESP2: [(stream, [(entry id, {field: value})])]
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


@pytest.mark.redis
def test_redis_stream_group_read_and_ack(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    stream, group = brokers.unique_name("smoke-stream"), "smoke-group"
    try:
        ids = [client.xadd(stream, {"n": str(i), "body": f"record {i}"}) for i in range(5)]
        client.xgroup_create(stream, group, id="0")
        reply = cast(
            StreamReply,
            client.xreadgroup(group, "consumer-1", {stream: ">"}, count=10, block=1000),
        )
        [(name, entries)] = reply
        assert name == stream.encode()
        assert [entry_id for entry_id, _ in entries] == ids
        assert entries[3][1] == {b"n": b"3", b"body": b"record 3"}
        assert client.xpending(stream, group)["pending"] == 5

        assert client.xack(stream, group, *ids) == 5
        assert client.xpending(stream, group)["pending"] == 0
    finally:
        client.delete(stream)
        client.close()


@pytest.mark.rabbitmq
def test_rabbitmq_publish_consume_ack(rabbitmq_url: str) -> None:
    params = pika.URLParameters(rabbitmq_url)
    connection_name = brokers.unique_name("smoke-connection")
    params.client_properties = {"connection_name": connection_name}
    connection = pika.BlockingConnection(params)
    queue = brokers.unique_name("smoke-queue")
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue, durable=True)
        for i in range(5):
            channel.basic_publish(
                "",
                queue,
                f"message {i}".encode(),
                pika.BasicProperties(
                    message_id=str(i), headers={"n": i}, delivery_mode=pika.DeliveryMode.Persistent
                ),
                mandatory=True,
            )
        channel.basic_qos(prefetch_count=10)
        received: list[tuple[int, bytes, dict[str, object]]] = []
        for method, properties, body in channel.consume(queue, inactivity_timeout=5):
            assert method is not None, "timed out waiting for messages"
            received.append((method.delivery_tag, body, properties.headers))
            if len(received) == 5:
                break
        channel.cancel()
        assert [body for _, body, _ in received] == [f"message {i}".encode() for i in range(5)]
        assert received[2][2] == {"n": 2}
        for delivery_tag, _, _ in received:
            channel.basic_ack(delivery_tag)
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        channel.queue_delete(queue)
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.rabbitmq
def test_rabbitmqctl_closes_a_named_connection(rabbitmq_url: str) -> None:
    brokers.require("rabbitmqctl (run tests as root)", brokers.rabbitmqctl_works())
    params = pika.URLParameters(rabbitmq_url)
    connection_name = brokers.unique_name("smoke-connection")
    params.client_properties = {"connection_name": connection_name}
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        assert brokers.close_rabbitmq_connections(connection_name) == 1
        with pytest.raises(pika.exceptions.ConnectionClosed):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.2)
            channel.queue_declare("", exclusive=True)
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.kafka
def test_kafka_group_consumes_everything_and_commits_to_the_end(
    kafka_broker: brokers.Tansu,
) -> None:
    topic = kafka_broker.create_topic(brokers.unique_name("smoke"), partitions=3)
    group = brokers.unique_name("smoke-group")
    records = [
        brokers.KafkaRecord(
            value=f"value-{i}", key=f"key-{i % 30}", headers=[("n", str(i).encode())]
        )
        for i in range(300)
    ]
    positions = brokers.produce(kafka_broker.bootstrap, topic, records)
    assert len({partition for partition, _ in positions}) == 3

    consumer = Consumer(
        kafka_broker.consumer_config(
            group, **{"partition.assignment.strategy": "cooperative-sticky"}
        )
    )
    assigned: set[int] = set()
    consumer.subscribe(
        [topic],
        on_assign=lambda _c, partitions: assigned.update(p.partition for p in partitions),
    )
    received: list[Message] = []
    try:
        deadline = time.monotonic() + 60
        while len(received) < len(records):
            assert time.monotonic() < deadline, f"received {len(received)}/{len(records)}"
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            received.append(message)
        consumer.commit(asynchronous=False)
        assert assigned == {0, 1, 2}
    finally:
        consumer.close()

    by_key: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for message in received:
        assert message.headers() == [("n", message.value()[6:])]  # type: ignore[index]
        by_key[message.key() or b""].append((message.partition() or 0, message.offset() or 0))
    # One key lives on one partition, and its records arrive in produce order.
    for key, places in by_key.items():
        assert len({partition for partition, _ in places}) == 1, key
        assert places == sorted(places), key

    ends = brokers.end_offsets(kafka_broker.bootstrap, topic)
    assert sum(ends.values()) == 300
    assert brokers.committed_offsets(kafka_broker.bootstrap, group, topic) == ends


@pytest.mark.kafka
def test_tansu_restarts_on_the_same_port_with_its_topics(own_kafka_broker: brokers.Tansu) -> None:
    broker = own_kafka_broker
    topic = broker.create_topic(brokers.unique_name("restart"), partitions=2)
    brokers.produce(broker.bootstrap, topic, [brokers.KafkaRecord(value=b"before", partition=1)])
    assert brokers.end_offsets(broker.bootstrap, topic) == {0: 0, 1: 1}
    port = broker.port

    broker.kill()
    assert not broker.running
    broker.start()

    assert broker.port == port
    assert brokers.partitions_of(broker.bootstrap, topic) == [0, 1]
    # In-memory storage: the records did not survive, the topic was created again.
    assert brokers.end_offsets(broker.bootstrap, topic) == {0: 0, 1: 0}
