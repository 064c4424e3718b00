"""What every source does: poll records that carry what its event shape needs, settle them,
report being caught up, and resume after a close as its checkpoints say; and the poller on top."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.contract.harness import ContractBase, by_unit, poll_for, poll_n, settle
from tests.engine import DirectInvoker
from workers.engine.batcher import BatchLimits
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings


class SourceContract(ContractBase):
    def test_declared_capabilities_have_their_contracts(self) -> None:
        source = self.make_source(self.fresh())
        try:
            declared = source.capabilities
            required = self.required_capabilities()
            assert required.get("checkpoint") == declared.checkpoint, (
                f"{type(self).__name__} lacks the contract of {declared.checkpoint} checkpoints"
            )
            assert required.get("pausable", False) == declared.pausable
        finally:
            source.close()

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
                for unit_records in by_unit(records).values():
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
            again = poll_n(source, 1, self.join_timeout_s)
            again += poll_for(source, self.quiet_s)
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

    # --- the engine on top -----------------------------------------------------------------------

    def run_poller(self, name: str, handler: Any, **policy: Any) -> Poller:
        """Runs a poller of `name` with `handler` until the source is idle; returns it."""
        source = self.make_source(name)
        self.check_capabilities(source)
        poller = Poller(
            PollerSettings(
                mapping=name,
                function="f",
                limits=BatchLimits(batch_size=50, maximum_batching_window_s=0.05),
                parallelization_factor=2,
            ),
            source=source,
            invoker=DirectInvoker(handler),
            policy=Policy(**policy),
            destination=self.make_destination(name),
        )
        poller.run(until_idle_s=self.idle_s)
        return poller

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

        poller = self.run_poller(
            name,
            handler,
            maximum_retry_attempts=1,
            bisect_batch_on_function_error=True,
            retry_backoff_base_s=0.01,
        )
        assert sorted(self.dead_letter_values(name)) == sorted(poison)
        assert handled == {v: 1 for v in values if v not in poison}
        stats = poller.stats.snapshot()
        assert stats["dead_lettered"] == 3 and stats["succeeded"] == n - 3

    def test_restarted_poller_handles_every_record_once(self) -> None:
        """Nothing lost and, when nothing failed, nothing handled twice across a restart."""
        name = self.fresh()
        handled: list[bytes] = []
        lock = threading.Lock()

        def handler(event: dict[str, Any], request: InvocationRequest) -> None:
            with lock:
                handled.extend(self.event_values(event))

        first = [f"a{i}".encode() for i in range(120)]
        self.produce(name, first, [f"k{i % 5}".encode() for i in range(120)])
        self.run_poller(name, handler)
        assert sorted(handled) == sorted(first)
        second = [f"b{i}".encode() for i in range(80)]
        self.produce(name, second, [f"k{i % 5}".encode() for i in range(80)])
        poller = self.run_poller(name, handler)
        assert sorted(handled) == sorted(first + second)
        assert poller.stats.snapshot()["succeeded"] == 80
        assert self.dead_letter_values(name) == []
