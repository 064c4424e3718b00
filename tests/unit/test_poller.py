"""The engine end to end on the memory broker: bisect, retries, partial responses, order."""

from __future__ import annotations

import math
import threading
from typing import Any

from connectors.memory.broker import MemoryDestination
from tests.engine import (
    DirectInvoker,
    Handler,
    fake_broker,
    kafka_items,
    letter_values,
    make_log_poller,
    make_queue_poller,
    rmq_items,
    value_of,
)
from workers.engine.invoker import InvocationRequest
from workers.engine.outcomes import RetryableError
from workers.engine.policy import Policy


def fill(broker: Any, n: int, topic: str = "t", partitions: int = 1, keys: int = 0) -> None:
    broker.create_topic(topic, partitions)
    for i in range(n):
        key = f"k{i % keys}".encode() if keys else None
        broker.produce(topic, f"{i}".encode(), key, partition=None if keys else i % partitions)


def answering(response: Any) -> Handler:
    """A handler that returns this response to every batch."""
    return lambda event, request: response


def test_one_poison_record_in_1000_with_bisect_dead_letters_only_it() -> None:
    broker = fake_broker()
    fill(broker, 1000)
    seen: dict[bytes, int] = {}
    lock = threading.Lock()

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        values = [value_of(i) for i in kafka_items(event)]
        if b"613" in values:
            raise ValueError("poison")
        with lock:
            for v in values:
                seen[v] = seen.get(v, 0) + 1

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    retries = 3
    policy = Policy(maximum_retry_attempts=retries, bisect_batch_on_function_error=True)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq, batch_size=1000)
    poller.run(until_idle_s=1.0)

    assert letter_values(dlq.letters) == [b"613"]
    assert len(dlq.letters) == 1
    letter = dlq.letters[0]
    assert letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert letter["error"]["errorType"] == "ValueError"
    assert letter["KafkaBatchInfo"]["recordsInfo"]["t-0"]["firstRecordOffset"] == "613"
    assert seen == {f"{i}".encode(): 1 for i in range(1000) if i != 613}
    assert len(invoker.calls) <= 2 * math.ceil(math.log2(1000)) + retries + 1
    assert broker.committed_offsets("g", "t") == {"t-0": 1000}
    stats = poller.stats.snapshot()
    assert stats["succeeded"] == 999 and stats["dead_lettered"] == 1
    assert stats["bisected"] == 10


def test_without_bisect_whole_batch_is_dead_lettered_after_retries() -> None:
    broker = fake_broker()
    fill(broker, 10)

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        if any(value_of(i) == b"3" for i in kafka_items(event)):
            raise ValueError("poison")

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=2)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq, batch_size=10)
    poller.run(until_idle_s=1.0)

    assert sorted(letter_values(dlq.letters)) == sorted(f"{i}".encode() for i in range(10))
    assert len(invoker.calls) == 3
    assert [req.attempt for req, _ in invoker.calls] == [1, 2, 3]
    assert dlq.letters[0]["requestContext"]["approximateInvokeCount"] == 3
    assert broker.committed_offsets("g", "t") == {"t-0": 10}


def test_retryable_error_retries_whole_batch_without_splitting() -> None:
    broker = fake_broker()
    fill(broker, 8)
    failures = {"left": 2}

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RetryableError("downstream unavailable")

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=5, bisect_batch_on_function_error=True)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq, batch_size=8)
    poller.run(until_idle_s=1.0)

    assert [len(kafka_items(e)) for _, e in invoker.calls] == [8, 8, 8]
    assert dlq.letters == []
    assert poller.stats.snapshot()["bisected"] == 0
    assert broker.committed_offsets("g", "t") == {"t-0": 8}


def test_partial_response_on_ordered_source_retries_from_lowest_failure() -> None:
    broker = fake_broker()
    fill(broker, 10)
    seen: list[list[bytes]] = []

    def handler(event: dict[str, Any], request: InvocationRequest) -> dict[str, Any]:
        items = kafka_items(event)
        seen.append([value_of(i) for i in items])
        failed = [i for i in items if value_of(i) in (b"4", b"7")]
        return {
            "batchItemFailures": [
                {"itemIdentifier": {"partition": "t-0", "offset": i["offset"]}} for i in failed
            ]
        }

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=1, report_batch_item_failures=True)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq, batch_size=10)
    poller.run(until_idle_s=1.0)

    # Everything from the lowest failure on is retried, in order, as Lambda does for streams.
    assert seen == [[f"{i}".encode() for i in range(10)], [f"{i}".encode() for i in range(4, 10)]]
    assert sorted(letter_values(dlq.letters)) == [b"4", b"7"]
    assert broker.committed_offsets("g", "t") == {"t-0": 10}
    assert poller.stats.snapshot()["succeeded"] == 8


