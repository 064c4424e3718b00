"""Pause and resume: a paused unit delivers nothing while the others keep flowing; resumed, it
goes on where it stopped, in order."""

from __future__ import annotations

from typing import ClassVar

from tests.contract.harness import ContractBase, poll_for, poll_n, settle
from workers.engine.records import Record


class PauseContract(ContractBase):
    needs: ClassVar = {"pausable": True}

    def test_paused_unit_holds_while_the_others_flow_then_resumes_in_order(self) -> None:
        name = self.fresh()
        keys = [f"k{i % 10}".encode() for i in range(40)]
        self.produce(name, [f"a{i}".encode() for i in range(40)], keys)
        source, _ = self.opened(name)
        try:
            first = poll_n(source, 40, self.join_timeout_s)
            assert len(first) == 40
            unit_of = {r.key: r.source for r in first}
            assert len(set(unit_of.values())) >= 2, "the contract needs records in two units"
            paused = first[0].source
            source.pause([paused])
            second = [f"b{i}".encode() for i in range(40)]
            self.produce(name, second, keys)
            held = [v for v, k in zip(second, keys, strict=True) if unit_of[k] == paused]
            flowing = poll_n(source, len(second) - len(held), self.join_timeout_s)
            flowing += poll_for(source, self.quiet_s)
            assert paused not in {r.source for r in flowing}
            assert sorted(r.value for r in flowing) == sorted(set(second) - set(held))
            assert not source.caught_up()
            source.resume([paused])
            resumed: list[Record] = poll_n(source, len(held), self.join_timeout_s)
            assert [r.value for r in resumed] == held
            assert [r.source for r in resumed] == [paused] * len(held)
            positions = [r.position for r in resumed]
            assert positions == sorted(positions)
            assert positions[0] > max(r.position for r in first if r.source == paused)
            settle(source, first + flowing + resumed)
        finally:
            source.close()
