"""The sample order stream of `workers demo`, produced onto a Kafka-protocol broker."""

from __future__ import annotations

import json
import random

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic


def produce_orders(bootstrap: str, topic: str, count: int, bad_every: int) -> int:
    """Create `topic` (3 partitions) and fill it; returns how many orders are bad."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=3)]).values():
        future.result(timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    rng = random.Random(7)
    bad = 0
    for i in range(count):
        amount = -1 if i % bad_every == bad_every - 1 else rng.randint(1, 500)
        bad += amount < 0
        customer = f"c{i % 40}"
        order = {"id": i, "customer": customer, "amount": amount}
        producer.produce(topic, json.dumps(order).encode(), key=customer.encode())
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError(f"could not deliver the sample orders to {bootstrap}")
    return bad
