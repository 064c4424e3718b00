"""Pure engine pieces: batcher, checkpoint tracker, backoff, event shapes, dead-letter record."""

from __future__ import annotations

import base64
import random
import threading
import uuid

import pika
import pytest

from connectors.kafka.shape import KafkaMeta, KafkaShape
from connectors.rabbitmq.shape import RabbitMeta, RabbitShape, basic_properties, record_headers
from connectors.redis.shape import RedisMeta, RedisShape, format_stream_id, parse_stream_id
from workers.engine.backoff import Backoff
from workers.engine.batcher import BatchLimits, LaneBuffer, runs_by_unit
from workers.engine.checkpoint import CheckpointTracker
from workers.engine.invoker import new_request_id
from workers.engine.letters import Condition, build_letter
from workers.engine.outcomes import ErrorInfo, InvalidResponse, PartialFailure, Success
from workers.engine.policy import Policy
from workers.engine.ports import EventShape, prefetch_window
from workers.engine.records import Record
from workers.engine.responses import interpret
from workers.engine.shapes import encoded_size


def rec(pos: int, size: int = 10, source: str = "t-0", key: bytes | None = None) -> Record:
    return Record(source, pos, b"v", key=key, size=size, meta=KafkaMeta("t", 0))


class TestLaneBuffer:
    def test_ready_by_count_bytes_or_window(self) -> None:
        limits = BatchLimits(batch_size=3, maximum_batch_bytes=100, maximum_batching_window_s=2)
        buf = LaneBuffer()
        assert buf.ready_in(limits, 0.0) is None
        buf.add(rec(0), now=10.0)
        assert buf.ready_in(limits, 10.5) == pytest.approx(1.5)
        assert buf.ready_in(limits, 12.0) == 0.0
        buf.add(rec(1), 10.1)
        buf.add(rec(2), 10.2)
        assert buf.ready_in(limits, 10.2) == 0.0  # full by count
        big = LaneBuffer()
        big.add(rec(0, size=150), 0.0)
        assert big.ready_in(limits, 0.0) == 0.0  # full by bytes

    def test_take_respects_count_and_bytes_but_always_one(self) -> None:
        limits = BatchLimits(batch_size=3, maximum_batch_bytes=25)
        buf = LaneBuffer()
        for i in range(5):
            buf.add(rec(i, size=10), 0.0)
        assert [r.position for r in buf.take(limits)] == [0, 1]
        assert [r.position for r in buf.take(limits)] == [2, 3]
        assert buf.nbytes == 10
        huge = LaneBuffer()
        huge.add(rec(9, size=1000), 0.0)
        assert [r.position for r in huge.take(limits)] == [9]

    def test_take_under_the_byte_cap_takes_by_count_and_keeps_the_byte_total(self) -> None:
        limits = BatchLimits(batch_size=3, maximum_batch_bytes=1000)
        buf = LaneBuffer()
        buf.extend([rec(i, size=10 + i) for i in range(5)], 0.0)
        assert buf.nbytes == 60
        assert [r.position for r in buf.take(limits)] == [0, 1, 2]
        assert buf.nbytes == 27  # what is left: 13 + 14
        assert [r.position for r in buf.take(limits)] == [3, 4]
        assert buf.nbytes == 0 and len(buf) == 0


def test_runs_by_unit_keeps_order_within_and_across_runs() -> None:
    one = [rec(i) for i in range(3)]
    assert [(u, [r.position for r in run]) for u, run in runs_by_unit(one)] == [("t-0", [0, 1, 2])]
    mixed = [rec(0), rec(0, source="t-1"), rec(1, source="t-1"), rec(1)]
    assert [(u, [r.position for r in run]) for u, run in runs_by_unit(mixed)] == [
        ("t-0", [0]),
        ("t-1", [0, 1]),
        ("t-0", [1]),
    ]
    assert runs_by_unit([]) == []


class TestCheckpointTracker:
    def test_commits_only_contiguous_settled_prefix(self) -> None:
        t = CheckpointTracker()
        for pos in range(5, 10):
            assert t.track("p", pos)
        t.settle("p", [7, 8])
        assert t.advance() == {"p": 5}
        t.settle("p", [5])
        assert t.advance() == {"p": 6}
        t.settle("p", [6, 9])
        assert t.advance() == {"p": 10}
        assert t.advance() == {}

    def test_gaps_in_offsets_are_fine_and_duplicates_refused(self) -> None:
        t = CheckpointTracker()
        assert t.track("p", 0) and t.track("p", 4)  # compacted topic: offsets 1-3 gone
        assert not t.track("p", 4) and not t.track("p", 2)
        t.settle("p", [0, 4])
        assert t.advance() == {"p": 5}

    def test_forget_drops_revoked_units(self) -> None:
        t = CheckpointTracker()
        t.track("p", 0)
        t.forget(["p"])
        assert not t.knows("p") and t.advance() == {}


