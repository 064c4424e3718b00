"""The connector contract, as tests every real broker's connector must pass.

Each broker module subclasses `SourceContract` and provides the hooks at the top; the tests
below then run against that broker over real connections.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Collection, Sequence
from typing import Any

from tests.engine import DirectInvoker
from workers.engine.batcher import BatchLimits
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.ports import Destination, Source
from workers.engine.records import Record


class RecordingListener:
    def __init__(self) -> None:
        self.assigned: set[str] = set()
        self.revoked: set[str] = set()

    def on_assigned(self, units: Collection[str]) -> None:
        self.assigned |= set(units)

    def on_revoked(self, units: Collection[str]) -> None:
        self.revoked |= set(units)


def poll_n(source: Source, n: int, timeout_s: float = 30.0) -> list[Record]:
    """Poll until `n` records arrived (or the timeout passed)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(source.poll(n - len(out), 0.5))
    return out


def settle(source: Source, records: Sequence[Record]) -> None:
    if source.capabilities.checkpoint == "offset":
        last: dict[str, int] = {}
        for r in records:
            last[r.source] = max(last.get(r.source, -1), r.position + 1)
        source.commit(last)
    else:
        source.ack(records)


class SourceContract:
    """Subclasses provide these hooks for one broker."""

    # How long a source may take to join and see its first record (Kafka groups take seconds).
    join_timeout_s = 30.0
    # The broker counts deliveries, so a record delivered again says so in `Record.attempts`.
    delivery_counts = False

    def make_source(self, name: str) -> Source:
        raise NotImplementedError

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        raise NotImplementedError

    def make_destination(self, name: str) -> Destination:
        raise NotImplementedError

    def dead_letter_values(self, name: str) -> list[bytes]:
        """Values of every record in the destination's letters (read back from the broker)."""
        raise NotImplementedError

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        """The record values of a handler event of this broker's shape."""
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------------

    def fresh(self) -> str:
        return f"contract-{uuid.uuid4().hex[:10]}"

    def opened(self, name: str) -> tuple[Source, RecordingListener]:
        source = self.make_source(name)
        listener = RecordingListener()
        source.open(listener)
        return source, listener

    # --- the contract ----------------------------------------------------------------------------

    def test_poll_returns_records_with_payload_and_coordinates(self) -> None:
        name = self.fresh()
        values = [f"v{i}".encode() for i in range(20)]
        keys = [f"k{i % 3}".encode() for i in range(20)]
        self.produce(name, values, keys)
        source, listener = self.opened(name)
        try:
            records = poll_n(source, 20, self.join_timeout_s)
            assert sorted(r.value for r in records) == sorted(values)
            assert len({r.ident for r in records}) == 20
            assert listener.assigned and {r.source for r in records} <= source.assignment()
            for r in records:
                assert r.timestamp_ms > 1_600_000_000_000
                assert r.size > len(r.value)
            if source.capabilities.ordered:
                by_unit: dict[str, list[Record]] = {}
                for r in records:
                    by_unit.setdefault(r.source, []).append(r)
                for unit_records in by_unit.values():
                    positions = [r.position for r in unit_records]
                    assert positions == sorted(positions)
            settle(source, records)
        finally:
            source.close()

    def test_item_identifiers_round_trip_through_the_event(self) -> None:
        name = self.fresh()
        self.produce(name, [b"a", b"b", b"c"], [b"k", None, b"k"])
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 3, self.join_timeout_s)
            shape = source.shape
            event = shape.event(records)
            assert sorted(self.event_values(event)) == [b"a", b"b", b"c"]
            for r in records:
                assert shape.parse_item(shape.item_identifier(r)) == shape.item_key(r)
            assert len({shape.item_key(r) for r in records}) == 3
            settle(source, records)
        finally:
            source.close()

    def test_settled_records_are_not_delivered_again(self) -> None:
        name = self.fresh()
        self.produce(name, [f"{i}".encode() for i in range(10)], [None] * 10)
        source, _ = self.opened(name)
        try:
            settle(source, poll_n(source, 10, self.join_timeout_s))
        finally:
            source.close()
        self.produce(name, [b"after"], [None])
        source, _ = self.opened(name)
        try:
            again = poll_n(source, 2, self.join_timeout_s)
            assert [r.value for r in again] == [b"after"]
            settle(source, again)
        finally:
            source.close()

    def test_unsettled_records_are_delivered_again(self) -> None:
        name = self.fresh()
        self.produce(name, [f"{i}".encode() for i in range(10)], [None] * 10)
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 10, self.join_timeout_s)
            settle(source, [r for r in records if r.value in (b"0", b"1", b"2")])
        finally:
            source.close()
        source, _ = self.opened(name)
        try:
            again = poll_n(source, 7, self.join_timeout_s)
            assert sorted(r.value for r in again) == [f"{i}".encode() for i in range(3, 10)]
            if self.delivery_counts:
                assert all(r.attempts >= 1 for r in again)
            settle(source, again)
        finally:
            source.close()

    def test_caught_up_once_everything_is_read(self) -> None:
        name = self.fresh()
        self.produce(name, [b"x"] * 5, [None] * 5)
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 5, self.join_timeout_s)
            assert len(records) == 5
            deadline = time.monotonic() + 10
            while not source.caught_up() and time.monotonic() < deadline:
                source.poll(0, 0.2)
            assert source.caught_up()
            settle(source, records)
        finally:
            source.close()

    def test_poller_dead_letters_exactly_the_poison_records(self) -> None:
        name = self.fresh()
        n = 300
        values = [f"{i}".encode() for i in range(n)]
        keys = [f"k{i % 7}".encode() for i in range(n)]
        poison = {b"13", b"150", b"299"}
        self.produce(name, values, keys)
        handled: dict[bytes, int] = {}
        lock = threading.Lock()

        def handler(event: dict[str, Any], request: InvocationRequest) -> None:
            got = self.event_values(event)
            if poison & set(got):
                raise ValueError("poison")
            with lock:
                for v in got:
                    handled[v] = handled.get(v, 0) + 1

        source = self.make_source(name)
        poller = Poller(
            PollerSettings(
                mapping=name,
                function="f",
                limits=BatchLimits(batch_size=50, maximum_batching_window_s=0.05),
                parallelization_factor=2,
            ),
            source=source,
            invoker=DirectInvoker(handler),
            policy=Policy(
                maximum_retry_attempts=1,
                bisect_batch_on_function_error=True,
                retry_backoff_base_s=0.01,
            ),
            destination=self.make_destination(name),
        )
        poller.run(until_idle_s=2.0)
        assert sorted(self.dead_letter_values(name)) == sorted(poison)
        assert handled == {v: 1 for v in values if v not in poison}
        stats = poller.stats.snapshot()
        assert stats["dead_lettered"] == 3 and stats["succeeded"] == n - 3
