"""`workers run` with an on-failure destination that refuses its letters (a RabbitMQ exchange no
queue is bound to): the log, `/status` and `/metrics` say so while the records wait; once a
queue is bound the letters land and the state is ok again."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest

from tests import brokers

REPO = Path(__file__).resolve().parents[2]
MESSAGES = 3

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            body: bytes = r.read()
            return body.decode()
    except (OSError, urllib.error.URLError):
        return ""


def wait_for(what: str, check: Callable[[], Any], log: Path, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s}s:\n{log.read_text()[-3000:]}")


def destination_of(port: int) -> dict[str, Any]:
    text = get(port, "/status")
    if not text:
        return {}
    pollers = orjson.loads(text)["pollers"]
    state: dict[str, Any] = pollers[0].get("destination", {}) if pollers else {}
    return state


def test_a_refusing_destination_is_shown_until_it_accepts(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    queue, exchange, letters = (
        brokers.unique_name("q"),
        brokers.unique_name("dlx"),
        brokers.unique_name("dlq"),
    )
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    channel = connection.channel()
    channel.queue_declare(queue)
    # No queue is bound to it: every letter published there is returned unroutable.
    channel.exchange_declare(exchange, "direct")
    for i in range(MESSAGES):
        channel.basic_publish("", queue, f"m{i}".encode())
    port = free_port()
    config = tmp_path / "mappings.yaml"
    config.write_text(
        f"""
functions:
  f: {{handler: "tests.handlers.misbehaving:raises", isolation: thread}}
event_source_mappings:
  - name: m
    function: f
    source: {{type: rabbitmq, url: '{rabbitmq_url}', queue: {queue}}}
    batch_size: {MESSAGES}
    maximum_retry_attempts: 0
    destination_config:
      on_failure:
        {{type: rabbitmq, url: '{rabbitmq_url}', exchange: {exchange}, routing_key: letters,
          queue: {letters}}}
"""
    )
    log = tmp_path / "run.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", str(config), "--metrics-port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        refusing = wait_for(
            "refusing state in /status",
            lambda: (s := destination_of(port)).get("state") == "refusing" and s,
            log,
        )
        assert "no queue bound" in refusing["last_reason"], refusing
        assert refusing["refusing_since"]
        assert refusing["letters_waiting"] >= 1
        assert refusing["records_waiting"] >= 1
        assert "guest:guest@" not in refusing["last_reason"]
        metrics = get(port, "/metrics")
        assert 'esm_destination_refusing{mapping="m"} 1.0' in metrics
        assert 'esm_destination_refusals_total{mapping="m"}' in metrics
        text = log.read_text()
        assert "mapping m: on-failure destination refused" in text
        assert "not checkpointed" in text

        channel.queue_declare(letters)
        channel.queue_bind(letters, exchange, "letters")
        wait_for(
            "state ok in /status",
            lambda: destination_of(port).get("state") == "ok",
            log,
        )
        metrics = get(port, "/metrics")
        assert 'esm_destination_refusing{mapping="m"} 0.0' in metrics
        text = log.read_text()
        assert "on-failure destination accepts letters again after" in text
        # Refused several times, within one interval: said once.
        assert text.count("on-failure destination refused") == 1, text
        lettered: list[str] = []

        def all_lettered() -> bool:
            method, _props, body = channel.basic_get(letters, auto_ack=True)
            if method is not None:
                payload = orjson.loads(body)["payload"]
                for items in payload["rmqMessagesByQueue"].values():
                    lettered.extend(item["data"] for item in items)
            return len(lettered) >= MESSAGES

        wait_for("every record's letter", all_lettered, log)
        assert sorted(base64.b64decode(d) for d in lettered) == [
            f"m{i}".encode() for i in range(MESSAGES)
        ]
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=30)
        finally:
            channel.queue_delete(queue)
            channel.queue_delete(letters)
            channel.exchange_delete(exchange)
            connection.close()
    assert run.returncode == 0, log.read_text()[-3000:]