def test_partial_response_on_unordered_source_acks_successes_retries_only_failures() -> None:
    broker = fake_broker()
    for i in range(10):
        broker.publish("q", f"{i}".encode())
    seen: list[list[bytes]] = []
    attempts: dict[bytes, int] = {}

    def handler(event: dict[str, Any], request: InvocationRequest) -> dict[str, Any]:
        items = rmq_items(event)
        seen.append([value_of(i) for i in items])
        failed = []
        for i in items:
            v = value_of(i)
            attempts[v] = attempts.get(v, 0) + 1
            # "2" recovers on its second attempt; "5" never does.
            if v == b"5" or (v == b"2" and attempts[v] == 1):
                failed.append({"itemIdentifier": {"queue": "q", "deliveryTag": i["deliveryTag"]}})
        return {"batchItemFailures": failed}

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=2, report_batch_item_failures=True)
    poller, source = make_queue_poller(broker, invoker, policy=policy, destination=dlq)
    poller.run(until_idle_s=1.0)

    assert seen[0] == [f"{i}".encode() for i in range(10)]
    assert seen[1:] == [[b"2", b"5"], [b"5"]]
    assert letter_values(dlq.letters) == [b"5"]
    assert sorted(source.acked) == list(range(1, 11))
    assert broker.queue_depth("q") == (0, 0)


def test_invalid_responses_fail_the_whole_batch() -> None:
    bad_responses: list[Any] = [
        {"batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": 999}}]},
        {"batchItemFailures": [{"itemIdentifier": ""}]},
        {"batchItemFailures": [{"itemIdentifier": None}]},
        {"batchItemFailures": [{"wrong": 1}]},
        {"batchItemFailures": "nope"},
        "a string",
    ]
    for response in bad_responses:
        broker = fake_broker()
        fill(broker, 3)
        invoker = DirectInvoker(answering(response))
        dlq = MemoryDestination()
        policy = Policy(maximum_retry_attempts=1, report_batch_item_failures=True)
        poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq)
        poller.run(until_idle_s=1.0)
        assert len(invoker.calls) == 2, response
        assert sorted(letter_values(dlq.letters)) == [b"0", b"1", b"2"], response
        assert dlq.letters[0]["error"]["errorType"] == "InvalidBatchResponse"


def test_empty_and_null_responses_are_success() -> None:
    responses: list[Any] = [None, {}, {"batchItemFailures": []}, {"batchItemFailures": None}]
    for response in responses:
        broker = fake_broker()
        fill(broker, 3)
        invoker = DirectInvoker(answering(response))
        dlq = MemoryDestination()
        policy = Policy(maximum_retry_attempts=0, report_batch_item_failures=True)
        poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq)
        poller.run(until_idle_s=1.0)
        assert len(invoker.calls) == 1 and dlq.letters == [], response


def test_records_past_maximum_age_are_dead_lettered_without_invoking_again() -> None:
    broker = fake_broker()
    broker.create_topic("t")
    now = broker.clock.wall_ms()
    broker.produce("t", b"old", timestamp_ms=now - 120_000)
    broker.produce("t", b"fresh", timestamp_ms=now)
    broker.produce("t", b"fails", timestamp_ms=now)
    invoked: list[bytes] = []

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        values = [value_of(i) for i in kafka_items(event)]
        invoked.extend(values)
        if b"fails" in values:
            raise ValueError("keeps failing")

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(
        maximum_retry_attempts=-1,
        maximum_record_age_s=60,
        bisect_batch_on_function_error=True,
        retry_backoff_base_s=5.0,
    )
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq)
    poller.run(until_idle_s=1.0)

    conditions = {
        value: letter["requestContext"]["condition"]
        for letter in dlq.letters
        for value in letter_values([letter])
    }
    # Infinite retries end when the failing record passes its maximum age.
    assert conditions == {b"old": "RecordAgeExceeded", b"fails": "RecordAgeExceeded"}
    assert b"old" not in invoked
    assert invoked.count(b"fresh") == 2  # once in the failing batch, once in its half
    assert broker.committed_offsets("g", "t") == {"t-0": 3}


