"""SQS mappings against moto: a failed message comes back after the mapping's backoff
(ChangeMessageVisibility), counted by ApproximateReceiveCount; with no on-failure destination an
exhausted message is left to the queue's redrive policy, never deleted; and
`scaling_config.maximum_concurrency` bounds the batches running at once."""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest

from connectors.memory.broker import MemoryDestination
from tests import brokers
from tests.engine import DirectInvoker, Held, eventually
from tests.integration.test_sqs import mapping_for, send
from workers.app import registry
from workers.app.config import config_from_dict
from workers.app.wiring import build_poller
from workers.engine.batcher import BatchLimits
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.ports import Destination

pytestmark = [pytest.mark.integration, pytest.mark.sqs]

# The queues' own visibility timeout: a message that waited for it would not be back within
# GUARD_S, which stops the run.
VISIBILITY_S = "300"
GUARD_S = 60.0


def run_poller(url: str, handler: Any, policy: Policy, destination: Destination | None) -> Poller:
    poller = Poller(
        PollerSettings(
            mapping="retries",
            function="f",
            limits=BatchLimits(batch_size=10, maximum_batching_window_s=0.05),
        ),
        source=registry.open_source(mapping_for(url)),
        invoker=DirectInvoker(handler),
        policy=policy,
        destination=destination,
    )
    guard = threading.Timer(GUARD_S, poller.stop)
    guard.start()
    try:
        poller.run(until_idle_s=1.0)
    finally:
        guard.cancel()
    return poller


def counts(server: brokers.MotoServer, url: str) -> tuple[int, int]:
    attributes = server.client().get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


class Poison:
    """Fails every batch holding the body "poison"; notes the receive count of each invocation
    of it alone and how often each other body succeeded."""

    def __init__(self) -> None:
        self.receives: list[str] = []
        self.attempts: list[int] = []
        self.done: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any], request: InvocationRequest) -> None:
        items = event["Records"]
        with self.lock:
            if any(item["body"] == "poison" for item in items):
                if len(items) == 1:
                    self.receives.append(items[0]["attributes"]["ApproximateReceiveCount"])
                    self.attempts.append(request.attempt)
                raise ValueError("poison")
            for item in items:
                self.done[item["body"]] = self.done.get(item["body"], 0) + 1


def test_a_failed_message_comes_back_after_the_backoff_counted_by_sqs(
    sqs_server: brokers.MotoServer,
) -> None:
    url = sqs_server.create_queue(brokers.unique_name("sqs"), VisibilityTimeout=VISIBILITY_S)
    send(sqs_server, url, ["a", "poison", "b"])
    handler = Poison()
    dlq = MemoryDestination()
    policy = Policy(
        maximum_retry_attempts=2, bisect_batch_on_function_error=True, retry_backoff_base_s=0.01
    )
    poller = run_poller(url, handler, policy, dlq)

    # Each retry was a receive of SQS's, not the queue's visibility timeout later.
    assert handler.receives == ["1", "2", "3"]
    assert handler.attempts == [1, 2, 3]
    assert handler.done == {"a": 1, "b": 1}
    (letter,) = dlq.letters
    assert [r["body"] for r in letter["payload"]["Records"]] == ["poison"]
    assert letter["requestContext"]["approximateInvokeCount"] == 3
    assert counts(sqs_server, url) == (0, 0)
    stats = poller.stats.snapshot()
    assert stats["released"] == 2 and stats["dead_lettered"] == 1 and stats["dropped"] == 0


def test_with_no_destination_the_queues_redrive_policy_takes_the_poison_message(
    sqs_server: brokers.MotoServer,
) -> None:
    client = sqs_server.client()
    dead_url = sqs_server.create_queue(brokers.unique_name("sqs-dlq"))
    dead_arn = client.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    redrive = orjson.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": 3}).decode()
    url = sqs_server.create_queue(
        brokers.unique_name("sqs"), VisibilityTimeout=VISIBILITY_S, RedrivePolicy=redrive
    )
    send(sqs_server, url, ["a", "poison", "b", "c"])
    handler = Poison()
    policy = Policy(
        maximum_retry_attempts=1, bisect_batch_on_function_error=True, retry_backoff_base_s=0.01
    )
    poller = run_poller(url, handler, policy, None)

    # Exhausted after its second receive, it was handed back, not deleted: invoked once more on
    # its third receive, then moved by SQS on the fourth.
    assert handler.receives == ["1", "2", "3"]
    assert handler.done == {"a": 1, "b": 1, "c": 1}
    assert counts(sqs_server, url) == (0, 0)
    moved = client.receive_message(
        QueueUrl=dead_url, MessageSystemAttributeNames=["All"], WaitTimeSeconds=0
    )["Messages"]
    assert [m["Body"] for m in moved] == ["poison"]
    stats = poller.stats.snapshot()
    assert stats["dropped"] == 0 and stats["dead_lettered"] == 0
    assert stats["succeeded"] == 3 and stats["released"] == 3


def test_maximum_concurrency_is_shared_between_the_pollers(sqs_server: brokers.MotoServer) -> None:
    url = sqs_server.create_queue(brokers.unique_name("sqs"))
    send(sqs_server, url, [str(i) for i in range(12)])
    config = config_from_dict(
        {
            "functions": {"f": {"handler": "tests.handlers.misbehaving:noop"}},
            "event_source_mappings": [
                {
                    "name": "scaled",
                    "function": "f",
                    "pollers": 2,
                    "source": {"type": "sqs", "queue_url": url},
                    "batch_size": 1,
                    "maximum_batching_window_s": 0,
                    "parallelization_factor": 6,
                    "scaling_config": {"maximum_concurrency": 5},
                }
            ],
        }
    )
    handler = Held()
    # The first of two pollers: three of the five.
    poller, _ = build_poller(
        config, config.mapping("scaled"), instance=0, invoker=DirectInvoker(handler)
    )
    thread = threading.Thread(target=poller.run, kwargs={"until_idle_s": 0.5})
    thread.start()
    try:
        eventually(lambda: handler.running == 3 and poller._starved)
        assert poller._in_flight == 3
    finally:
        handler.release.set()
        thread.join(GUARD_S)
        poller.stop()
    assert handler.peak == 3
    assert sorted(int(b) for b in handler.done) == list(range(12))
    assert counts(sqs_server, url) == (0, 0)
