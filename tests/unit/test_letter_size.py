"""Letters too large for their destination (issue 12, case 1): split per record, a record too
large alone kept without its payload, never the same oversized letter sent again, so no
partition stalls; a destination that is down still stalls rather than loses."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from connectors.kafka.shape import KafkaMeta, KafkaShape
from tests.engine import DirectInvoker, fake_broker, kafka_items, make_log_poller, value_of
from workers.app.dlq import LetterResult, Replayer, summary_row
from workers.engine.clock import FakeClock
from workers.engine.invoker import InvocationRequest
from workers.engine.letters import Condition, DeadLetters, parse_letter
from workers.engine.outcomes import ErrorInfo
from workers.engine.policy import BatchRunner, Policy
from workers.engine.ports import LetterTooLarge, StoredLetter
from workers.engine.records import Record
from workers.engine.stats import MappingStats

SHAPE = KafkaShape("b:9092")
ERROR = ErrorInfo("ValueError", "bad record", ["File handler.py, line 3"])
# Identical refusals of one letter after which a test calls it a stall and stops the engine
# (the unfixed engine retried the same letter forever).
STALL_REFUSALS = 20


class SizedDestination:
    """A destination that takes letters up to `limit` bytes of JSON body.

    `states_limit`: it says so beforehand (`max_letter_bytes`); otherwise only by refusing
    larger letters with LetterTooLarge (naming the limit when `names_limit`). `down_for`
    deliveries fail first as an outage would. Once the same letter has been refused
    STALL_REFUSALS times, `stop` is set (and `on_stall` called): the caller stalled on it.
    """

    def __init__(
        self,
        limit: int,
        *,
        states_limit: bool = False,
        names_limit: bool = False,
        down_for: int = 0,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self.states_limit = states_limit
        self.names_limit = names_limit
        self.down_for = down_for
        self.stop = threading.Event()
        self.on_stall = on_stall or self.stop.set
        self.letters: list[dict[str, Any]] = []
        self.attempts: list[tuple[int, int]] = []  # (records, body bytes) per deliver call
        self.refusals: dict[bytes, int] = {}
        self.stalled = False

    def max_letter_bytes(self) -> int | None:
        return self.limit if self.states_limit else None

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        body = orjson.dumps(letter)
        self.attempts.append((len(records), len(body)))
        if self.down_for > 0:
            self.down_for -= 1
            self._refused(body)
            raise ConnectionError("destination unreachable")
        if len(body) > self.limit:
            self._refused(body)
            raise LetterTooLarge(
                f"{len(body)} bytes over {self.limit}", self.limit if self.names_limit else None
            )
        self.letters.append(orjson.loads(body))

    def _refused(self, body: bytes) -> None:
        # The request id differs per letter, so identical bodies are the same letter again.
        self.refusals[body] = self.refusals.get(body, 0) + 1
        if self.refusals[body] >= STALL_REFUSALS and not self.stalled:
            self.stalled = True
            self.on_stall()

    def close(self) -> None:
        pass


class NoSizeDestination(SizedDestination):
    """The same without `max_letter_bytes`, as a destination that cannot tell its limit."""

    max_letter_bytes = None  # type: ignore[assignment]


def rec(offset: int, value_bytes: int, partition: int = 0) -> Record:
    return Record(
        f"orders-{partition}",
        offset,
        b"v" * value_bytes,
        key=b"k",
        timestamp_ms=1_700_000_000_000 + offset,
        size=value_bytes,
        meta=KafkaMeta("orders", partition),
    )


def dead_letters(destination: Any, stats: MappingStats | None = None) -> DeadLetters:
    return DeadLetters(
        mapping="m",
        function="f",
        destination=destination,
        shape=SHAPE,
        clock=FakeClock(),
        stats=stats or MappingStats(),
    )


def send(dl: DeadLetters, records: list[Record]) -> bool:
    assert isinstance(dl.destination, SizedDestination)
    return dl.send(records, Condition.RETRY_ATTEMPTS_EXHAUSTED, ERROR, 4, dl.destination.stop)


def offsets(letter: dict[str, Any]) -> list[int]:
    return [item["offset"] for item in kafka_items(letter["payload"])]


@pytest.mark.parametrize("states_limit", [True, False], ids=["stated", "refused"])
def test_a_batch_too_large_for_one_letter_goes_as_one_letter_per_record(
    states_limit: bool,
) -> None:
    dest = SizedDestination(4000, states_limit=states_limit)
    stats = MappingStats()
    records = [rec(10 + i, 1500) for i in range(5)]

    assert send(dead_letters(dest, stats), records)

    assert not dest.stalled
    assert [offsets(letter) for letter in dest.letters] == [[10], [11], [12], [13], [14]]
    assert all(len(orjson.dumps(letter)) <= 4000 for letter in dest.letters)
    assert all(letter["error"] == ERROR.as_json() for letter in dest.letters)
    assert all(letter["KafkaBatchInfo"]["batchSize"] == 1 for letter in dest.letters)
    # A stated limit splits before sending; a refused letter is not sent again as it was.
    assert [n for n, _ in dest.attempts] == ([] if states_limit else [5]) + [1] * 5
    assert stats.dead_lettered == 5 and stats.payload_omitted == 0


@pytest.mark.parametrize("states_limit", [True, False], ids=["stated", "refused"])
def test_a_record_too_large_alone_is_dead_lettered_without_payload_with_its_coordinates(
    states_limit: bool, caplog: pytest.LogCaptureFixture
) -> None:
    dest = SizedDestination(3000, states_limit=states_limit)
    stats = MappingStats()
    records = [rec(7, 100), rec(8, 50_000), rec(9, 100)]

    with caplog.at_level("WARNING", logger="workers.deadletter"):
        assert send(dead_letters(dest, stats), records)

    assert not dest.stalled
    assert len(dest.letters) == 3
    small_before, huge, small_after = dest.letters
    assert offsets(small_before) == [7] and offsets(small_after) == [9]
    assert "payload" not in huge
    assert huge["payloadOmitted"] is True
    assert huge["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    assert huge["error"] == ERROR.as_json()
    assert huge["KafkaBatchInfo"]["recordsInfo"] == {
        "orders-0": {
            "firstRecordOffset": "8",
            "lastRecordOffset": "8",
            "firstRecordTimestamp": "2023-11-14T22:13:20.008Z",
            "lastRecordTimestamp": "2023-11-14T22:13:20.008Z",
        }
    }
    assert huge["omitted"]["itemIdentifier"] == {"partition": "orders-0", "offset": 8}
    assert huge["omitted"]["condition"] == "RetryAttemptsExhausted"
    assert huge["omitted"]["letterBytes"] > 50_000
    assert stats.dead_lettered == 3 and stats.payload_omitted == 1
    assert "orders-0@8" in caplog.text and "without its payload" in caplog.text
    # A stated limit refuses nothing; refusals teach it, and no letter is refused twice.
    assert sorted(dest.refusals.values()) == ([] if states_limit else [1, 1])


def test_a_limit_learned_from_a_refusal_splits_later_letters_before_sending() -> None:
    dest = NoSizeDestination(3000, names_limit=True)
    dl = dead_letters(dest)
    assert send(dl, [rec(1, 1000), rec(2, 1000), rec(3, 1000)])
    assert len(dest.refusals) == 1
    dest.attempts.clear()

    assert send(dl, [rec(4, 1000), rec(5, 1000)])
    assert send(dl, [rec(6, 20_000)])

    assert [n for n, _ in dest.attempts] == [1, 1, 1]  # split or shrunk before sending
    assert len(dest.refusals) == 1  # nothing refused again
    assert dest.letters[-1]["payloadOmitted"] is True


def test_a_destination_that_is_down_stalls_and_never_splits_or_omits() -> None:
    dest = SizedDestination(10**9, down_for=3)
    stats = MappingStats()
    records = [rec(i, 2000) for i in range(4)]

    assert send(dead_letters(dest, stats), records)

    assert [n for n, _ in dest.attempts] == [4, 4, 4, 4]  # the same letter, retried
    assert len(dest.letters) == 1 and offsets(dest.letters[0]) == [0, 1, 2, 3]
    assert stats.dead_lettered == 4 and stats.payload_omitted == 0


def test_stopping_while_the_destination_is_down_leaves_the_records_unsettled() -> None:
    dest = SizedDestination(10**9, down_for=10**6)
    stats = MappingStats()

    assert not send(dead_letters(dest, stats), [rec(1, 10)])

    assert dest.letters == [] and stats.dead_lettered == 0


def test_a_destination_refusing_even_the_letter_without_payload_stalls_it() -> None:
    # No letter fits 200 bytes: losing the record's coordinates would be worse than stalling.
    dest = SizedDestination(200)
    stats = MappingStats()

    assert not send(dead_letters(dest, stats), [rec(1, 10)])

    assert dest.stalled and dest.letters == [] and stats.dead_lettered == 0


@pytest.mark.parametrize("states_limit", [True, False], ids=["stated", "refused"])
def test_a_huge_error_is_cut_before_a_payload_is_left_out(states_limit: bool) -> None:
    # A handler that puts the record in its exception: the error, not the record, is too large.
    dest = SizedDestination(20_000, states_limit=states_limit)
    huge_error = ErrorInfo("ValueError", "x" * 1_000_000, ["frame\n"] * 100_000)
    dl = dead_letters(dest)
    records = [rec(1, 100), rec(2, 100), rec(3, 50_000)]

    assert dl.send(records, Condition.RETRY_ATTEMPTS_EXHAUSTED, huge_error, 1, dest.stop)

    assert not dest.stalled
    first, second, huge = dest.letters
    assert offsets(first) == [1] and offsets(second) == [2]  # their payload kept
    assert huge["payloadOmitted"] is True
    for letter in (first, second, huge):
        assert letter["error"]["errorType"] == "ValueError"
        assert letter["error"]["errorMessage"] == "x" * 4096
        assert letter["error"]["truncated"] is True
        assert 0 < len(letter["error"]["stackTrace"]) < 1000


def test_a_record_over_maximum_batch_bytes_goes_through_the_same_size_handling() -> None:
    dest = SizedDestination(3000, states_limit=True)
    stats = MappingStats()
    settled: list[Record] = []
    runner = BatchRunner(
        mapping="m",
        function="f",
        policy=Policy(maximum_batch_bytes=10_000),
        invoker=DirectInvoker(lambda event, request: None),
        shape=SHAPE,
        ordered=True,
        dead_letters=dead_letters(dest, stats),
        settle=settled.extend,
        clock=FakeClock(),
        stats=stats,
    )
    records = [rec(1, 100), rec(2, 50_000), rec(3, 100)]

    assert runner.run(records, dest.stop)

    (letter,) = dest.letters
    assert letter["payloadOmitted"] is True
    assert letter["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    assert letter["omitted"]["itemIdentifier"] == {"partition": "orders-0", "offset": 2}
    assert sorted(r.position for r in settled) == [1, 2, 3]
    assert stats.succeeded == 2 and stats.payload_omitted == 1


def test_the_partition_moves_on_past_a_failing_batch_too_large_for_one_letter() -> None:
    """The issue's case on the engine: a failing batch whose letter the destination refuses,
    with bisect off, is dead-lettered per record and the offset is committed past it."""
    broker = fake_broker()
    broker.create_topic("t", 1)
    for i in range(20):
        value = b"fail" if i < 10 else b"ok"
        broker.produce("t", value + b"." * 3000 + str(i).encode(), None, partition=0)
    broker.produce("t", b"fail" + b"!" * 60_000, None, partition=0)
    broker.produce("t", b"ok-last", None, partition=0)

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        if any(value_of(i).startswith(b"fail") for i in kafka_items(event)):
            raise ValueError("poison")

    dest = NoSizeDestination(8000)
    policy = Policy(maximum_retry_attempts=0, bisect_batch_on_function_error=False)
    poller, _ = make_log_poller(
        broker,
        DirectInvoker(handler),
        policy=policy,
        destination=dest,  # type: ignore[arg-type]
        batch_size=10,
    )
    dest.on_stall = poller.stop

    poller.run(until_idle_s=1.0)

    assert not dest.stalled
    assert broker.committed_offsets("g", "t") == {"t-0": 22}
    kept = [o for letter in dest.letters if "payload" in letter for o in offsets(letter)]
    omitted = [letter for letter in dest.letters if letter.get("payloadOmitted")]
    assert [letter["omitted"]["itemIdentifier"]["offset"] for letter in omitted] == [20]
    # Without bisect a failing batch is dead-lettered whole: 21 goes with 20 if they shared one.
    assert kept in (list(range(10)), [*range(10), 21])
    stats = poller.stats.snapshot()
    assert stats["dead_lettered"] == len(kept) + 1 and stats["payload_omitted"] == 1


def test_a_letter_without_payload_is_listed_and_replay_skips_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dest = SizedDestination(3000, states_limit=True)
    assert send(dead_letters(dest), [rec(8, 50_000)])
    raw = orjson.dumps(dest.letters[0])
    letter, problem = parse_letter(raw)
    assert letter is not None, problem
    assert parse_letter(orjson.dumps({"requestContext": {"requestId": "x"}}))[0] is None
    stored = StoredLetter(letter["requestContext"]["requestId"], letter)

    row = summary_row(stored)
    assert row["condition"] == "MaximumPayloadSizeExceeded"
    assert row["records"] == 1
    assert row["source"] == "orders-0@8 (no payload)"

    class Store:
        def __init__(self) -> None:
            self.done_ids: list[str] = []

        def pending(self) -> Any:
            yield stored

        def done(self, s: StoredLetter) -> None:
            self.done_ids.append(s.id)

        def close(self) -> None:
            pass

    store = Store()
    invoker = DirectInvoker(lambda event, request: None)
    replayer = Replayer(
        mapping="m",
        function="f",
        store=store,
        to="handler",
        policy=Policy(),
        invoker=invoker,
        destination=SizedDestination(10**9),
        clock=FakeClock(),
    )
    with caplog.at_level("WARNING", logger="workers.dlq"):
        summary = replayer.run()
    assert store.done_ids == [] and invoker.calls == []
    assert summary.as_json()["skipped_no_payload"] == 1
    assert f"letter {stored.id} cannot be replayed and was skipped" in caplog.text
    assert summary.letters == 0 and summary.records == 0


def test_rabbitmq_size_refusal_is_read_from_the_channel_close() -> None:
    from connectors.rabbitmq.connection import size_refusal_limit

    text = (
        "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728"
    )
    assert size_refusal_limit(406, text) == 134_217_728
    assert size_refusal_limit(406, "PRECONDITION_FAILED - inequivalent arg 'durable'") is None
    assert size_refusal_limit(404, text) is None
    assert size_refusal_limit(406, "") is None


def test_each_replayed_letter_is_described_by_what_became_of_it() -> None:
    assert LetterResult(2, succeeded=2).describe("a") == "replayed a: 2 record(s) succeeded"
    assert (
        LetterResult(3, succeeded=1, dead_lettered=2).describe("b")
        == "b failed again: 2 record(s) dead-lettered anew, 1 succeeded"
    )
    assert (
        LetterResult(1, dropped=1).describe("c")
        == "c failed again: 1 record(s) dropped (no on-failure destination)"
    )
    assert LetterResult(2, dry_run=True).describe("d") == "would replay d (2 record(s))"
    assert (
        LetterResult(2, succeeded=2, to="source").describe("e")
        == "replayed e: 2 record(s) put back onto the source"
    )