def test_backoff_is_full_jitter_capped_and_resets() -> None:
    b = Backoff(base_s=1.0, cap_s=8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert delays[0] <= 1.0 and delays[1] <= 2.0 and delays[2] <= 4.0
    assert max(delays[3:]) > 4.0  # reaches past the early ceilings, bounded by the cap
    b.reset()
    assert b.next_delay() <= 1.0


class TestShapes:
    def test_kafka_event_is_lambdas_self_managed_kafka_shape(self) -> None:
        shape = KafkaShape("b:9092")
        r = Record(
            "orders-1",
            17,
            b"hello",
            key=b"k",
            timestamp_ms=1_700_000_000_000,
            headers=[("h", b"ab")],
            meta=KafkaMeta("orders", 1),
        )
        keyless = Record("orders-1", 18, b"x", meta=KafkaMeta("orders", 1))
        event = shape.event([r, keyless])
        assert event == {
            "eventSource": "SelfManagedKafka",
            "bootstrapServers": "b:9092",
            "records": {
                "orders-1": [
                    {
                        "topic": "orders",
                        "partition": 1,
                        "offset": 17,
                        "timestamp": 1_700_000_000_000,
                        "timestampType": "CREATE_TIME",
                        "key": base64.b64encode(b"k").decode(),
                        "value": base64.b64encode(b"hello").decode(),
                        "headers": [{"h": [97, 98]}],
                    },
                    {
                        "topic": "orders",
                        "partition": 1,
                        "offset": 18,
                        "timestamp": 0,
                        "timestampType": "CREATE_TIME",
                        "value": base64.b64encode(b"x").decode(),
                        "headers": [],
                    },
                ]
            },
        }
        assert shape.parse_item({"partition": "orders-1", "offset": "17"}) == shape.item_key(r)
        for bad in [None, "", {}, {"partition": "orders-1"}, {"offset": 1}, {"partition": 3}]:
            assert shape.parse_item(bad) is None

    def test_rabbit_event_is_lambdas_rmq_shape(self) -> None:
        shape = RabbitShape("h:5672")
        props = {"contentType": "application/json", "headers": None, "deliveryMode": 2}
        r = Record("q", 1, b"{}", redelivered=True, meta=RabbitMeta("q", "/", 5, props))
        event = shape.event([r])
        assert event["eventSource"] == "aws:rmq"
        assert event["rmqMessagesByQueue"] == {
            "q::/": [
                {"basicProperties": props, "redelivered": True, "data": "e30=", "deliveryTag": 5}
            ]
        }
        assert shape.parse_item({"queue": "q", "deliveryTag": 5}) == shape.item_key(r)

    def test_redis_event_and_stream_ids(self) -> None:
        shape = RedisShape("h:6379/0")
        entry = "1700000000000-3"
        pos = parse_stream_id(entry)
        assert format_stream_id(pos) == entry
        assert parse_stream_id("1700000000000-10") > pos > parse_stream_id("1699999999999-99")
        r = Record(
            "s", pos, b"", timestamp_ms=1_700_000_000_000, meta=RedisMeta("s", entry, {"f": b"1"})
        )
        assert shape.event([r]) == {
            "eventSource": "redis:streams",
            "records": {
                "s": [
                    {
                        "stream": "s",
                        "id": entry,
                        "timestamp": 1_700_000_000_000,
                        "fields": {"f": "MQ=="},
                    }
                ]
            },
        }
        assert shape.parse_item({"stream": "s", "id": entry}) == shape.item_key(r)
        assert shape.filter_view(r)["fields"] == {"f": 1}

    def test_encoded_size_accounts_for_base64(self) -> None:
        assert encoded_size(b"x" * 300) == 400 + encoded_size(b"")


def test_interpret_reads_batch_item_failures_like_lambda() -> None:
    shape = KafkaShape("b")
    records = [rec(0), rec(1)]
    assert isinstance(interpret({"x": 1}, records, shape, True), Success)
    assert isinstance(interpret("anything", records, shape, False), Success)
    partial = interpret(
        {"batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": 1}}]},
        records,
        shape,
        True,
    )
    assert partial == PartialFailure(frozenset({("t-0", 1)}))
    assert isinstance(interpret([1], records, shape, True), InvalidResponse)


