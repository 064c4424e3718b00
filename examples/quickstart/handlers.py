"""The quickstart's function: a Lambda handler for a Kafka event source mapping, as it would run
on Lambda. It prices each order in euros and reports the orders it cannot price."""

import base64
import json
import os

# Exchange rates to euros, from the function's environment ("EUR=1.0,USD=0.92").
RATES = {
    currency: float(rate)
    for currency, _, rate in (pair.partition("=") for pair in os.environ["RATES"].split(","))
}


def handle_orders(event, context):
    failures = []
    for partition, records in event["records"].items():
        for record in records:
            order = json.loads(base64.b64decode(record["value"]))
            rate = RATES.get(order["currency"])
            if rate is None:
                print(f"order {order['id']}: no rate for {order['currency']}")
                failures.append(
                    {"itemIdentifier": {"partition": partition, "offset": record["offset"]}}
                )
                continue
            print(f"order {order['id']}: {order['amount'] * rate:.2f} EUR")
    return {"batchItemFailures": failures}
