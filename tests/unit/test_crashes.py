"""No value in a record crashes the engine, and records pollers died on are counted: the engine
on the memory broker, with records a connector could not convert or a shape cannot build."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika.data
import pytest

import connectors.rabbitmq.connection  # noqa: F401  (installs connectors.rabbitmq.pika_compat)
from connectors.kafka.shape import KafkaMeta
from connectors.memory.broker import MemoryBroker, MemoryDestination, MemoryLogSource
from connectors.rabbitmq.shape import java_date
from tests.engine import DirectInvoker, fake_broker, kafka_items, value_of
from workers.engine.batcher import BatchLimits
from workers.engine.flight import DeathCounts, InFlightFile, Suspects, read_in_flight
from workers.engine.letters import iso_ms
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerFailed, PollerSettings
from workers.engine.ports import undecodable
from workers.engine.records import Record

Mangle = Callable[[Record], Record]


class MangledSource(MemoryLogSource):
    """The memory log, with some records changed on the way out (as a broken message would be)."""

    def __init__(self, broker: MemoryBroker, mangle: Mangle) -> None:
        super().__init__(broker, "t", "g")
        self.mangle = mangle

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        return [self.mangle(r) for r in super().poll(max_records, timeout_s)]


def poller_for(
    broker: MemoryBroker,
    invoker: DirectInvoker,
    destination: MemoryDestination,
    mangle: Mangle = lambda r: r,
    record_filter: Callable[[Any], bool] | None = None,
    suspects: list[list[Any]] | None = None,
    in_flight: Path | None = None,
) -> tuple[Poller, MangledSource]:
    source = MangledSource(broker, mangle)
    poller = Poller(
        PollerSettings(mapping="m", function="f", limits=BatchLimits(batch_size=100)),
        source=source,
        invoker=invoker,
        policy=Policy(maximum_retry_attempts=0, bisect_batch_on_function_error=True),
        destination=destination,
        record_filter=record_filter,
        clock=broker.clock,
        suspects=suspects,
        in_flight_path=in_flight,
    )
    return poller, source


def values_invoked(invoker: DirectInvoker) -> list[list[bytes]]:
    return [[value_of(i) for i in kafka_items(event)] for _, event in invoker.calls]


def filled(n: int) -> MemoryBroker:
    broker = fake_broker()
    broker.create_topic("t")
    for i in range(n):
        broker.produce("t", f"{i}".encode())
    return broker


def test_timestamps_of_any_size_make_valid_dates() -> None:
    assert iso_ms(2**50) == "9999-12-31T23:59:59.999Z"
    assert iso_ms(-(2**63)) == "0001-01-01T00:00:00.000Z"
    assert iso_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert java_date(2**40) == "Dec 31, 9999, 11:59:59 PM"
    assert java_date(2**64 - 1) == "Dec 31, 9999, 11:59:59 PM"
    assert java_date(-(2**40)) == "Jan 1, 1, 12:00:00 AM"


def _table(name: bytes, kind: bytes, payload: bytes) -> bytes:
    field = bytes([len(name)]) + name + kind + payload
    return struct.pack(">I", len(field)) + field


def test_pika_decodes_header_fields_it_cannot_represent_to_raw_numbers() -> None:
    decoded, _ = pika.data.decode_table(_table(b"ts", b"T", struct.pack(">Q", 2**40)), 0)
    assert decoded == {"ts": 2**40}
    decoded, _ = pika.data.decode_table(_table(b"ts", b"T", struct.pack(">Q", 1_700_000_000)), 0)
    assert decoded["ts"].year == 2023  # in range: a datetime, as pika gives it
    decoded, _ = pika.data.decode_table(_table(b"d", b"d", struct.pack(">d", float("inf"))), 0)
    assert decoded == {"d": float("inf")}


def test_a_record_the_connector_could_not_convert_is_dead_lettered_without_invoking() -> None:
    broker = filled(6)

    def mangle(r: Record) -> Record:
        if r.value != b"3":
            return r
        exc = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return undecodable(r.source, r.position, b"\xff raw", exc, meta=r.meta)

    invoker = DirectInvoker(lambda event, request: None)
    dlq = MemoryDestination()
    poller, _ = poller_for(broker, invoker, dlq, mangle)
    poller.run(until_idle_s=1.0)

    assert values_invoked(invoker) == [[b"0", b"1", b"2"], [b"4", b"5"]]
    [letter] = dlq.letters
    assert letter["requestContext"]["condition"] == "InvalidRecord"
    assert letter["requestContext"]["approximateInvokeCount"] == 0
    assert letter["error"]["errorType"] == "Runtime.UndecodableRecord"
    assert "UnicodeDecodeError" in letter["error"]["errorMessage"]
    [item] = kafka_items(letter["payload"])
    assert value_of(item) == b"\xff raw" and item["offset"] == 3
    assert broker.committed_offsets("g", "t") == {"t-0": 6}


def test_a_record_whose_event_cannot_be_built_is_dead_lettered_and_the_rest_invoked() -> None:
    broker = filled(5)

    def mangle(r: Record) -> Record:
        if r.value == b"2":
            r.headers = [("bad", 5)]  # type: ignore[list-item]  # not bytes: no event item
        return r

    invoker = DirectInvoker(lambda event, request: None)
    dlq = MemoryDestination()
    poller, _ = poller_for(broker, invoker, dlq, mangle)
    poller.run(until_idle_s=1.0)

    assert values_invoked(invoker) == [[b"0", b"1", b"3", b"4"]]
    [letter] = dlq.letters
    assert letter["requestContext"]["condition"] == "InvalidRecord"
    assert letter["error"]["errorType"] == "Runtime.EventBuildError"
    # Not even the letter's payload can be built: it goes without, with the coordinates.
    assert letter["payloadOmitted"] is True and "payload" not in letter
    assert letter["omitted"]["itemIdentifiers"] == [{"partition": "t-0", "offset": 2}]
    assert letter["KafkaBatchInfo"]["recordsInfo"]["t-0"]["firstRecordOffset"] == "2"
    assert broker.committed_offsets("g", "t") == {"t-0": 5}


def test_a_record_the_filter_cannot_judge_is_kept() -> None:
    broker = filled(4)

    def matches(view: dict[str, Any]) -> bool:
        if view["value"] == 2:
            raise TypeError("cannot compare")
        return bool(view["value"] % 2)

    invoker = DirectInvoker(lambda event, request: None)
    dlq = MemoryDestination()
    poller, _ = poller_for(broker, invoker, dlq, record_filter=matches)
    poller.run(until_idle_s=1.0)

    assert values_invoked(invoker) == [[b"1", b"2", b"3"]]
    assert poller.stats.snapshot()["filtered_out"] == 1


def test_a_batch_failing_in_the_engine_makes_the_poller_fail() -> None:
    broker = filled(3)
    invoker = DirectInvoker(lambda event, request: None)
    poller, _ = poller_for(broker, invoker, MemoryDestination())

    def broken(records: Any) -> None:
        raise RuntimeError("settling failed")

    poller.runner.settle = broken
    with pytest.raises(PollerFailed) as failed:
        poller.run(until_idle_s=1.0)
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert broker.committed_offsets("g", "t") == {}


def test_suspects_run_alone_and_records_with_three_deaths_are_dead_lettered() -> None:
    broker = filled(8)
    # Deaths as the supervisor passes them: a batch range once, then 3 and 4 alone.
    suspects = [["range", "t-0", 2, 5, 1], ["range", "t-0", 3, 3, 2], ["range", "t-0", 5, 5, 1]]
    invoker = DirectInvoker(lambda event, request: None)
    dlq = MemoryDestination()
    poller, _ = poller_for(broker, invoker, dlq, suspects=suspects)
    poller.run(until_idle_s=1.0)

    assert values_invoked(invoker) == [[b"0", b"1"], [b"2"], [b"4"], [b"5"], [b"6", b"7"]]
    [letter] = dlq.letters
    assert letter["error"]["errorType"] == "Runtime.PollerDied"
    assert letter["requestContext"]["approximateInvokeCount"] == 3
    assert [value_of(i) for i in kafka_items(letter["payload"])] == [b"3"]
    assert broker.committed_offsets("g", "t") == {"t-0": 8}


def test_in_flight_file_names_running_invocations_for_the_death_counts(tmp_path: Path) -> None:
    path = tmp_path / "poller.inflight"
    meta = KafkaMeta("t", 0)
    records = [Record("t-0", p, b"", meta=meta) for p in (7, 9, 8)]
    redis_like = [Record("s", (1 << 50 << 64) | 3, b"")]
    flight = InFlightFile(path, True, lambda r: "unused")
    first = flight.begin(records)
    flight.begin(redis_like)
    flight.end(first)
    entries = read_in_flight(path)
    assert entries == [["range", "s", (1 << 50 << 64) | 3, (1 << 50 << 64) | 3]]

    deaths = DeathCounts()
    deaths.add(entries)
    deaths.add([["range", "t-0", 7, 9], ["id", "q:abc"]])
    suspects = Suspects(deaths.suspects(), lambda r: f"q:{r.value.decode()}")
    assert suspects.deaths(redis_like[0]) == 1
    assert suspects.deaths(records[0]) == 1
    assert suspects.deaths(Record("t-0", 10, b"")) == 0
    assert suspects.deaths(Record("q", 1, b"abc")) == 1

    # A write cut short by death leaves the previous, longer content behind the first line.
    flight.close()
    path.write_bytes(b'[["id","x"]]\n"torn')
    assert read_in_flight(path) == [["id", "x"]]
    path.write_bytes(b"[[")
    assert read_in_flight(path) == []


def test_in_flight_file_names_records_without_stable_positions_by_fingerprint(
    tmp_path: Path,
) -> None:
    path = tmp_path / "poller.inflight"
    flight = InFlightFile(path, False, lambda r: f"q:{r.value.decode()}")
    first = flight.begin([Record("q", 1, b"a"), Record("q", 2, '\u00e9"'.encode())])
    second = flight.begin([Record("q", 3, b"c")])
    assert read_in_flight(path) == [["id", "q:a"], ["id", 'q:\u00e9"'], ["id", "q:c"]]
    flight.end(first)
    assert read_in_flight(path) == [["id", "q:c"]]
    flight.end(second)
    assert read_in_flight(path) == []
    flight.close()


def test_an_identifier_of_digits_int_cannot_read_fails_the_batch_not_the_poller() -> None:
    broker = filled(2)
    responses = iter(
        [{"batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": "²"}}]}, None]
    )
    invoker = DirectInvoker(lambda event, request: next(responses))
    source = MemoryLogSource(broker, "t", "g")
    poller = Poller(
        PollerSettings(mapping="m", function="f"),
        source=source,
        invoker=invoker,
        policy=Policy(maximum_retry_attempts=1, report_batch_item_failures=True),
        destination=MemoryDestination(),
        clock=broker.clock,
    )
    poller.run(until_idle_s=1.0)

    assert len(invoker.calls) == 2  # an invalid response, then a retry that succeeds
    assert broker.committed_offsets("g", "t") == {"t-0": 2}


def test_a_record_the_connector_could_not_convert_is_never_filtered_out() -> None:
    broker = filled(3)

    def mangle(r: Record) -> Record:
        if r.value != b"1":
            return r
        return undecodable(r.source, r.position, b"\xff", ValueError("broken"), meta=r.meta)

    invoker = DirectInvoker(lambda event, request: None)
    dlq = MemoryDestination()
    poller, _ = poller_for(broker, invoker, dlq, mangle, record_filter=lambda view: False)
    poller.run(until_idle_s=1.0)

    assert invoker.calls == []
    [letter] = dlq.letters
    assert letter["requestContext"]["condition"] == "InvalidRecord"
    assert broker.committed_offsets("g", "t") == {"t-0": 3}
