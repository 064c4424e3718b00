"""A Lambda handler written for an Amazon MSK event source mapping: it names the cluster from the
event's `eventSourceArn` and validates the event with Powertools' `KafkaMskEventModel`, which
accepts only MSK's event (`"eventSource": "aws:kafka"`). Orders it cannot take are reported in
`batchItemFailures`."""

import json

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import KafkaMskEventModel


def handle_orders(event, context):
    # arn:aws:kafka:<region>:<account>:cluster/<name>/<uuid>
    cluster = event["eventSourceArn"].split("/")[1]
    batch = parse(event=event, model=KafkaMskEventModel)
    failures = []
    for partition, records in batch.records.items():
        for record in records:
            order = json.loads(record.value)
            if order["amount"] < 0:
                print(f"order {order['id']} has a negative amount")
                failures.append(
                    {"itemIdentifier": {"partition": partition, "offset": record.offset}}
                )
                continue
            print(f"order {order['id']} from cluster {cluster}, {partition}@{record.offset}")
    return {"batchItemFailures": failures}
