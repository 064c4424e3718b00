"""Creates the `orders` topic and produces a few orders to it (one in a currency the handler
has no rate for)."""

import json
import os

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
ORDERS = [
    {"id": 1, "amount": 12.5, "currency": "EUR"},
    {"id": 2, "amount": 40.0, "currency": "USD"},
    {"id": 3, "amount": 7.25, "currency": "EUR"},
    {"id": 4, "amount": 99.0, "currency": "USD"},
    {"id": 5, "amount": 30.0, "currency": "CHF"},
]

admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
if "orders" not in admin.list_topics(timeout=10).topics:
    admin.create_topics([NewTopic("orders", num_partitions=1)])["orders"].result(timeout=10)

producer = Producer({"bootstrap.servers": BOOTSTRAP})
for order in ORDERS:
    producer.produce("orders", key=str(order["id"]), value=json.dumps(order))
if producer.flush(10):
    raise SystemExit("not every order was confirmed by the broker")
print(f"produced {len(ORDERS)} orders to 'orders' at {BOOTSTRAP}")
