"""The Prometheus exposition built from poller snapshots."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from workers.app.metrics import SupervisorCollector


class Snapshots:
    """Stands in for the supervisor: what its poller processes last reported."""

    def __init__(self, snaps: list[tuple[str, int, bool, dict[str, Any]]]) -> None:
        self.snaps = snaps

    def snapshots(self) -> list[tuple[str, int, bool, dict[str, Any]]]:
        return self.snaps


def exposition(snaps: list[tuple[str, int, bool, dict[str, Any]]]) -> str:
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(Snapshots(snaps)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_two_consumers_of_one_queue_give_one_lag_series() -> None:
    # Two RabbitMQ pollers of one mapping both report the depth of the queue they share.
    text = exposition(
        [
            ("orders", 0, True, {"lag": {"orders-q": 40}, "polled": 3}),
            ("orders", 1, True, {"lag": {"orders-q": 42}, "polled": 5}),
        ]
    )
    lag = [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        if family.name == "esm_offset_lag"
        for s in family.samples
    ]
    assert lag == [({"mapping": "orders", "partition": "orders-q"}, 42.0)]
    assert 'esm_polled_events_total{mapping="orders"} 8.0' in text


def test_partitions_of_different_pollers_each_have_their_series() -> None:
    text = exposition(
        [
            ("k", 0, True, {"lag": {"t-0": 1}}),
            ("k", 1, True, {"lag": {"t-1": 2}}),
        ]
    )
    assert 'esm_offset_lag{mapping="k",partition="t-0"} 1.0' in text
    assert 'esm_offset_lag{mapping="k",partition="t-1"} 2.0' in text
