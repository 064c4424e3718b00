"""Execution environments under the engine, and the `workers` command (no broker needed).

A process-isolated handler that hangs, exits, is killed or runs out of memory fails only its own
invocation; `workers run` drains on SIGTERM; the CLI's commands and help are complete.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.memory.broker import MemoryBroker, MemoryDestination, MemoryLogSource
from workers.app.cli import build_parser
from workers.engine.batcher import BatchLimits
from workers.engine.invoker import FunctionSpec
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.invoke import create_invoker

ROOT = Path(__file__).resolve().parents[2]


def run_poller(
    tmp_path: Path, values_by_partition: list[list[bytes]], **spec: Any
) -> tuple[Poller, MemoryDestination, list[bytes], Any]:
    handled = tmp_path / "handled.txt"
    broker = MemoryBroker()
    broker.create_topic("t", len(values_by_partition))
    for p, values in enumerate(values_by_partition):
        for v in values:
            broker.produce("t", v, partition=p)
    invoker = create_invoker(
        FunctionSpec(
            name="f",
            handler="tests.handlers.runtime_handlers:misbehave",
            environment={"HANDLED_FILE": str(handled)},
            **{"timeout_s": 2.0, "concurrency": 2, "memory_mb": 128, **spec},
        )
    )
    dlq = MemoryDestination()
    poller = Poller(
        PollerSettings(mapping="m", function="f", limits=BatchLimits(batch_size=10)),
        source=MemoryLogSource(broker, "t", "g"),
        invoker=invoker,
        policy=Policy(
            maximum_retry_attempts=1,
            bisect_batch_on_function_error=True,
            retry_backoff_base_s=0.01,
        ),
        destination=dlq,
    )
    try:
        poller.run(until_idle_s=0.5)
    finally:
        invoker.close()
    lines = handled.read_bytes().splitlines() if handled.exists() else []
    return poller, dlq, lines, invoker


def errors_by_value(dlq: MemoryDestination) -> dict[bytes, dict[str, Any]]:
    import base64

    out = {}
    for letter in dlq.letters:
        for part in letter["payload"]["records"].values():
            for r in part:
                out[base64.b64decode(r["value"])] = letter["error"]
    return out


def test_hung_handler_is_killed_and_dead_lettered_while_other_batches_flow(
    tmp_path: Path,
) -> None:
    fine = [f"p1-{i}".encode() for i in range(30)]
    _poller, dlq, handled, _ = run_poller(tmp_path, [[b"a", b"sleep", b"b"], fine], timeout_s=1.0)
    errors = errors_by_value(dlq)
    assert list(errors) == [b"sleep"]
    assert errors[b"sleep"]["errorType"] == "Sandbox.Timedout"
    assert errors[b"sleep"]["errorMessage"] == "Task timed out after 1.00 seconds"
    assert sorted(handled) == sorted([b"a", b"b", *fine])


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"exit", "exit status 3"), (b"kill", "signal: killed")],
)
def test_dying_environment_fails_only_its_invocation(
    tmp_path: Path, value: bytes, expected: str
) -> None:
    others = [f"x{i}".encode() for i in range(20)]
    _, dlq, handled, invoker = run_poller(tmp_path, [[b"a", value, b"b"], others])
    errors = errors_by_value(dlq)
    assert list(errors) == [value]
    assert errors[value]["errorType"] == "Runtime.ExitError"
    assert expected in errors[value]["errorMessage"]
    assert sorted(handled) == sorted([b"a", b"b", *others])
    assert invoker.stats.crashes >= 2  # the first try and the retry


def test_handler_over_memory_limit_fails_with_a_clear_error(tmp_path: Path) -> None:
    _, dlq, handled, _ = run_poller(tmp_path, [[b"a", b"alloc", b"b"]], memory_mb=128)
    errors = errors_by_value(dlq)
    assert list(errors) == [b"alloc"]
    assert "memory" in errors[b"alloc"]["errorMessage"].lower()
    assert sorted(handled) == [b"a", b"b"]


def test_cold_start_once_per_environment_not_per_invocation(tmp_path: Path) -> None:
    values = [[f"{p}-{i}".encode() for i in range(200)] for p in range(2)]
    poller, dlq, handled, invoker = run_poller(tmp_path, values, concurrency=2)
    assert len(handled) == 400 and dlq.letters == []
    assert poller.stats.snapshot()["invocations"] >= 40
    assert 1 <= invoker.stats.cold_starts <= 2


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mappings.yaml"
    path.write_text(body)
    return path


def workers(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_sigterm_during_a_long_batch_exits_0_after_it_settles(tmp_path: Path) -> None:
    started, handled, summary = tmp_path / "started", tmp_path / "handled", tmp_path / "s.json"
    config = write_config(
        tmp_path,
        f"""
