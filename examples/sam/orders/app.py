"""Orders from SQS, as on Lambda: the messages that fail are reported by messageId, so only
they are retried (and moved to the dead-letter queue by the queue's redrive policy)."""

import os

import shop


def lambda_handler(event, context):
    failures = []
    for record in event["Records"]:
        try:
            order = shop.parse(record["body"])
        except shop.InvalidOrder as exc:
            print(f"message {record['messageId']}: {exc}")
            failures.append({"itemIdentifier": record["messageId"]})
            continue
        print(f"order {order['id']}: {order['amount']:.2f} ({os.environ['LOG_LEVEL']})")
    return {"batchItemFailures": failures}
