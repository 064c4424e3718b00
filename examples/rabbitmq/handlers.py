"""A Lambda handler for an Amazon MQ (RabbitMQ) event source mapping, as it runs on Lambda: it
raises for a message it cannot handle, and the mapping bisects the batch to isolate it."""

import base64
import json


def handle_orders(event, context):
    for queue, messages in event["rmqMessagesByQueue"].items():
        for message in messages:
            order = json.loads(base64.b64decode(message["data"]))
            if order["amount"] < 0:
                raise ValueError(f"order {order['id']} from {queue} has a negative amount")
            print(f"order {order['id']}: {order['amount']:.2f}")
