"""Ack checkpoints: each acked record is settled on its own, in the order it settled; the unacked
ones, and only they, are delivered again once the consumer comes back."""

from __future__ import annotations

import random
from typing import ClassVar

from tests.contract.harness import ContractBase, by_unit, poll_for, poll_n


class AckContract(ContractBase):
    needs: ClassVar = {"checkpoint": "ack"}

    def test_unacked_records_and_only_they_come_back_after_reopen(self) -> None:
        name = self.fresh()
        values = [f"{i}".encode() for i in range(20)]
        self.produce(name, values, [f"k{i % 4}".encode() for i in range(20)])
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 20, self.join_timeout_s)
            assert len(records) == 20
            # Scattered, not a prefix: what an offset could not express.
            source.ack([r for i, r in enumerate(records) if i % 3 != 1])
            unacked = sorted(r.value for i, r in enumerate(records) if i % 3 == 1)
        finally:
            source.close()
        self.produce(name, [b"new"], [b"k0"])
        source, _ = self.opened(name)
        try:
            again = poll_n(source, len(unacked) + 1, self.join_timeout_s)
            assert sorted(r.value for r in again) == sorted([*unacked, b"new"])
            old = [r for r in again if r.value != b"new"]
            assert all(r.redelivered for r in old)
            if self.delivery_counts:
                assert all(r.attempts >= 1 for r in old)
            (new,) = [r for r in again if r.value == b"new"]
            assert new.attempts == 0 and not new.redelivered
            if source.capabilities.ordered:
                for rs in by_unit(again).values():
                    assert [r.position for r in rs] == sorted(r.position for r in rs)
            assert poll_for(source, self.quiet_s) == []
            source.ack(again)
        finally:
            source.close()

    def test_acks_in_settle_order_between_polls_settle_every_record(self) -> None:
        name = self.fresh()
        n = 60
        self.produce(
            name, [f"{i}".encode() for i in range(n)], [f"k{i % 5}".encode() for i in range(n)]
        )
        source, _ = self.opened(name)
        try:
            records = poll_n(source, n, self.join_timeout_s)
            assert len(records) == n
            # Batches of parallel lanes settle in any order; the loop thread acks them between
            # polls, as the engine's does.
            random.Random(7).shuffle(records)
            for i in range(0, n, 4):
                source.ack(records[i : i + 4])
                source.poll(0, 0.01)
            source.poll(0, 0.1)  # a source may send acks on its next poll
        finally:
            source.close()
        self.produce(name, [b"last"], [b"k0"])
        source, _ = self.opened(name)
        try:
            again = poll_n(source, 1, self.join_timeout_s)
            again += poll_for(source, self.quiet_s)
            assert [r.value for r in again] == [b"last"]
            source.ack(again)
        finally:
            source.close()
