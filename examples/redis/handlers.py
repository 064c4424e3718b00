"""A handler written for esm-workers with `workers.events`: the same code reads Kafka, RabbitMQ
and Redis Streams events, and reports the records it could not handle."""

from workers.events import batch_response, records


def handle_orders(event, context):
    failed = []
    for record in records(event):
        order = record.json()
        if order["amount"] < 0:
            print(f"order {order['id']}: negative amount")
            failed.append(record)
        else:
            print(f"order {order['id']}: {order['amount']:.2f}")
    return batch_response(failed)
