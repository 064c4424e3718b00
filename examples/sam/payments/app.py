"""Payments from Kafka, as on Lambda: a bad payment fails the batch, which Lambda bisects
until the payment is alone, retries, then sends to the on-failure destination."""

import base64

import shop


def lambda_handler(event, context):
    for partition, records in event["records"].items():
        for record in records:
            payment = shop.parse(base64.b64decode(record["value"]))
            print(f"payment {payment['id']} ({partition}@{record['offset']}): {payment['amount']}")
