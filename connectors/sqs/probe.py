"""`workers validate --connect` for SQS: the source queue exists and can be read, and its
redrive policy is reported; the dead-letter queue exists (a mapping never starts with letters
that nothing can store)."""

from __future__ import annotations

import json

from connectors.sqs import config as cfg
from connectors.sqs.client import log, sqs_client, translate
from workers.engine.probing import DestinationUnusable, SourceFacts


def _queue_attributes(queue: cfg.SQSQueue) -> dict[str, str]:
    client = sqs_client(queue)
    try:
        reply = client.get_queue_attributes(QueueUrl=queue.queue_url, AttributeNames=["All"])
    except Exception as exc:
        raise translate(exc, queue.queue_url) from None
    finally:
        client.close()
    return {str(k): str(v) for k, v in reply.get("Attributes", {}).items()}


def probe_sqs(src: cfg.SQSSource) -> SourceFacts:
    """GetQueueAttributes of the source queue; logs what it holds and returns its redrive
    policy's maxReceiveCount: each retry of the mapping is a receive, so a lower one moves a
    failing message to the queue's dead-letter queue before the mapping's retries are done."""
    attributes = _queue_attributes(src)
    log.info(
        "queue %s: %s messages visible, %s in flight, visibility timeout %ss",
        src.queue_url,
        attributes.get("ApproximateNumberOfMessages", "?"),
        attributes.get("ApproximateNumberOfMessagesNotVisible", "?"),
        attributes.get("VisibilityTimeout", "?"),
    )
    count = _max_receive_count(attributes.get("RedrivePolicy"))
    if count is None:
        return SourceFacts()
    return SourceFacts(count, f"queue {src.queue_name}'s redrive policy (maxReceiveCount)")


def _max_receive_count(policy: str | None) -> int | None:
    """maxReceiveCount of a RedrivePolicy attribute (JSON; SQS writes the count as a number,
    some servers as a string), or None without a usable one."""
    if not policy:
        return None
    try:
        count = json.loads(policy).get("maxReceiveCount")
        return int(count) if count is not None else None
    except (ValueError, TypeError, AttributeError):
        log.warning("queue redrive policy %r cannot be read", policy[:200])
        return None


def probe_destination(dst: cfg.SQSDestination) -> str:
    try:
        _queue_attributes(dst)
    except Exception as exc:
        raise DestinationUnusable(f"cannot use queue {dst.queue_url}: {exc}") from None
    return f"queue {dst.queue_url} exists"
