"""`workers validate --connect` for SQS: the source queue exists and can be read, the
dead-letter queue exists (a mapping never starts with letters that nothing can store)."""

from __future__ import annotations

from connectors.sqs import config as cfg
from connectors.sqs.client import log, sqs_client, translate
from workers.engine.probing import DestinationUnusable


def _queue_attributes(queue: cfg.SQSQueue) -> dict[str, str]:
    client = sqs_client(queue)
    try:
        reply = client.get_queue_attributes(QueueUrl=queue.queue_url, AttributeNames=["All"])
    except Exception as exc:
        raise translate(exc, queue.queue_url) from None
    finally:
        client.close()
    return {str(k): str(v) for k, v in reply.get("Attributes", {}).items()}


def probe_sqs(src: cfg.SQSSource) -> None:
    """GetQueueAttributes of the source queue; logs what it holds."""
    attributes = _queue_attributes(src)
    log.info(
        "queue %s: %s messages visible, %s in flight, visibility timeout %ss",
        src.queue_url,
        attributes.get("ApproximateNumberOfMessages", "?"),
        attributes.get("ApproximateNumberOfMessagesNotVisible", "?"),
        attributes.get("VisibilityTimeout", "?"),
    )


def probe_destination(dst: cfg.SQSDestination) -> str:
    try:
        _queue_attributes(dst)
    except Exception as exc:
        raise DestinationUnusable(f"cannot use queue {dst.queue_url}: {exc}") from None
    return f"queue {dst.queue_url} exists"
