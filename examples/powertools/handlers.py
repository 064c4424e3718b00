"""A Lambda handler written with Powertools for AWS Lambda's batch utility, for a Kafka event
source mapping: `process_partial_response` calls `record_handler` per record and reports the
ones that raised in `batchItemFailures`."""

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)

processor = BatchProcessor(event_type=EventType.Kafka)


def record_handler(record):
    order = record.json_value
    if order["amount"] < 0:
        raise ValueError(f"order {order['id']} has a negative amount")
    print(f"order {order['id']} from {record.topic}-{record.partition}@{record.offset}")


def handle_orders(event, context):
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
