"""Offset checkpoints: per unit, the committed position is the next record a restarted source
reads; nothing before it comes back, nothing from it on is lost."""

from __future__ import annotations

import time
from typing import ClassVar

from tests.contract.harness import ContractBase, by_unit, next_positions, poll_for, poll_n
from workers.engine.records import Record


class OffsetContract(ContractBase):
    needs: ClassVar = {"checkpoint": "offset"}

    def test_restart_resumes_at_the_committed_position(self) -> None:
        name = self.fresh()
        values = [f"v{i}".encode() for i in range(40)]
        self.produce(name, values, [f"k{i % 8}".encode() for i in range(40)])
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 40, self.join_timeout_s)
            assert len(records) == 40
            # Every unit committed partway: at the position of its middle record.
            committed = {unit: rs[len(rs) // 2].position for unit, rs in by_unit(records).items()}
            source.commit(committed)
        finally:
            source.close()
        expected = [r for r in records if r.position >= committed[r.source]]
        source, _ = self.opened(name)
        try:
            again = poll_n(source, len(expected), self.join_timeout_s)
            assert sorted(r.ident for r in again) == sorted(r.ident for r in expected)
            assert sorted(r.value for r in again) == sorted(r.value for r in expected)
            for unit, rs in by_unit(again).items():
                assert rs[0].position == committed[unit]
            assert poll_for(source, self.quiet_s) == []
            source.commit(next_positions(again))
        finally:
            source.close()

    def test_commits_between_polls_leave_nothing_to_redeliver(self) -> None:
        name = self.fresh()
        self.produce(
            name, [f"{i}".encode() for i in range(30)], [f"k{i % 4}".encode() for i in range(30)]
        )
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 30, self.join_timeout_s)
            assert len(records) == 30
            # In steps between polls, as the loop thread commits what settled: each commit moves
            # units forward, never back.
            steps: list[list[Record]] = [records[: i + 1] for i in range(0, 30, 7)] + [records]
            for step in steps:
                source.commit(next_positions(step))
                source.poll(0, 0.01)
            source.poll(0, 0.1)  # a source may send commits on its next poll
        finally:
            source.close()
        self.produce(name, [b"last"], [b"k0"])
        source, _ = self.opened(name)
        try:
            again = poll_n(source, 1, self.join_timeout_s)
            again += poll_for(source, self.quiet_s)
            assert [r.value for r in again] == [b"last"]
            deadline = time.monotonic() + 10
            while not source.caught_up() and time.monotonic() < deadline:
                source.poll(0, 0.2)
            assert source.caught_up()
            source.commit(next_positions(again))
        finally:
            source.close()
