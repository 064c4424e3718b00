"""A Lambda handler for an SQS queue written with Powertools for AWS Lambda's batch utility, as it
runs on Lambda: `process_partial_response` calls `record_handler` per message and reports the
ones that raised in `batchItemFailures` by their messageId, so only those are retried."""

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)

processor = BatchProcessor(event_type=EventType.SQS)


def record_handler(record):
    order = record.json_body
    if order["amount"] < 0:
        raise ValueError(f"order {order['id']} has a negative amount")
    receives = record.attributes.approximate_receive_count
    print(f"order {order['id']}: message {record.message_id}, receive {receives}")


def handle_orders(event, context):
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
