"""Profiles the hot path in-process: `build_poller(config, mapping)`, then
`poller.run(until_idle_s=1)` under pyinstrument, on a pre-filled source and a no-op handler.

The loop thread (poll, accept, dispatch, commit) is profiled by one profiler; every batch
thread (event building, serialisation, invocation, settling) by one of its own, merged. Time is
attributed to the nearest esm-workers function on the stack (a driver call counts for the
connector or engine function that made it) and grouped into stages; `--text` also writes
pyinstrument's own trees.

    python -m bench.profile --brokers redis --isolation thread
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, log
from bench.engine import Workdir, config_for
from bench.targets import TARGETS

INTERVAL_S = 0.0002
DEFAULT_RECORDS = {"kafka": 100_000, "redis": 100_000, "rabbitmq": 50_000}

# Stage of an esm-workers function, by (file, function); files alone as a fallback.
STAGES: dict[tuple[str, str], str] = {
    ("workers/engine/poller.py", "_accept"): "engine: accept",
    ("workers/engine/poller.py", "_runs"): "engine: accept",
    ("workers/engine/poller.py", "_lane"): "engine: accept",
    ("workers/engine/poller.py", "_slot"): "engine: accept",
    ("workers/engine/poller.py", "_dispatch_ready"): "engine: dispatch",
    ("workers/engine/poller.py", "_take"): "engine: dispatch",
    ("workers/engine/poller.py", "_room"): "engine: dispatch",
    ("workers/engine/poller.py", "_apply_backpressure"): "engine: dispatch",
    ("workers/engine/poller.py", "_quiet"): "engine: idle check",
    ("workers/engine/poller.py", "_settle"): "engine: settle",
    ("workers/engine/poller.py", "_run_lane"): "engine: lane",
    ("workers/engine/poller.py", "run"): "engine: loop",
    ("workers/engine/poller.py", "_poll_once"): "engine: loop",
    ("workers/engine/policy.py", "_invoke"): "invoke (policy)",
    ("workers/engine/policy.py", "interpret"): "invoke (policy)",
    ("workers/engine/policy.py", "_succeed"): "engine: settle",
    ("workers/engine/policy.py", "_drop_unsendable"): "engine: record age/size",
    ("workers/engine/stats.py", "add"): "engine: stats",
    ("workers/engine/stats.py", "observe_duration"): "engine: stats",
    ("workers/engine/stats.py", "set_position"): "engine: stats",
    ("workers/engine/checkpoint.py", "*"): "engine: settle",
    ("workers/engine/batcher.py", "*"): "engine: dispatch",
    ("workers/invoke/process_pool.py", "invoke"): "serialise to environment",
    ("workers/invoke/thread_pool.py", "invoke"): "serialise to environment",
    ("workers/invoke/process_pool.py", "_run"): "environment round trip",
    ("workers/invoke/process_pool.py", "receive"): "environment round trip",
    ("workers/invoke/thread_pool.py", "_invoke"): "environment round trip",
    ("workers/invoke/process_pool.py", "*"): "environment round trip",
    ("workers/invoke/thread_pool.py", "*"): "environment round trip",
    ("workers/invoke/scope.py", "*"): "environment round trip",
    ("workers/invoke/shared.py", "*"): "environment round trip",
    ("workers/invoke/child.py", "*"): "environment round trip",
    ("workers/invoke/loading.py", "*"): "environment round trip",
    ("connectors/kafka/shape.py", "event"): "event building",
    ("connectors/kafka/shape.py", "encoded_size"): "connector: records",
    ("connectors/kafka/shape.py", "kafka_item"): "connector: event items",
}
CONNECTOR_STAGES = {
    "poll": "connector: poll (driver)",
    "_poll": "connector: poll (driver)",
    "_read_new": "connector: poll (driver)",
    "_read_history": "connector: poll (driver)",
    "_records": "connector: records",
    "_records_from": "connector: records",
    "_take": "connector: records",
    "_with_counts": "connector: records",
    "_on_message": "connector: poll (driver)",
    "ack": "checkpoint (ack/commit)",
    "_flush_acks": "checkpoint (ack/commit)",
    "_xack": "checkpoint (ack/commit)",
    "commit": "checkpoint (ack/commit)",
    "_commit_pending": "checkpoint (ack/commit)",
    "caught_up": "connector: idle check",
    "_drained_on_server": "connector: idle check",
    "_refresh_ready": "connector: idle check",
    "lag": "connector: lag",
    "_touch": "connector: touch",
    "assignment": "connector: lag",
}
# Built-in calls that wait (for the network, a pipe, a lock or the GIL) rather than compute.
# librdkafka fetches on its own threads, so consume() only waits for its queue.
WAITING = frozenset(
    ("poll", "select", "acquire", "recv_into", "recv", "sleep", "read", "write", "consume")
)


def stage_of(path: str, function: str) -> str | None:
    """The stage an esm-workers function belongs to, or None for code that is not ours."""
    try:
        rel = str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return None
    if rel.startswith(("bench/", ".venv/")):
        return None
    if rel.startswith("connectors/") and rel not in ("connectors/kafka/shape.py",):
        return CONNECTOR_STAGES.get(function, "connector: other")
    if (rel, function) in STAGES:
        return STAGES[(rel, function)]
    if (rel, "*") in STAGES:
        return STAGES[(rel, "*")]
    if rel.startswith("workers/"):
        return f"engine: {Path(rel).stem}.{function}"
    return None


@dataclass
class Attribution:
    """Seconds per stage, split into computing and waiting (blocked in a call)."""

    busy: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    waiting: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    functions: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    total: float = 0.0

    def add_frame(self, frame: Any, stage: str | None, owner: str, waits: bool = False) -> None:
        path = frame.file_path or ""
        function = frame.function or ""
        own = stage_of(path, function)
        if own is not None:
            stage = own
            owner = f"{Path(path).parent.name}/{Path(path).name}:{function}"
        if frame.is_synthetic:
            blocked = waits  # "[self]" of a built-in holds that built-in's time
        else:
            blocked = path.startswith("<built-in") and function.rsplit(".", 1)[-1] in WAITING
        children = list(frame.children)
        self_time = frame.time - sum(c.time for c in children)
        if self_time > 0:
            key = stage or "outside esm-workers"
            (self.waiting if blocked else self.busy)[key] += self_time
            if not blocked:
                self.functions[owner or "outside esm-workers"] += self_time
        for child in children:
            self.add_frame(child, stage, owner, blocked)


def attribute(session: Any) -> Attribution:
    out = Attribution()
    root = session.root_frame(trim_stem=False) if session is not None else None
    if root is not None:
        out.total = root.time
        out.add_frame(root, None, "")
    return out


def profile_broker(
    broker: str, isolation: str, records: int, folder: Path, text: bool
) -> dict[str, Any]:
    from pyinstrument import Profiler
    from pyinstrument.session import Session

    from workers.app.config import load_config
    from workers.app.wiring import build_poller

    target = TARGETS[broker]()
    target.setup()
    workdir = Workdir()
    lane_sessions: list[Any] = []
    lock = threading.Lock()
    try:
        ds = target.dataset("profile", records, keys=1000)
        config_data = config_for(
            target.source(ds, f"esm-bench-profile-{time.time_ns()}"),
            handler="bench.handlers:noop",
            isolation=isolation,
            batch_size=500,
            maximum_batching_window_s=0.05,
        )
        here = workdir.next(f"profile-{broker}")
        path = here / "mapping.yaml"
        path.write_text(json.dumps(config_data))
        import os

        os.environ["BENCH_OUT"] = str(here / "handler.out")
        config = load_config(path)
        mapping = config.mapping("bench")
        poller, invoker = build_poller(config, mapping)
        run_lane = poller._run_lane

        def profiled_lane(lane: Any, batch: Any) -> None:
            profiler = Profiler(interval=INTERVAL_S, async_mode="disabled", use_timing_thread=True)
            profiler.start()
            try:
                run_lane(lane, batch)
            finally:
                session = profiler.stop()
                with lock:
                    lane_sessions.append(session)

        poller._run_lane = profiled_lane  # type: ignore[method-assign]
        loop_profiler = Profiler(interval=INTERVAL_S, async_mode="disabled", use_timing_thread=True)
        started = time.monotonic()
        loop_profiler.start()
        try:
            poller.run(until_idle_s=1.0)
        finally:
            loop_session = loop_profiler.stop()
            invoker.close()
        wall = time.monotonic() - started
        stats = poller.stats.snapshot()
        if stats["succeeded"] != records:
            log(f"profile {broker}: only {stats['succeeded']}/{records} records succeeded")
        lanes: Any = None
        for session in lane_sessions:
            lanes = session if lanes is None else Session.combine(lanes, session)
        stem = f"profile-{broker}-{isolation}"
        if text:
            (folder / f"{stem}-loop.txt").write_text(
                loop_profiler.output_text(unicode=False, color=False, show_all=False)
            )
            if lanes is not None:
                from pyinstrument.renderers import ConsoleRenderer

                renderer = ConsoleRenderer(unicode=False, color=False, show_all=False)
                (folder / f"{stem}-batches.txt").write_text(renderer.render(lanes))
        loop_attr, lane_attr = attribute(loop_session), attribute(lanes)
        return {
            "broker": broker,
            "isolation": isolation,
            "records": records,
            "succeeded": stats["succeeded"],
            "invocations": stats["invocations"],
            "wall_s": wall,
            "loop": _summary(loop_attr, records),
            "batches": _summary(lane_attr, records),
        }
    finally:
        target.close()
        workdir.cleanup()


def _summary(attr: Attribution, records: int) -> dict[str, Any]:
    def per_record(values: dict[str, float]) -> dict[str, float]:
        ordered = sorted(values.items(), key=lambda kv: -kv[1])
        return {k: round(v / records * 1e6, 3) for k, v in ordered}

    top = dict(list(per_record(attr.functions).items())[:15])
    return {
        "total_s": round(attr.total, 3),
        "busy_us_per_record": per_record(attr.busy),
        "waiting_us_per_record": per_record(attr.waiting),
        "top_functions_us_per_record": top,
    }


def render(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"## {r['broker']} ({r['isolation']} isolation): {r['records']:,} records,"
            f" {r['invocations']} invocations, {r['wall_s']:.2f} s wall in all\n"
        )
        for thread in ("loop", "batches"):
            s = r[thread]
            busy = s["busy_us_per_record"]
            lines.append(
                f"{thread} thread(s): {sum(busy.values()):.2f} us/record computing,"
                f" {sum(s['waiting_us_per_record'].values()):.2f} us/record blocked"
            )
            for stage, us in busy.items():
                if us >= 0.05:
                    lines.append(f"  {us:7.2f} us  {stage}")
            lines.append("  top functions (computing, incl. driver calls they make):")
            for fn, us in s["top_functions_us_per_record"].items():
                if us >= 0.05:
                    lines.append(f"  {us:7.2f} us  {fn}")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--brokers", default="kafka,redis,rabbitmq")
    parser.add_argument("--isolation", default="thread,process")
    parser.add_argument("--records", type=int)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--text", action="store_true", help="also write pyinstrument's trees")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for broker in [b for b in args.brokers.split(",") if b]:
        for isolation in [i for i in args.isolation.split(",") if i]:
            n = args.records or DEFAULT_RECORDS[broker]
            log(f"profiling {broker} ({isolation}) over {n:,} records")
            results.append(profile_broker(broker, isolation, n, args.output, args.text))
    (args.output / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
    report = render(results)
    (args.output / "profile.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
