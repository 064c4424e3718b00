"""bench.scaling's sized values and bench.proctree's view of a process tree: what the scaling
benchmark's memory and thread columns rest on."""

from __future__ import annotations

import os

import orjson
import pytest

from bench.proctree import Seen, Tree
from bench.scaling import sized_value


@pytest.mark.parametrize("size", [100, 10_000, 1_000_000])
def test_sized_value_is_json_of_exactly_that_many_bytes(size: int) -> None:
    value = sized_value(7, size)
    assert len(value) == size
    assert orjson.loads(value)["id"] == 7


def test_roles_follow_the_workers_run_tree() -> None:
    tree = Tree()
    spawn = "python -c from multiprocessing.spawn import spawn_main"
    server = "python -c from multiprocessing.forkserver import main"
    tracker = "python -c from multiprocessing.resource_tracker import main"
    for seen in (
        Seen(10, 1, "workers run mapping.yaml", hwm_kb=40 * 1024),
        Seen(11, 10, tracker, hwm_kb=10 * 1024),
        Seen(12, 10, spawn, hwm_kb=60 * 1024, threads=9),
        Seen(13, 10, spawn, hwm_kb=70 * 1024, threads=12),
        Seen(14, 12, server, hwm_kb=30 * 1024),
        Seen(15, 14, server, hwm_kb=34 * 1024),  # environments keep the server's command line
        Seen(16, 14, server, hwm_kb=36 * 1024),
    ):
        tree.processes[seen.pid] = seen
    roles = tree.roles()
    assert [p.pid for p in roles["supervisor"]] == [10]
    assert sorted(p.pid for p in roles["pollers"]) == [12, 13]
    assert sorted(p.pid for p in roles["environments"]) == [15, 16]
    assert sorted(p.pid for p in roles["helpers"]) == [11, 14]
    summary = tree.summary()
    assert summary["poller_hwm_mb"] == 70.0
    assert summary["poller_threads"] == 12
    assert summary["environments"] == 2
    assert summary["environments_hwm_sum_mb"] == 70.0


def test_cpu_between_counts_each_role_over_the_samples_around_the_span() -> None:
    tree = Tree()
    spawn = "python -c from multiprocessing.spawn import spawn_main"
    server = "python -c from multiprocessing.forkserver import main"
    for seen in (
        Seen(10, 1, "workers run"),
        Seen(12, 10, spawn),
        Seen(14, 12, server),
        Seen(15, 14, server),
    ):
        tree.processes[seen.pid] = seen
    tree.timeline = [
        (100.0, {10: 0, 12: 0}, {"machine": 0, "broker": 5}),
        (101.0, {10: 1, 12: 50, 14: 1, 15: 10}, {"machine": 150}),  # the environment starts
        (102.0, {10: 1, 12: 120, 14: 1, 15: 40}, {"machine": 300}),
        # The environment has ended: its last sample counts.
        (103.0, {10: 1, 12: 130, 14: 1}, {"machine": 350, "broker": 65}),
        (104.0, {10: 9, 12: 900}, {"machine": 900, "broker": 99}),  # after the span: left out
    ]
    tick = 1 / os.sysconf("SC_CLK_TCK")
    cpu = tree.cpu_between(100.5, 102.5)
    assert cpu["window_s"] == 3.0
    assert cpu["pollers_cpu_s"] == pytest.approx(130 * tick)
    assert cpu["environments_cpu_s"] == pytest.approx(40 * tick)
    assert cpu["supervisor_cpu_s"] == pytest.approx(1 * tick)
    assert cpu["helpers_cpu_s"] == pytest.approx(1 * tick)
    assert cpu["machine_s"] == pytest.approx(350 * tick)
    assert cpu["broker_s"] == pytest.approx(60 * tick)
