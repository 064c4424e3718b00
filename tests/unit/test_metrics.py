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

    def states(self) -> dict[str, str]:
        return {mapping: snap.get("state", "Enabled") for mapping, _, _, snap in self.snaps}


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


def test_mapping_state_and_throttling_series() -> None:
    text = exposition(
        [
            ("a", 0, True, {"state": "Disabled", "throttled": 2}),
            ("b", 0, True, {"throttle": {"state": "open", "pause_s": 4.0}, "throttled": 3}),
            ("b", 1, True, {"throttle": {"state": "closed"}, "throttled": 1}),
        ]
    )
    assert 'esm_mapping_state{mapping="a",state="Disabled"} 1.0' in text
    assert 'esm_mapping_state{mapping="a",state="Enabled"} 0.0' in text
    assert 'esm_mapping_state{mapping="b",state="Enabled"} 1.0' in text
    assert 'esm_throttled_total{mapping="a"} 2.0' in text
    assert 'esm_throttled_total{mapping="b"} 4.0' in text
    assert 'esm_mapping_throttled{mapping="a"} 0.0' in text
    assert 'esm_mapping_throttled{mapping="b"} 1.0' in text