functions:
  slow:
    handler: tests.handlers.runtime_handlers:slow_batch
    timeout_s: 30
    environment: {{STARTED_FILE: "{started}", HANDLED_FILE: "{handled}", SLOW_S: "3"}}
event_source_mappings:
  - name: slow
    function: slow
    source: {{type: memory, topic: t, generate: 1000}}
    batch_size: 10
""",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers",
            "run",
            str(config),
            "--summary-json",
            str(summary),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (started.exists() and started.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), "the first invocation never started"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # The batch in flight when SIGTERM came finished and was checkpointed; nothing else started.
    assert handled.read_bytes().count(b"\n") == 10
    assert len(started.read_text().splitlines()) == 1
    stats = orjson.loads(summary.read_bytes())["slow"]
    assert stats["succeeded"] == 10
    assert stats["checkpoints"] == {"t-0": 10}


def test_run_until_idle_writes_the_summary(tmp_path: Path) -> None:
    handled, summary = tmp_path / "handled", tmp_path / "s.json"
    config = write_config(
        tmp_path,
        f"""
functions:
  f:
    handler: tests.handlers.runtime_handlers:misbehave
    isolation: thread
    environment: {{HANDLED_FILE: "{handled}"}}
event_source_mappings:
  - name: sample
    function: f
    pollers: 1
    source: {{type: memory, topic: t, partitions: 2, generate: 500}}
    batch_size: 50
    filter_criteria:
      filters: [{{pattern: '{{"value": {{"kind": ["order"]}}}}'}}]
    destination_config: {{on_failure: {{type: file, path: "{tmp_path / "dlq"}"}}}}
""",
    )
    result = workers("run", str(config), "--until-idle", "1", "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr
    stats = orjson.loads(summary.read_bytes())["sample"]
    assert stats["polled"] == 500 and stats["filtered_out"] == 250
    assert stats["succeeded"] == 250 and stats["dead_lettered"] == 0
    assert stats["checkpoints"] == {"t-0": 250, "t-1": 250}
    assert handled.read_bytes().count(b"\n") == 250


def test_log_format_json_writes_json_lines_from_every_process(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
functions:
  f: {handler: "tests.handlers.misbehaving:logs_through_context", isolation: process}
event_source_mappings:
  - name: sample
    function: f
    source: {type: memory, topic: t, partitions: 1, generate: 3}
""",
    )
    result = workers("--log-format", "json", "run", str(config), "--until-idle", "0.5")
    assert result.returncode == 0, result.stderr
    entries = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    # The supervisor's lines, the poller's (tagged) and the handler's output all come as JSON.
    assert any(e["logger"] == "workers.supervisor" for e in entries)
    assert any(e.get("poller") == "sample#0" for e in entries)
    assert any(
        e["logger"] == "workers.function.f" and "logged through context.log" in e["message"]
        for e in entries
    )


def test_validate_reports_key_path_and_exits_2(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
functions: {f: {handler: "tests.handlers.runtime_handlers:misbehave"}}
event_source_mappings:
  - {name: m, function: f, batch_size: 0, source: {type: memory}}
""",
    )
    result = workers("validate", str(config))
    assert result.returncode == 2
    assert f"{config}: event_source_mappings[0].batch_size:" in result.stderr


def test_validate_ok_prints_warnings(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
functions: {f: {handler: "tests.handlers.runtime_handlers:misbehave"}}
event_source_mappings: [{name: m, function: f, source: {type: memory}}]
""",
    )
    result = workers("validate", str(config))
    assert result.returncode == 0, result.stderr
    assert "no on-failure destination" in result.stdout
    assert "ok (1 function(s), 1 mapping(s))" in result.stdout


