"""bench.proctree finds a real process tree by the marker its processes inherit: what the
scaling benchmark's memory, thread and CPU columns rest on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.proctree import TreeSampler


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sampler_finds_a_child_tree_by_its_environment_marker() -> None:
    marker = f"BENCH_OUT=/tmp/tree-test-{os.getpid()}-{time.monotonic_ns()}"
    name, _, value = marker.partition("=")
    # A parent that starts a child and both sleep: the tree the sampler must find.
    script = (
        "import subprocess, sys, time;"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
        "time.sleep(30)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, name: value}, start_new_session=True
    )
    try:
        with TreeSampler(marker, interval_s=0.05) as sampler:
            deadline = time.monotonic() + 20
            while len(sampler.tree.processes) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        roles = sampler.tree.roles()
        assert [p.pid for p in roles["supervisor"]] == [parent.pid]
        assert len(roles["pollers"]) == 1
        assert roles["pollers"][0].ppid == parent.pid
        assert roles["pollers"][0].hwm_kb > 0
        assert roles["pollers"][0].threads >= 1
    finally:
        os.killpg(parent.pid, 9)
        parent.wait(10)
