"""Watches the process tree of one `workers run` from /proc while it runs: peak resident memory
(VmHWM), the most threads, the tree's proportional set size (PSS) and the CPU time each process
used, by role: the supervisor, each poller, the execution environments, and multiprocessing's
helper processes.

The tree is found by the environment variable every process of a benchmark run inherits
(`BENCH_OUT`, a path unique to the run), so no pid needs to come back from the subprocess call.
Linux only; elsewhere nothing is sampled.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(slots=True)
class Seen:
    """What was observed of one process over the run."""

    pid: int
    ppid: int
    cmdline: str
    hwm_kb: int = 0  # VmHWM: its peak resident set
    rss_kb: int = 0  # VmRSS at the last sample
    threads: int = 0  # the most threads seen at once
    pss_kb: int = 0  # Pss at the last sample (shared pages divided among their sharers)
    cpu_ticks: int = 0  # user + system time at the last sample, in clock ticks


@dataclass(slots=True)
class Tree:
    """The run's processes by role, and the tree's peak proportional set size."""

    processes: dict[int, Seen] = field(default_factory=dict)
    peak_pss_kb: int = 0
    samples: int = 0
    # Per sample: its wall-clock time, each live process's CPU ticks, and other counters in
    # ticks: the machine's busy time (all CPUs, whatever runs on them), a watched process's.
    timeline: list[tuple[float, dict[int, int], dict[str, int]]] = field(default_factory=list)

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each role used from the last sample at or before `start` (wall clock)
        to the first at or after `end`, the whole machine's (`machine_s`) and each watched
        process's (`<name>_s`), and that window's length. A process that started inside the
        window counts from its start, one that ended inside it up to its last sample."""
        if not self.timeline:
            return {}
        times = [t for t, _, _ in self.timeline]
        a = max(0, bisect.bisect_right(times, start) - 1)
        b = min(len(times) - 1, bisect.bisect_left(times, end))
        out: dict[str, float] = {"window_s": times[b] - times[a]}
        first, last = self.timeline[a][2], self.timeline[b][2]
        for name in first.keys() & last.keys():
            out[f"{name}_s"] = (last[name] - first[name]) * _TICK_S
        for role, members in self.roles().items():
            ticks = 0
            for p in members:
                before = self.timeline[a][1].get(p.pid, 0)
                after = next(
                    (
                        self.timeline[i][1][p.pid]
                        for i in range(b, a - 1, -1)
                        if p.pid in self.timeline[i][1]
                    ),
                    before,
                )
                ticks += after - before
            out[f"{role}_cpu_s"] = ticks * _TICK_S
        return out

    def _children(self, pid: int) -> list[Seen]:
        return [p for p in self.processes.values() if p.ppid == pid]

    def _root(self) -> Seen | None:
        roots = [p for p in self.processes.values() if p.ppid not in self.processes]
        return min(roots, key=lambda p: p.pid) if roots else None

    def _descendants(self, pid: int) -> list[Seen]:
        out: list[Seen] = []
        stack = [pid]
        while stack:
            for child in self._children(stack.pop()):
                out.append(child)
                stack.append(child.pid)
        return out

    def roles(self) -> dict[str, list[Seen]]:
        """supervisor, pollers, environments and helpers (forkserver, resource trackers)."""
        root = self._root()
        if root is None:
            return {"supervisor": [], "pollers": [], "environments": [], "helpers": []}
        helpers: list[Seen] = []
        pollers: list[Seen] = []
        for child in self._children(root.pid):
            (helpers if _helper(child) else pollers).append(child)
        environments: list[Seen] = []
        for poller in pollers:
            for p in self._descendants(poller.pid):
                # Environments fork from the forkserver and keep its command line; the server
                # itself is the poller's direct child.
                server = p.ppid == poller.pid and "forkserver" in p.cmdline
                (helpers if server or "resource_tracker" in p.cmdline else environments).append(p)
        return {
            "supervisor": [root],
            "pollers": pollers,
            "environments": environments,
            "helpers": helpers,
        }

    def summary(self) -> dict[str, Any]:
        """Megabytes and thread counts, for a results file."""
        roles = self.roles()
        pollers = roles["pollers"]
        envs = roles["environments"]

        def mb(kb: int) -> float:
            return round(kb / 1024, 1)

        return {
            "samples": self.samples,
            "pollers": len(pollers),
            "poller_hwm_mb": mb(max((p.hwm_kb for p in pollers), default=0)),
            "poller_threads": max((p.threads for p in pollers), default=0),
            "environments": len(envs),
            "environment_hwm_mb": mb(max((p.hwm_kb for p in envs), default=0)),
            "environments_hwm_sum_mb": mb(sum(p.hwm_kb for p in envs)),
            "supervisor_hwm_mb": mb(sum(p.hwm_kb for p in roles["supervisor"])),
            "helpers_hwm_mb": mb(sum(p.hwm_kb for p in roles["helpers"])),
            "tree_peak_pss_mb": mb(self.peak_pss_kb),
        }