def test_dead_letter_record_is_lambda_superset_with_payload() -> None:
    shape = KafkaShape("b:9092")
    r = Record("orders-0", 17, b"v", timestamp_ms=1_700_000_000_000, meta=KafkaMeta("orders", 0))
    letter = build_letter(
        mapping="m",
        function="f",
        condition=Condition.RETRY_ATTEMPTS_EXHAUSTED,
        invoke_count=4,
        error=ErrorInfo("ValueError", "bad", ["line"]),
        records=[r],
        shape=shape,
        now_ms=1_700_000_000_123,
    )
    assert letter["version"] == "1.0"
    assert letter["timestamp"] == "2023-11-14T22:13:20.123Z"
    assert letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert letter["requestContext"]["approximateInvokeCount"] == 4
    assert letter["requestContext"]["functionArn"].endswith(":function:f")
    assert letter["responseContext"]["functionError"] == "Unhandled"
    assert letter["KafkaBatchInfo"] == {
        "batchSize": 1,
        "bootstrapServers": "b:9092",
        "recordsInfo": {
            "orders-0": {
                "firstRecordOffset": "17",
                "lastRecordOffset": "17",
                "firstRecordTimestamp": "2023-11-14T22:13:20.000Z",
                "lastRecordTimestamp": "2023-11-14T22:13:20.000Z",
            }
        },
    }
    assert letter["error"] == {
        "errorType": "ValueError",
        "errorMessage": "bad",
        "stackTrace": ["line"],
    }
    assert letter["payload"] == shape.event([r])
    assert letter["mapping"] == "m"


def test_policy_exhaustion_counts() -> None:
    assert not Policy(maximum_retry_attempts=-1).exhausted(10**6)
    assert not Policy(maximum_retry_attempts=2).exhausted(2)
    assert Policy(maximum_retry_attempts=2).exhausted(3)
    assert Policy(maximum_retry_attempts=0).exhausted(1)


def test_records_read_back_from_events_match_what_built_them() -> None:
    kafka = [
        Record(
            "t-2",
            5,
            b"v1",
            key=b"k",
            timestamp_ms=1_700_000_000_000,
            headers=[("h", b"x"), ("h", b"y")],
            meta=KafkaMeta("t", 2),
        ),
        Record("t-2", 6, b"v2", timestamp_ms=1_700_000_000_001, meta=KafkaMeta("t", 2)),
    ]
    # As the RabbitMQ source builds a record of a delivery.
    props = pika.BasicProperties(
        content_type="text/plain", headers={"s": "x", "b": True, "n": 7}, timestamp=1_700_000_000
    )
    rmq = [
        Record(
            "q",
            1,
            b"m",
            timestamp_ms=1_700_000_000_000,
            headers=record_headers(props.headers)[0],
            meta=RabbitMeta("q", "/v", 9, basic_properties(props, 1)),
        )
    ]
    redis = [
        Record(
            "s",
            parse_stream_id("1700000000000-1"),
            b"",
            timestamp_ms=1_700_000_000_000,
            meta=RedisMeta("s", "1700000000000-1", {"a": b"1", "b": b"\xff"}),
        )
    ]
    cases: list[tuple[EventShape, list[Record]]] = [
        (KafkaShape("b"), kafka),
        (RabbitShape("h"), rmq),
        (RedisShape("h"), redis),
    ]
    for shape, records in cases:
        back = shape.records(shape.event(records))
        assert shape.event(back) == shape.event(records)
        assert [shape.item_key(r) for r in back] == [shape.item_key(r) for r in records]
    assert [
        (r.key, r.value, list(r.headers))
        for r in KafkaShape("b").records(KafkaShape("b").event(kafka))
    ] == [(r.key, r.value, list(r.headers)) for r in kafka]
    assert [
        (r.value, list(r.headers), r.timestamp_ms)
        for r in RabbitShape("h").records(RabbitShape("h").event(rmq))
    ] == [(r.value, list(r.headers), r.timestamp_ms) for r in rmq]


def test_request_ids_are_distinct_version_4_uuids() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:50]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_the_default_prefetch_window_holds_four_rounds_of_batches_within_bounds() -> None:
    assert prefetch_window(500, 1) == 2000
    assert prefetch_window(100, 2) == 800
    assert prefetch_window(10, 1) == 100  # at least 100
    assert prefetch_window(500, 10) == 5000  # at most 5000
    assert prefetch_window(10_000, 1) == 10_000  # but never below one batch


def test_a_replay_runs_off_the_main_thread_and_its_result_or_error_comes_back() -> None:
    from workers.app.cli import _off_the_main_thread

    assert _off_the_main_thread(lambda: threading.current_thread().name) == "replay"

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        _off_the_main_thread(fail)