def test_invoke_runs_the_handler_once(tmp_path: Path) -> None:
    handled = tmp_path / "handled"
    config = write_config(
        tmp_path,
        f"""
functions:
  f:
    handler: tests.handlers.runtime_handlers:misbehave
    environment: {{HANDLED_FILE: "{handled}"}}
event_source_mappings: [{{name: m, function: f, source: {{type: memory}}}}]
""",
    )
    event = tmp_path / "event.json"
    event.write_bytes(
        orjson.dumps({"records": {"t-0": [{"value": "aGVsbG8="}, {"value": "cmFpc2U="}]}})
    )
    failed = workers("invoke", str(config), "f", "--event", str(event))
    assert failed.returncode == 1 and '"errorType": "ValueError"' in failed.stdout
    event.write_bytes(orjson.dumps({"records": {"t-0": [{"value": "aGVsbG8="}]}}))
    ok = workers("invoke", str(config), "f", "--event", str(event))
    assert ok.returncode == 0, ok.stderr
    assert handled.read_bytes() == b"hello\n"


def test_every_command_has_complete_help() -> None:
    parser = build_parser()
    seen: list[str] = []

    def check(name: str, sub: argparse.ArgumentParser) -> None:
        seen.append(name)
        text = sub.format_help()
        assert sub.description, name
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child, child_parser in action.choices.items():
                    assert child in text, f"{name} help does not list {child}"
                    check(f"{name} {child}", child_parser)
            elif action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help"
                for flag in action.option_strings:
                    assert flag in text

    check("workers", parser)
    assert {"workers run", "workers validate", "workers invoke", "workers demo"} <= set(seen)
    assert {"workers dlq list", "workers dlq show", "workers dlq replay"} <= set(seen)
    assert {"workers mappings list", "workers mappings enable", "workers mappings disable"} <= set(
        seen
    )
    help_run = workers("run", "--help")
    assert help_run.returncode == 0 and "--until-idle" in help_run.stdout


def test_workers_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "workers"
    assert exe.exists()
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "validate" in result.stdout


def test_metrics_health_and_status_endpoints(tmp_path: Path) -> None:
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handled = tmp_path / "handled"
    config = write_config(
        tmp_path,
        f"""
functions:
  f:
    handler: tests.handlers.runtime_handlers:misbehave
    isolation: thread
    environment: {{HANDLED_FILE: "{handled}"}}
event_source_mappings:
  - name: sample
    function: f
    source: {{type: memory, topic: t, partitions: 2, generate: 300}}
    batch_size: 50
""",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers", "run", str(config), "--metrics-port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        deadline = time.monotonic() + 60
        metrics = ""
        while time.monotonic() < deadline:
            try:
                _, metrics = get("/metrics")
            except OSError:
                time.sleep(0.2)
                continue
            if 'esm_invoked_events_total{mapping="sample"} 300.0' in metrics:
                break
            time.sleep(0.2)
        assert 'esm_polled_events_total{mapping="sample"} 300.0' in metrics
        assert 'esm_invoked_events_total{mapping="sample"} 300.0' in metrics
        assert 'esm_invocation_duration_seconds_count{mapping="sample"}' in metrics
        assert "esm_offset_lag" in metrics and "esm_execution_environments" in metrics
        assert get("/healthz")[0] == 200
        assert get("/readyz")[0] == 200
        status = orjson.loads(get("/status")[1])
        assert status["pollers"][0]["assigned"] == ["t-0", "t-1"]
        assert status["summary"]["sample"]["succeeded"] == 300
        code, html = get("/")
        assert code == 200 and "<title>esm-workers status</title>" in html
        assert '"succeeded":300' in html  # the status as it was, embedded for the first render
        assert get("/nope")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # The endpoint binds to loopback unless told otherwise.
    assert f"metrics on http://127.0.0.1:{port}/metrics" in out
