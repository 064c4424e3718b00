"""`workers run`: one poller process per mapping instance, restarted with backoff if it dies.

The supervisor owns no broker connection. It starts poller processes, forwards SIGTERM/SIGINT so
they drain, gathers their counters for progress, metrics and `--summary-json`, and exits 0 once
they have all stopped cleanly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from workers.app.logs import configure_logging
from workers.engine.backoff import Backoff
from workers.engine.flight import DeathCounts, SuspectList, read_in_flight
from workers.invoke.lifeline import on_parent_death

log = logging.getLogger("workers.supervisor")

_ctx = multiprocessing.get_context("spawn")

# Counters summed across a mapping's instances for the summary and metrics.
COUNTERS = (
    "polled",
    "filtered_out",
    "invoked",
    "invocations",
    "succeeded",
    "retried",
    "bisected",
    "dead_lettered",
    "dropped",
    "released",
    "payload_omitted",
    "failed_invocations",
    "throttled",
)
_VERB = {True: "enabled", False: "disabled"}
# A poller that keeps dying before it ever reports is given up on in --until-idle runs.
MAX_EARLY_DEATHS = 5
# A poller process runs a loop thread that reads and converts records and batch threads that
# invoke and settle them, one batch per lane at a time. With CPython's default 5 ms switch
# interval, a batch thread woken by its handler's reply can wait that long for the busy loop
# thread to give up the GIL; 0.5 ms measured 1.0-1.7x records/s in-process (bench/README.md).
POLLER_SWITCH_INTERVAL_S = 0.0005
# The collector's generation thresholds in a poller process (CPython's defaults: 700, 10, 10).
POLLER_GC_THRESHOLDS = (50_000, 20, 100)
# A poller whose supervisor is gone drains like on SIGTERM, but gives up after this long: nobody
# is left to stop it harder.
ORPHAN_DRAIN_S = 10.0


def poller_main(
    config_path: str,
    mapping_name: str,
    instance: int,
    until_idle_s: float | None,
    status: Any,
    log_level: int,
    in_flight_path: str | None = None,
    suspects: SuspectList | None = None,
    enabled: bool = True,
    control: Any = None,
    overrides_path: str | None = None,
) -> None:
    """Entry point of a poller process; `control` brings `workers mappings enable|disable`."""
    configure_logging(log_level, f"{mapping_name}#{instance}")
    sys.setswitchinterval(POLLER_SWITCH_INTERVAL_S)
    from workers.app.loader import load
    from workers.app.wiring import build_poller

    config = load(config_path, overrides_path).config
    mapping = config.mapping(mapping_name)
    poller, invoker = build_poller(
        config,
        mapping,
        instance=instance,
        in_flight_path=Path(in_flight_path) if in_flight_path else None,
        suspects=suspects,
        enabled=enabled,
    )

    # Everything built so far lives as long as the process: out of the collector's sight, and
    # young collections less often, since a poll makes hundreds of short-lived records.
    gc.freeze()
    gc.set_threshold(*POLLER_GC_THRESHOLDS)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: draining", signum)
        # From another thread: the handler runs on the loop thread, which may be holding the
        # locks that stop() takes (the poller's, its valve's).
        threading.Thread(target=poller.stop, name="stop", daemon=True).start()

    def orphaned(parent_pid: int) -> None:
        # Nobody would stop, restart or count this poller any more: drain as on SIGTERM.
        log.warning("supervisor (pid %d) is gone: draining and exiting", parent_pid)
        poller.stop()
        timer = threading.Timer(ORPHAN_DRAIN_S, os._exit, args=(1,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    on_parent_death(orphaned)
    done = threading.Event()

    def report(final: bool = False) -> None:
        snap = poller.stats.snapshot()
        inv_stats = getattr(invoker, "stats", None)
        snap["environments"] = getattr(inv_stats, "environments", 0)
        snap["cold_starts"] = getattr(inv_stats, "cold_starts", 0)
        status.put((mapping_name, instance, os.getpid(), final, snap))

    def reporter() -> None:
        while not done.wait(1.0):
            report()

    def steer() -> None:
        # The supervisor's HTTP thread asked; the poller's loop thread acts on it.
        while True:
            try:
                wanted = control.get()
            except (EOFError, OSError):
                return
            poller.set_enabled(bool(wanted))

    threading.Thread(target=reporter, name="reporter", daemon=True).start()
    if control is not None:
        threading.Thread(target=steer, name="control", daemon=True).start()
    try:
        poller.run(until_idle_s)
    finally:
        done.set()
        invoker.close()
        report(final=True)


@dataclass
class _Child:
    mapping: str
    instance: int
    process: BaseProcess | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=1.0, cap_s=60.0))
    restart_at: float | None = None
    finished: bool = False
    reported: bool = False
    early_deaths: int = 0
    snapshot: dict[str, Any] = field(default_factory=dict)
    in_flight_path: Path | None = None
    control: Any = None  # a queue of enabled flags, new for every process started

    @property
    def name(self) -> str:
        return f"{self.mapping}#{self.instance}"


class Supervisor:
    def __init__(
        self,
        config_path: str | Path,
        instances: list[tuple[str, int]],
        *,
        until_idle_s: float | None = None,
        drain_timeout_s: float = 60.0,
        log_level: int = logging.INFO,
        enabled: dict[str, bool] | None = None,
        overrides_path: str | Path | None = None,
    ) -> None:
        self.config_path = str(Path(config_path).resolve())
        # A template's overrides file, which each poller reads with it.
        self.overrides_path = str(Path(overrides_path).resolve()) if overrides_path else None
        self.children = [_Child(m, i) for m, i in instances]
        # Whether each mapping should poll: from the file, then `workers mappings`.
        self.enabled = {c.mapping: (enabled or {}).get(c.mapping, True) for c in self.children}
        self.until_idle_s = until_idle_s
        self.drain_timeout_s = drain_timeout_s
        self.log_level = log_level
        self.status: Any = _ctx.Queue()
        self.stopping = threading.Event()
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        # Pollers' in-flight files, and deaths per record of each mapping (workers.engine.flight).
        self._run_dir = Path(tempfile.mkdtemp(prefix="esm-workers-run-"))
        for index, child in enumerate(self.children):
            child.in_flight_path = self._run_dir / f"poller-{index}.inflight"
        self.deaths: dict[str, DeathCounts] = {c.mapping: DeathCounts() for c in self.children}

    # --- lifecycle -------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.stopping.is_set():
                log.warning("second signal: stopping poller processes now")
                self._kill_all()
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self, on_tick: Any = None) -> int:
        """Run until every poller finished (or was stopped); the exit code for `workers run`.

        1 when a poller died (records it held were not settled by it) or failed to start.
        """
        try:
            return self._run(on_tick)
        finally:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def _run(self, on_tick: Any) -> int:
        failed = False
        forwarded_at: float | None = None
        for child in self.children:
            self._start(child)
        while True:
            self._drain_status(timeout=0.2)
            now = time.monotonic()
            for child in self.children:
                failed |= self._check(child, now)
            if self.stopping.is_set():
                if forwarded_at is None:
                    forwarded_at = now
                    log.info("stopping: poller processes drain their in-flight batches")
                    for child in self.children:
                        child.restart_at = None
                        self._signal(child, signal.SIGTERM)
                elif now - forwarded_at > self.drain_timeout_s:
                    log.error("poller processes did not stop within %.0fs", self.drain_timeout_s)
                    self._kill_all()
            if on_tick is not None:
                on_tick(self)
            if all(c.finished for c in self.children):
                break
        self._drain_status(timeout=0)
        return 1 if failed else 0

    def _start(self, child: _Child) -> None:
        with self._lock:
            # A fresh queue: flags sent to a dead process must not reach its successor.
            control = _ctx.Queue()
            control.cancel_join_thread()
            child.control = control
            enabled = self.enabled[child.mapping]
        process = _ctx.Process(
            target=poller_main,
            args=(
                self.config_path,
                child.mapping,
                child.instance,
                self.until_idle_s,
                self.status,
                self.log_level,
                str(child.in_flight_path) if child.in_flight_path else None,
                self.deaths[child.mapping].suspects(),
                enabled,
                control,
                self.overrides_path,
            ),
            name=f"poller-{child.name}",
        )
        process.start()
        child.process = process
        child.restart_at = None
        log.info("started poller %s (pid %s)", child.name, process.pid)

    def _check(self, child: _Child, now: float) -> bool:
        """Handle a poller that exited; True if the run must end in failure because of it."""
        if child.finished:
            return False
        process = child.process
        if process is None:
            if child.restart_at is not None and now >= child.restart_at:
                self._start(child)
            elif self.stopping.is_set():
                child.finished = True
            return False
        if process.is_alive():
            return False
        process.join()
        code = process.exitcode
        child.process = None
        if code == 0 and (self.until_idle_s is not None or self.stopping.is_set()):
            child.finished = True
            log.info("poller %s finished", child.name)
            return False
        if self.stopping.is_set():
            child.finished = True
            return code != 0 and code != -signal.SIGTERM
        died = code != 0
        if died:
            self._count_death(child)
        child.early_deaths = 0 if child.reported else child.early_deaths + 1
        if self.until_idle_s is not None and child.early_deaths >= MAX_EARLY_DEATHS:
            log.error("poller %s keeps failing at start-up; giving up", child.name)
            child.finished = True
            return True
        delay = child.backoff.next_delay()
        log.error("poller %s exited with %s; restarting in %.1fs", child.name, code, delay)
        child.restart_at = now + delay
        child.reported = False
        # It did not settle what it held: whoever settles it after the restart, the run failed.
        return died

    def _count_death(self, child: _Child) -> None:
        """A death for every record the poller had in flight (read from its file)."""
        if child.in_flight_path is None:
            return
        entries = read_in_flight(child.in_flight_path)
        if entries:
            self.deaths[child.mapping].add(entries)
            log.warning(
                "poller %s died with %d batch entr%s in flight: %s",
                child.name,
                len(entries),
                "y" if len(entries) == 1 else "ies",
                ", ".join(str(e[1:]) for e in entries[:5]),
            )

    def _drain_status(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = deadline - time.monotonic()
                item = self.status.get(timeout=left) if left > 0 else self.status.get_nowait()
            except queue.Empty:
                return
            mapping, instance, _pid, final, snap = item
            for child in self.children:
                if child.mapping == mapping and child.instance == instance:
                    with self._lock:
                        child.snapshot = snap
                    if not final:
                        # Reporting while running: it got past start-up, whatever comes next.
                        child.reported = True
                        child.backoff.reset()

    def _signal(self, child: _Child, signum: int) -> None:
        if child.process is not None and child.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signum)

    def _kill_all(self) -> None:
        for child in self.children:
            self._signal(child, signal.SIGKILL)

    # --- live control ----------------------------------------------------------------------------

    def set_enabled(self, mapping: str, enabled: bool) -> str:
        """Enable or disable a mapping on every poller running it; its state right after.

        Raises KeyError for a mapping this run does not have."""
        with self._lock:
            if mapping not in self.enabled:
                raise KeyError(mapping)
            self.enabled[mapping] = enabled
            for child in self.children:
                if child.mapping == mapping and child.control is not None:
                    child.control.put(enabled)
        log.info("mapping %s: %s through the control endpoint", mapping, _VERB[enabled])
        return self.states()[mapping]

    def states(self) -> dict[str, str]:
        """Per mapping, Lambda's state names: Enabled or Disabled once every poller of it
        reports being so, Enabling or Disabling until then."""
        out: dict[str, str] = {}
        with self._lock:
            for mapping, enabled in self.enabled.items():
                want = "Enabled" if enabled else "Disabled"
                seen = [c.snapshot.get("state") for c in self.children if c.mapping == mapping]
                settled = all(state == want for state in seen)
                out[mapping] = want if settled else ("Enabling" if enabled else "Disabling")
        return out

    # --- reporting -------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Per mapping: counters summed over instances and the last checkpoint per unit."""
        out: dict[str, Any] = {}
        with self._lock:
            for child in self.children:
                entry = out.setdefault(
                    child.mapping, {**dict.fromkeys(COUNTERS, 0), "checkpoints": {}}
                )
                snap = child.snapshot
                for name in COUNTERS:
                    entry[name] += snap.get(name, 0)
                entry["checkpoints"].update(snap.get("checkpoints", {}))
        return out

    def snapshots(self) -> list[tuple[str, int, bool, dict[str, Any]]]:
        with self._lock:
            return [
                (c.mapping, c.instance, c.process is not None and c.process.is_alive(), c.snapshot)
                for c in self.children
            ]

    def write_summary(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2))