def test_oversized_record_goes_to_destination_with_payload_condition() -> None:
    broker = fake_broker()
    broker.create_topic("t")
    broker.produce("t", b"x" * 5000)
    broker.produce("t", b"small")
    invoker = DirectInvoker(lambda event, request: None)
    dlq = MemoryDestination()
    policy = Policy(maximum_batch_bytes=2000)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq)
    poller.run(until_idle_s=1.0)
    assert [letter["requestContext"]["condition"] for letter in dlq.letters] == [
        "MaximumPayloadSizeExceeded"
    ]
    assert [value_of(i) for _, e in invoker.calls for i in kafka_items(e)] == [b"small"]


def test_no_destination_drops_and_counts() -> None:
    broker = fake_broker()
    fill(broker, 3)

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        raise ValueError("always")

    invoker = DirectInvoker(handler)
    policy = Policy(maximum_retry_attempts=0)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=None)
    poller.run(until_idle_s=1.0)
    assert poller.stats.snapshot()["dropped"] == 3
    assert broker.committed_offsets("g", "t") == {"t-0": 3}


def test_destination_outage_stalls_checkpoint_but_loses_nothing() -> None:
    broker = fake_broker()
    fill(broker, 2)

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        raise ValueError("always")

    dlq = MemoryDestination(fail_next=3)
    policy = Policy(maximum_retry_attempts=0)
    poller, _ = make_log_poller(broker, DirectInvoker(handler), policy=policy, destination=dlq)
    poller.run(until_idle_s=1.0)
    assert sorted(letter_values(dlq.letters)) == [b"0", b"1"]
    assert broker.committed_offsets("g", "t") == {"t-0": 2}


def test_key_order_holds_with_parallelization_while_failures_happen() -> None:
    broker = fake_broker()
    fill(broker, 2000, partitions=2, keys=50)
    last: dict[tuple[str, bytes], int] = {}
    handled: dict[tuple[str, int], int] = {}
    violations: list[str] = []
    lock = threading.Lock()
    calls = {"n": 0}

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        with lock:
            calls["n"] += 1
            fail = calls["n"] % 7 == 0
        if fail:
            raise RetryableError("transient")
        with lock:
            for item in kafka_items(event):
                part, key = f"t-{item['partition']}", item["key"].encode()
                prev = last.get((part, key), -1)
                if item["offset"] < prev:
                    violations.append(f"{part} {key!r} {item['offset']} after {prev}")
                last[(part, key)] = item["offset"]
                handled[(part, item["offset"])] = handled.get((part, item["offset"]), 0) + 1

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=-1, retry_backoff_base_s=0.01)
    poller, _ = make_log_poller(
        broker,
        invoker,
        policy=policy,
        destination=dlq,
        batch_size=20,
        parallelization_factor=8,
    )
    poller.run(until_idle_s=1.0)

    assert violations == []
    ends = broker.end_offsets("t")
    assert sorted(handled) == sorted((p, o) for p, n in ends.items() for o in range(n))
    assert set(handled.values()) == {1}
    assert broker.committed_offsets("g", "t") == ends
    assert dlq.letters == []


def test_filtered_records_are_checkpointed_never_invoked() -> None:
    broker = fake_broker()
    broker.create_topic("t")
    for i in range(10):
        broker.produce("t", b'{"kind": "%s"}' % (b"order" if i % 2 else b"noise"))
    invoker = DirectInvoker(lambda event, request: None)
    poller, _ = make_log_poller(
        broker,
        invoker,
        policy=Policy(),
        destination=None,
        record_filter=lambda view: view["value"]["kind"] == "order",
    )
    poller.run(until_idle_s=1.0)
    invoked = [value_of(i) for _, e in invoker.calls for i in kafka_items(e)]
    assert len(invoked) == 5 and all(b"order" in v for v in invoked)
    assert poller.stats.snapshot()["filtered_out"] == 5
    assert broker.committed_offsets("g", "t") == {"t-0": 10}


