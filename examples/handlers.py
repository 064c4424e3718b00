"""The function of config/example.yaml, which Kafka, RabbitMQ and Redis Streams mappings feed at
once: `workers.events` reads each broker's event the same way, so one handler serves all three.

It imports as `examples.handlers` from the repository's root, where `workers validate
config/example.yaml` and `workers run config/example.yaml` are run.
"""

from workers.events import batch_response, records


def handle_orders(event, context):
    failed = []
    for record in records(event):
        # A Redis entry of several fields reads as an object of them, with text values: hence
        # float() on the amount.
        try:
            order = record.json()
            amount = float(order["amount"])
        except (ValueError, TypeError, KeyError) as exc:
            print(f"{record.source}: not an order ({type(exc).__name__}: {exc})")
            failed.append(record)
            continue
        if amount < 0:
            print(f"order {order.get('id')} from {record.source}: negative amount")
            failed.append(record)
        else:
            print(f"order {order.get('id')} from {record.source}: {amount:.2f}")
    return batch_response(failed)