def _helper(p: Seen) -> bool:
    return "resource_tracker" in p.cmdline or "forkserver" in p.cmdline


class TreeSampler:
    """Samples, on a thread, every process whose environment holds `marker` (NAME=value), and
    the CPU time of the processes in `watch` (name: pid), such as the broker."""

    def __init__(
        self, marker: str, interval_s: float = 0.1, watch: dict[str, int] | None = None
    ) -> None:
        self._marker = marker.encode()
        self._watch = dict(watch or {})
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._foreign: set[int] = set()  # pids checked once and not ours
        self.tree = Tree()
        self._me = os.getpid()

    def __enter__(self) -> TreeSampler:
        if PROC.joinpath("self", "status").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval_s):
                return

    def sample(self) -> None:
        pss = 0
        now = time.time()
        ticks: dict[int, int] = {}
        for entry in os.scandir(PROC):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in self._foreign:
                continue
            seen = self.tree.processes.get(pid)
            if seen is None:
                seen = self._adopt(pid)
                if seen is None:
                    continue
            if _update(seen):
                pss += seen.pss_kb
                ticks[pid] = seen.cpu_ticks
        self.tree.peak_pss_kb = max(self.tree.peak_pss_kb, pss)
        counters = {"machine": _machine_busy()}
        for name, watched in self._watch.items():
            cpu = process_ticks(watched)
            if cpu is not None:
                counters[name] = cpu
        self.tree.timeline.append((now, ticks, counters))
        self.tree.samples += 1

    def _adopt(self, pid: int) -> Seen | None:
        try:
            environ = (PROC / str(pid) / "environ").read_bytes()
            if self._marker not in environ.split(b"\0"):
                # Look again at a child of this process that may not have exec'd `workers run`
                # yet, and at a process whose environment reads empty: in the middle of an exec
                # (kernel threads, children of kthreadd, are empty for good).
                ppid = _ppid(pid)
                if ppid != self._me and (environ or ppid in (0, 2)):
                    self._foreign.add(pid)
                return None
            stat = (PROC / str(pid) / "stat").read_text()
            cmdline = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # gone, or not ours to read
            self._foreign.add(pid)
            return None
        seen = Seen(pid, _parse_ppid(stat), cmdline.decode(errors="replace"))
        self.tree.processes[pid] = seen
        return seen


def _parse_ppid(stat: str) -> int:
    # The command name in field 2 may hold spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _ppid(pid: int) -> int:
    try:
        return _parse_ppid((PROC / str(pid) / "stat").read_text())
    except OSError:
        return -1


def process_ticks(pid: int) -> int | None:
    """A process's user + system time in clock ticks; None once it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # Fields 14 and 15 (utime, stime), counted from the one after the command name.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def find_process(*needles: str) -> int | None:
    """The first process whose command line holds every one of `needles`."""
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (PROC / entry.name / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if all(needle in cmdline for needle in needles):
            return int(entry.name)
    return None


def _machine_busy() -> int:
    """Ticks all CPUs spent on anything but idle and I/O wait, from /proc/stat."""
    try:
        with (PROC / "stat").open() as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _update(seen: Seen) -> bool:
    """Read the process's status and PSS; False when it has exited."""
    base = PROC / str(seen.pid)
    try:
        status = (base / "status").read_text()
        rollup = (base / "smaps_rollup").read_text()
    except OSError:
        return False
    cpu = process_ticks(seen.pid)
    if cpu is None:
        return False
    seen.cpu_ticks = cpu
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == "VmHWM":
            seen.hwm_kb = max(seen.hwm_kb, int(value.split()[0]))
        elif name == "VmRSS":
            seen.rss_kb = int(value.split()[0])
        elif name == "Threads":
            seen.threads = max(seen.threads, int(value))
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            seen.pss_kb = int(line.split()[1])
            break
    return True
