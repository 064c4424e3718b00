"""What `workers` shows when something is wrong: one line, naming where, never a password.

The brokers here are ports where nothing listens (127.0.0.1:1), never the shared servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-s3cret"
NOWHERE = "127.0.0.1:1"


def workers(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SECRET": SECRET, **(env or {})},
    )


def mapping_file(tmp_path: Path, source: str, destination: str = "") -> Path:
    config = tmp_path / "mappings.yaml"
    on_failure = f"\n    destination_config: {{on_failure: {destination}}}" if destination else ""
    config.write_text(
        f"""
functions:
  f: {{handler: "tests.handlers.misbehaving:ok", isolation: thread}}
event_source_mappings:
  - name: m
    function: f
    source: {source}{on_failure}
"""
    )
    return config


@pytest.mark.parametrize(
    "url",
    [
        "amqps//user:${SECRET}@host",  # not a URL: no "://"
        "amqp://user:${SECRET}@host:port/",  # a port that is no number
        "amqp//${SECRET}@host",  # no password, the secret as the user
        "${RABBIT_URL}",  # the whole URL from the environment
        "amqp://user:${SECRET}@host/?heartbeat=abc",
    ],
)
def test_a_bad_url_never_shows_the_secret_from_the_environment(tmp_path: Path, url: str) -> None:
    config = mapping_file(tmp_path, f'{{type: rabbitmq, url: "{url}", queue: q}}')
    done = workers("validate", str(config), env={"RABBIT_URL": f"amqps//u:{SECRET}@host"})
    assert done.returncode == 2
    assert "event_source_mappings[0].source.url: bad URL" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_a_bad_heartbeat_is_a_config_error_naming_file_key_and_problem(tmp_path: Path) -> None:
    config = mapping_file(
        tmp_path,
        '{type: redis, url: "redis://127.0.0.1:6379/0", streams: [s]}',
        '{type: rabbitmq, url: "amqp://guest:guest@localhost/%2f?heartbeat=abc", routing_key: x}',
    )
    done = workers("validate", str(config))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {config}: event_source_mappings[0].destination_config.on_failure.url: bad URL:"
        " URL parameter heartbeat must be an integer (got 'abc')"
    )


def test_an_unreachable_rabbitmq_never_shows_the_password(tmp_path: Path) -> None:
    url = f"amqp://user:${{SECRET}}@{NOWHERE}/%2f"
    config = mapping_file(tmp_path, f'{{type: rabbitmq, url: "{url}", queue: q}}')
    done = workers("validate", str(config), "--connect")
    assert done.returncode == 1
    assert "m: cannot connect: " in done.stderr and "user:***@127.0.0.1:1" in done.stderr
    assert SECRET not in done.stdout + done.stderr

    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SECRET": SECRET},
        )
    try:
        deadline = time.monotonic() + 90
        while log_path.read_text().count("broker error") < 2 and time.monotonic() < deadline:
            assert run.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    output = log_path.read_text()
    # pika's connection errors have an empty str(): the reason must still be there.
    assert "broker error: AMQPConnectionError: (AMQPConnectorSocketConnectError" in output
    assert "broker error: ;" not in output
    assert SECRET not in output


@pytest.mark.parametrize(
    "destination",
    [
        f'{{type: rabbitmq, url: "amqp://user:${{SECRET}}@{NOWHERE}/%2f", routing_key: dlq}}',
        f'{{type: redis, url: "redis://:${{SECRET}}@{NOWHERE}/0", stream: dlq}}',
        f'{{type: kafka, topic: dlq, bootstrap_servers: "{NOWHERE}"}}',
    ],
)
def test_dlq_list_on_an_unreachable_destination_is_one_line(
    tmp_path: Path, destination: str
) -> None:
    config = mapping_file(
        tmp_path, '{type: redis, url: "redis://127.0.0.1:6379/0", streams: [s]}', destination
    )
    done = workers("--log-level", "ERROR", "dlq", "list", str(config), "m")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dlq list m (on-failure destination")
    assert NOWHERE in lines[0]
    assert SECRET not in done.stdout + done.stderr
