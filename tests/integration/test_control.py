"""Live control and back-pressure against real brokers, through `workers run` and
`workers mappings` as an operator uses them: a disabled mapping reads nothing while records
arrive and an enable handles each of them once (Redis, and Kafka, where the consumer must stay
in its group while disabled); `enabled: false`; the bearer token; a handler raising
`workers.Throttled` sends nothing to the on-failure destination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from tests import brokers
from tests.brokers import KafkaRecord, Tansu, committed_offsets
from tests.integration import test_kafka as kafka_tests
from tests.integration.test_redis import handled, produce

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "control-token-for-tests"


def wait_for(condition: Callable[[], Any], what: str, log: Path, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return got


class Instance:
    """`workers run CONFIG --metrics-port PORT` in the background, and `workers mappings`."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = brokers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {**os.environ, **(env or {})}
        command = [sys.executable, "-m", "workers", "run", str(config)]
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*command, "--metrics-port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def mappings(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.env.items() if k != "ESM_CONTROL_TOKEN"}
        if token is not None:
            env["ESM_CONTROL_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "workers", "mappings", *args, "--url", self.url],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def get(self, path: str, token: str | None = TOKEN) -> Any:
        request = urllib.request.Request(self.url + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                body = answer.read()
        except OSError:
            return None
        return orjson.loads(body) if path != "/metrics" else body.decode()

    def state(self, mapping: str) -> str | None:
        rows = (self.get("/mappings") or {}).get("mappings", [])
        return next((r["state"] for r in rows if r["name"] == mapping), None)

    def stop(self) -> str:
        """SIGTERM; insists on exit 0 and returns the run's log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        text = self.log.read_text()
        assert code == 0, text[-3000:]
        return text


@pytest.fixture
def streams(names: Callable[[str], str]) -> Callable[[str], str]:
    """Unique stream names, deleted after the test (the shared `names`)."""
    return names


def redis_config(
    path: Path, url: str, log: Path, mappings: Sequence[dict[str, Any]], **function: Any
) -> Path:
    environment = {"REDIS_TEST_LOG": str(log), **function.pop("environment", {})}
    config = {
        "functions": {
            "f": {
                "handler": "tests.handlers.redis_handlers:log_ids",
                "timeout_s": 20,
                "environment": environment,
                **function,
            }
        },
        "event_source_mappings": [
            {
                "function": "f",
                "batch_size": 10,
                "maximum_batching_window_s": 0.05,
                **m,
                "source": {"type": "redis", "url": url, **m["source"]},
            }
            for m in mappings
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def group_of(client: redis.Redis, stream: str) -> dict[str, Any] | None:
    groups: Any = client.xinfo_groups(stream)
    return {k: v for k, v in groups[0].items()} if groups else None


# --- Redis: disable, enable, enabled: false, the token --------------------------------------------


@pytest.mark.redis
def test_redis_disable_reads_nothing_and_enable_handles_each_record_once(
    tmp_path: Path, redis_url: str, client: redis.Redis, streams: Callable[[str], str]
) -> None:
    live, dormant = streams("live"), streams("dormant")
    out = tmp_path / "handled.log"
    config = redis_config(
        tmp_path / "mappings.yaml",
        redis_url,
        out,
        [
            {"name": live, "source": {"streams": [live]}},
            {"name": dormant, "enabled": False, "source": {"streams": [dormant]}},
        ],
    )
    first = produce(client, live, [{"n": i} for i in range(20)])
    waiting = produce(client, dormant, [{"n": i} for i in range(10)])
    instance = Instance(config, tmp_path / "run.log", env={"ESM_CONTROL_TOKEN": TOKEN})
    try:
        wait_for(lambda: len(handled(out)) == 20, "the first entries", instance.log)
        # The token: refused without it or with another one, in a clear line and exit 1.
        refused = instance.mappings("list")
        assert refused.returncode == 1
        assert "unauthorized (set ESM_CONTROL_TOKEN" in refused.stderr
        assert instance.mappings("list", token="nope").returncode == 1
        wait_for(lambda: instance.state(dormant) == "Disabled", "dormant Disabled", instance.log)
        listed = instance.mappings("list", token=TOKEN)
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()]
        assert rows == [[live, "Enabled"], [dormant, "Disabled"]]
        # enabled: false: not even connected, so its group was never created.
        assert group_of(client, dormant) is None
        unknown = instance.mappings("disable", "nope", token=TOKEN)
        assert unknown.returncode == 2
        assert "no mapping named 'nope'" in unknown.stderr

        disabled = instance.mappings("disable", live, "--wait", "30", token=TOKEN)
        assert (disabled.returncode, disabled.stdout) == (0, f"{live}  Disabled\n")
        second = produce(client, live, [{"n": i} for i in range(20, 40)])
        time.sleep(2.0)  # entries wait in the stream while the loop goes on
        group = group_of(client, live)
        assert group is not None and group["pending"] == 0
        assert group["last-delivered-id"].decode() == first[-1]  # nothing read since
        assert len(handled(out)) == 20
        status = instance.get("/status")
        assert {p["state"] for p in status["pollers"] if p["mapping"] == live} == {"Disabled"}
        metrics = instance.get("/metrics")
        assert f'esm_mapping_state{{mapping="{live}",state="Disabled"}} 1.0' in metrics

        enabled = instance.mappings("enable", live, "--wait", "30", token=TOKEN)
        assert (enabled.returncode, enabled.stdout) == (0, f"{live}  Enabled\n")
        wait_for(lambda: len(handled(out)) == 40, "the entries added while disabled", instance.log)
        enabled = instance.mappings("enable", dormant, "--wait", "30", token=TOKEN)
        assert enabled.returncode == 0, enabled.stderr
        wait_for(lambda: len(handled(out)) == 50, "the dormant mapping's entries", instance.log)
    finally:
        text = instance.stop()
    ids = Counter((stream, entry_id) for _, stream, entry_id in handled(out))
    expected = [(live, i) for i in first + second] + [(dormant, i) for i in waiting]
    assert ids == Counter(expected)  # each once
    assert TOKEN not in text
    assert "mapping " + dormant + " is disabled (enabled: false)" in text


# --- Redis: Throttled ----------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_throttled_handler_dead_letters_nothing_and_handles_every_entry(
    tmp_path: Path, redis_url: str, client: redis.Redis, streams: Callable[[str], str]
) -> None:
    stream, dlq = streams("throttled"), streams("throttled-dlq")
    out = tmp_path / "handled.log"
    config = redis_config(
        tmp_path / "mappings.yaml",
        redis_url,
        out,
        [
            {
                "name": stream,
                "source": {"streams": [stream]},
                # Any failure would be bisected, then dead-lettered without a retry.
                "maximum_retry_attempts": 0,
                "bisect_batch_on_function_error": True,
                "destination_config": {
                    "on_failure": {"type": "redis", "url": redis_url, "stream": dlq}
                },
            }
        ],
        handler="tests.handlers.redis_handlers:throttled_then_log_ids",
        environment={
            "REDIS_TEST_THROTTLES": "2",
            "REDIS_TEST_THROTTLE_FILE": str(tmp_path / "throttles"),
        },
    )
    ids = produce(client, stream, [{"n": i} for i in range(30)])
    summary_path = tmp_path / "summary.json"
    command = [sys.executable, "-m", "workers", "run", str(config), "--until-idle", "1"]
    done = subprocess.run(
        [*command, "--summary-json", str(summary_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = orjson.loads(summary_path.read_bytes())[stream]
    assert summary["throttled"] == 2
    assert summary["dead_lettered"] == 0 and summary["bisected"] == 0
    assert summary["succeeded"] == 30
    assert client.xlen(dlq) == 0
    assert Counter(entry_id for _, _, entry_id in handled(out)) == Counter(ids)
    assert "is throttled (Throttled: the downstream answered 429); pausing the mapping for 1s" in (
        done.stderr
    )
    assert "pausing the mapping for 2s" in done.stderr
    assert "throttled=2" in done.stderr


# --- Kafka: a disabled consumer stays in its group ------------------------------------------------


@pytest.mark.kafka
def test_kafka_disabled_longer_than_max_poll_interval_keeps_its_partitions(
    kafka_broker: Tansu, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("kafka-control")
    brokers.create_topic(bootstrap, name, 2)
    out = tmp_path / "handled.txt"
    # librdkafka leaves the group when poll() is not called for max.poll.interval.ms (it may be
    # no shorter than the session).
    max_poll_s = 3
    client_config = {**kafka_tests.CLIENT_CONFIG, "max.poll.interval.ms": max_poll_s * 1000}
    config = kafka_tests.write_config(
        tmp_path / "config.yaml",
        bootstrap=bootstrap,
        environment={"KAFKA_OUT": str(out)},
        mappings=[
            {
                "name": name,
                "batch_size": 10,
                "maximum_batching_window_s": 0.05,
                "source": {"client_config": client_config},
            }
        ],
    )
    brokers.produce(bootstrap, name, [KafkaRecord(f"a{i}", f"k{i % 4}") for i in range(20)])
    instance = Instance(config, tmp_path / "run.log")
    try:
        wait_for(lambda: len(kafka_tests.handled(out)) == 20, "the first records", instance.log)
        wait_for(
            lambda: sum(committed_offsets(bootstrap, name, name).values()) == 20,
            "the first commits",
            instance.log,
        )
        disabled = instance.mappings("disable", name, "--wait", "30")
        assert (disabled.returncode, disabled.stdout) == (0, f"{name}  Disabled\n")
        brokers.produce(bootstrap, name, [KafkaRecord(f"b{i}", f"k{i % 4}") for i in range(20)])
        # Disabled past max.poll.interval.ms: a consumer that had stopped polling would have
        # been put out of its group by now.
        time.sleep(max_poll_s + 2.0)
        assert len(kafka_tests.handled(out)) == 20
        assert sum(committed_offsets(bootstrap, name, name).values()) == 20
        enabled = instance.mappings("enable", name, "--wait", "30")
        assert enabled.returncode == 0, enabled.stderr
        wait_for(lambda: len(kafka_tests.handled(out)) == 40, "the later records", instance.log)
        wait_for(
            lambda: sum(committed_offsets(bootstrap, name, name).values()) == 40,
            "every commit",
            instance.log,
        )
    finally:
        text = instance.stop()
    values = Counter(v for *_, v in kafka_tests.handled(out))
    assert values == Counter([f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)])
    kafka_tests.assert_ordered_per_key(kafka_tests.handled(out))
    # The partitions were assigned once and never revoked or lost before the shutdown.
    running = text.split("stopping: poller processes drain")[0]
    assert running.count(f"mapping {name}: assigned") == 1, text[-3000:]
    assert "revoking" not in running and "max.poll" not in running, text[-3000:]
