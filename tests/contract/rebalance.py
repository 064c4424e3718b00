"""Rebalances, for sources whose group moves units between members: the listener hears of every
assignment and revoke, a revoked unit's settles inside `on_revoked` still count, and a member
that stays takes over the units of one that leaves, losing nothing."""

from __future__ import annotations

import time
from collections.abc import Collection

from tests.contract.harness import ContractBase, RecordingListener, poll_for, poll_n, settle
from workers.engine.ports import Source
from workers.engine.records import Record


class SettlingListener(RecordingListener):
    """Stands in for the engine: settles what it holds of a unit when the unit is revoked."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self.held: list[Record] = []

    def on_revoked(self, units: Collection[str]) -> None:
        super().on_revoked(units)
        settle(self.source, [r for r in self.held if r.source in units])
        self.held = [r for r in self.held if r.source not in units]


class RebalanceContract(ContractBase):
    def make_member(self, name: str, instance: int) -> Source:
        """Another consumer of the same group as `make_source(name)` (instance 0)."""
        raise NotImplementedError

    def test_close_revokes_the_assignment_and_settles_inside_the_revoke(self) -> None:
        name = self.fresh()
        self.produce(
            name, [f"{i}".encode() for i in range(12)], [f"k{i % 6}".encode() for i in range(12)]
        )
        source = self.make_source(name)
        self.check_capabilities(source)
        listener = SettlingListener(source)
        source.open(listener)
        try:
            listener.held = poll_n(source, 12, self.join_timeout_s)
            assert len(listener.held) == 12
            assigned = set(source.assignment())
            assert listener.assigned == assigned
        finally:
            source.close()
        assert listener.revoked == assigned and not listener.held
        self.produce(name, [b"last"], [b"k0"])
        source, _ = self.opened(name)
        try:
            again = poll_n(source, 1, self.join_timeout_s)
            again += poll_for(source, self.quiet_s)
            assert [r.value for r in again] == [b"last"]
            settle(source, again)
        finally:
            source.close()

    def test_a_member_takes_over_the_units_of_one_that_leaves(self) -> None:
        name = self.fresh()
        values = [f"a{i}".encode() for i in range(30)]
        keys = [f"k{i % 10}".encode() for i in range(30)]
        self.produce(name, values, keys)
        a, b = self.make_source(name), self.make_member(name, 1)
        a_listener, b_listener = SettlingListener(a), SettlingListener(b)
        a.open(a_listener)
        got: list[Record] = []
        try:
            b.open(b_listener)
            try:
                # Both join; each settles what it reads at once.
                deadline = time.monotonic() + 3 * self.join_timeout_s
                while time.monotonic() < deadline and not (
                    a.assignment() and b.assignment() and len(got) >= len(values)
                ):
                    for member in (a, b):
                        records = member.poll(100, 0.1)
                        settle(member, records)
                        got += records
                assert a.assignment() and b.assignment()
                assert not a.assignment() & b.assignment()
                units = a.assignment() | b.assignment()
                b_units = set(b.assignment())
            finally:
                b.close()
            assert b_units <= b_listener.revoked
            more = [f"b{i}".encode() for i in range(30)]
            self.produce(name, more, keys)
            deadline = time.monotonic() + 3 * self.join_timeout_s
            while time.monotonic() < deadline and not (
                a.assignment() == units and {r.value for r in got} >= set(values + more)
            ):
                records = a.poll(100, 0.2)
                settle(a, records)
                got += records
            assert a.assignment() == units
            assert b_units <= a_listener.assigned
            # Nothing lost; what was settled before the move is not delivered again.
            assert {r.value for r in got} == set(values + more)
            assert len(got) == len(values + more)
        finally:
            a.close()