def test_restart_resumes_from_committed_offsets_without_repeats() -> None:
    broker = fake_broker()
    fill(broker, 50)
    handled: list[bytes] = []
    invoker = DirectInvoker(
        lambda event, request: handled.extend(value_of(i) for i in kafka_items(event))
    )
    poller, _ = make_log_poller(broker, invoker, policy=Policy(), destination=None, batch_size=10)
    poller.run(until_idle_s=1.0)
    for i in range(50, 60):
        broker.produce("t", f"{i}".encode())
    poller, _ = make_log_poller(broker, invoker, policy=Policy(), destination=None, batch_size=10)
    poller.run(until_idle_s=1.0)
    assert handled == [f"{i}".encode() for i in range(60)]


def test_queue_redelivers_unsettled_messages_with_attempt_counts() -> None:
    broker = fake_broker()
    broker.publish("q", b"a")
    stop_after_first: dict[str, Any] = {}

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        stop_after_first.setdefault("attempts", []).append(request.attempt)
        stop_after_first["poller"].stop()
        raise ValueError("fails, then the worker stops before retrying")

    invoker = DirectInvoker(handler)
    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=1)
    poller, _ = make_queue_poller(broker, invoker, policy=policy, destination=dlq)
    stop_after_first["poller"] = poller
    poller.run(until_idle_s=1.0)
    assert broker.queue_depth("q") == (1, 0)  # back on the queue, unacked nothing
    assert dlq.letters == []

    # The next consumer sees the broker's delivery count: one retry left, then dead-lettered.
    poller, _ = make_queue_poller(broker, invoker, policy=policy, destination=dlq)
    stop_after_first["poller"] = poller
    poller.run(until_idle_s=1.0)
    assert stop_after_first["attempts"] == [1, 2]


def test_broker_delivery_counts_alone_never_dead_letter_without_an_invocation() -> None:
    broker = fake_broker()
    for i in range(4):
        broker.publish("q", f"{i}".encode())
    # Deliveries that never reached a handler here (a lost connection, say): counts go up.
    for _ in range(5):
        source = make_queue_poller(
            broker, DirectInvoker(lambda e, r: None), policy=Policy(), destination=None
        )[1]
        source.poll(10, 0)
        source.close()
    seen: list[bytes] = []

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        values = [value_of(i) for i in rmq_items(event)]
        seen.extend(values)
        if b"2" in values:
            raise ValueError("poison")

    dlq = MemoryDestination()
    policy = Policy(maximum_retry_attempts=1, bisect_batch_on_function_error=True)
    poller, _ = make_queue_poller(broker, DirectInvoker(handler), policy=policy, destination=dlq)
    poller.run(until_idle_s=1.0)
    # Every record was invoked; only the failing one is dead-lettered, right after failing once.
    assert {b"0", b"1", b"3"} <= set(seen)
    assert letter_values(dlq.letters) == [b"2"]
    assert broker.queue_depth("q") == (0, 0)


def test_ignored_partial_response_succeeds_and_warns_once(caplog: Any) -> None:
    broker = fake_broker()
    fill(broker, 6)
    response = {"batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": 0}}]}
    invoker = DirectInvoker(answering(response))
    dlq = MemoryDestination()
    # Without ReportBatchItemFailures, Lambda ignores the response: the batch succeeded.
    policy = Policy(maximum_retry_attempts=0)
    poller, _ = make_log_poller(broker, invoker, policy=policy, destination=dlq, batch_size=2)
    with caplog.at_level("WARNING", logger="workers.policy"):
        poller.run(until_idle_s=1.0)

    assert len(invoker.calls) == 3
    assert dlq.letters == []
    assert broker.committed_offsets("g", "t") == {"t-0": 6}
    warnings = [r.getMessage() for r in caplog.records if r.name == "workers.policy"]
    assert len(warnings) == 1
    assert "ignored" in warnings[0]
    assert "function_response_types: [ReportBatchItemFailures]" in warnings[0]


def test_no_warning_when_partial_responses_are_reported_or_empty(caplog: Any) -> None:
    for response, report in (({"batchItemFailures": []}, False), (None, False), ({}, True)):
        broker = fake_broker()
        fill(broker, 2)
        invoker = DirectInvoker(answering(response))
        policy = Policy(maximum_retry_attempts=0, report_batch_item_failures=report)
        poller, _ = make_log_poller(broker, invoker, policy=policy, destination=None)
        with caplog.at_level("WARNING", logger="workers.policy"):
            poller.run(until_idle_s=1.0)
        assert [r for r in caplog.records if r.name == "workers.policy"] == [], response
