"""Deaths no Python code catches, against real Redis through `workers run`: a handler that ends
its poller with `os._exit` (isolation: thread), a supervisor killed with SIGKILL, a batch that
fails in the engine itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from tests import brokers
from tests.cli import REPO, workers_run

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.fixture
def stream(client: redis.Redis) -> Iterator[str]:
    name = brokers.unique_name("redis-crash")
    yield name
    client.delete(name, f"{name}.dlq")


def write_config(
    path: Path, url: str, stream: str, handler: str, environment: dict[str, str], **function: Any
) -> Path:
    config = {
        "functions": {
            "f": {"handler": handler, "timeout_s": 10, "environment": environment, **function}
        },
        "event_source_mappings": [
            {
                "name": stream,
                "function": "f",
                "source": {"type": "redis", "url": url, "streams": [stream]},
                "batch_size": 10,
                "maximum_batching_window_s": 0.05,
                "bisect_batch_on_function_error": True,
                "maximum_retry_attempts": 2,
                "destination_config": {
                    "on_failure": {"type": "redis", "url": url, "stream": f"{stream}.dlq"}
                },
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def handled_ns(events: Path) -> list[str]:
    """Field `n` of every entry of every successful invocation, in order."""
    import base64

    if not events.exists():
        return []
    out = []
    for line in events.read_bytes().splitlines():
        for items in orjson.loads(line)["records"].values():
            out += [base64.b64decode(item["fields"]["n"]).decode() for item in items]
    return out


def letters(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    rows: Any = client.xrange(f"{stream}.dlq")
    return [orjson.loads(fields[b"letter"]) for _, fields in rows]


def run(config: Path, tmp_path: Path, timeout_s: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        workers_run(config, tmp_path / "summary.json"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_a_record_that_kills_its_poller_is_dead_lettered_after_three_deaths(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    ns = [str(i) for i in range(40)]
    for n in ns:
        client.xadd(stream, {"n": n})
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path / "config.yaml",
        redis_url,
        stream,
        "tests.handlers.crash_handlers:exit_on_poison",
        {"CRASH_EVENTS": str(events), "CRASH_POISON": "17"},
        isolation="thread",
    )
    done = run(config, tmp_path)

    # Pollers died on the way: the run says so, but ends, with nothing left behind.
    assert done.returncode == 1, done.stderr[-3000:]
    assert sorted(set(handled_ns(events)), key=int) == [n for n in ns if n != "17"]
    [letter] = letters(client, stream)
    assert letter["error"]["errorType"] == "Runtime.PollerDied"
    assert letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
    [item] = letter["payload"]["records"][stream]
    assert item["fields"]["n"] == "MTc="  # base64 of "17"
    pending: Any = client.xpending(stream, stream)
    assert pending["pending"] == 0
    assert done.stderr.count("running it alone") >= 2


def test_a_batch_failing_in_the_engine_makes_the_run_exit_1(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    ns = [str(i) for i in range(30)]
    for n in ns:
        client.xadd(stream, {"n": n})
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path / "config.yaml",
        redis_url,
        stream,
        "tests.handlers.crash_handlers:break_engine_once",
        {"CRASH_EVENTS": str(events), "CRASH_MARKER": str(tmp_path / "broken")},
        isolation="thread",
    )
    done = run(config, tmp_path)

    assert "injected: settling failed" in done.stderr
    assert done.returncode == 1, done.stderr[-3000:]
    # The restarted poller settled what the failed one left.
    assert set(handled_ns(events)) == set(ns)
    pending: Any = client.xpending(stream, stream)
    assert pending["pending"] == 0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            # The command may hold spaces and parentheses: fields after the last ")".
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    tree = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def test_pollers_and_environments_die_with_a_killed_supervisor(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    for n in range(20):
        client.xadd(stream, {"n": str(n)})
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path / "config.yaml",
        redis_url,
        stream,
        "tests.handlers.crash_handlers:record_events",
        {"CRASH_EVENTS": str(events)},
        concurrency=2,
    )
    command = workers_run(config, tmp_path / "summary.json")
    command = command[: command.index("--until-idle")]  # a service: runs until stopped
    supervisor = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(handled_ns(events)) >= 20, 60, "the first entries to be handled")
        family = descendants(supervisor.pid)
        # A poller, the forkserver and at least one execution environment.
        assert len(family) >= 3, family
        supervisor.kill()
        supervisor.wait(10)
        wait_for(
            lambda: not any(alive(pid) for pid in family), 20, "the supervisor's processes to end"
        )
        seen = len(handled_ns(events))
        for n in range(20, 30):
            client.xadd(stream, {"n": str(n)})
        time.sleep(3)
        assert len(handled_ns(events)) == seen
        info: Any = client.xinfo_groups(stream)
        assert info[0]["lag"] == 10  # nobody consumes any more
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)


@pytest.mark.rabbitmq
def test_a_message_that_kills_its_poller_is_dead_lettered_after_three_deaths_on_rabbitmq(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    import base64

    import pika

    queue = brokers.unique_name("rmq-crash")
    dlq = f"{queue}.dlq"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    channel = connection.channel()
    try:
        channel.queue_declare(queue)
        channel.queue_declare(dlq)
        channel.confirm_delivery()
        values = [f"m{i}" for i in range(30)]
        for value in values:
            channel.basic_publish("", queue, value.encode())
        events = tmp_path / "events.jsonl"
        config = {
            "functions": {
                "f": {
                    "handler": "tests.handlers.crash_handlers:exit_on_poison",
                    "timeout_s": 10,
                    "isolation": "thread",
                    "environment": {"CRASH_EVENTS": str(events), "CRASH_POISON": "m11"},
                }
            },
            "event_source_mappings": [
                {
                    "name": queue,
                    "function": "f",
                    "source": {"type": "rabbitmq", "url": rabbitmq_url, "queue": queue},
                    "batch_size": 10,
                    "maximum_batching_window_s": 0.05,
                    "bisect_batch_on_function_error": True,
                    "maximum_retry_attempts": 2,
                    "destination_config": {
                        "on_failure": {"type": "rabbitmq", "url": rabbitmq_url, "routing_key": dlq}
                    },
                }
            ],
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        done = run(path, tmp_path)

        assert done.returncode == 1, done.stderr[-3000:]
        handled = set()
        for line in events.read_bytes().splitlines():
            for items in orjson.loads(line)["rmqMessagesByQueue"].values():
                handled |= {base64.b64decode(i["data"]).decode() for i in items}
        assert handled == set(values) - {"m11"}
        method, _, body = channel.basic_get(dlq, auto_ack=True)
        assert method is not None
        letter = orjson.loads(body)
        assert letter["error"]["errorType"] == "Runtime.PollerDied"
        [item] = [i for q in letter["payload"]["rmqMessagesByQueue"].values() for i in q]
        assert base64.b64decode(item["data"]) == b"m11"
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
    finally:
        channel.queue_delete(queue)
        channel.queue_delete(dlq)
        connection.close()


def test_busy_execution_environments_die_with_their_killed_poller(
    redis_url: str, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    for n in range(4):
        client.xadd(stream, {"n": str(n)})
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path / "config.yaml",
        redis_url,
        stream,
        "tests.handlers.crash_handlers:busy",
        {"CRASH_EVENTS": str(events)},
        timeout_s=120,
    )
    command = workers_run(config, tmp_path / "summary.json")
    command = command[: command.index("--until-idle")]
    supervisor = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(handled_ns(events)) >= 1, 60, "a handler to start")
        [poller] = [
            pid
            for pid in _children()[supervisor.pid]
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        family = descendants(poller)  # the forkserver and the busy environment
        assert len(family) >= 2, family
        os.kill(poller, signal.SIGKILL)
        wait_for(
            lambda: not any(alive(pid) for pid in family), 10, "the poller's environments to end"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)


@pytest.mark.kafka
def test_a_record_that_kills_its_poller_is_dead_lettered_after_three_deaths_on_kafka(
    kafka_broker: Any, tmp_path: Path
) -> None:
    import base64

    from tests.brokers import KafkaRecord, read_topic

    bootstrap = kafka_broker.bootstrap
    topic = brokers.unique_name("kafka-crash")
    dlq = f"{topic}.dlq"
    brokers.create_topic(bootstrap, topic, 1)
    brokers.create_topic(bootstrap, dlq, 1)
    values = [f"v{i}" for i in range(30)]
    brokers.produce(bootstrap, topic, [KafkaRecord(v) for v in values])
    events = tmp_path / "events.jsonl"
    config = {
        "functions": {
            "f": {
                "handler": "tests.handlers.crash_handlers:exit_on_poison",
                "timeout_s": 10,
                "isolation": "thread",
                "environment": {"CRASH_EVENTS": str(events), "CRASH_POISON": "v13"},
            }
        },
        "event_source_mappings": [
            {
                "name": topic,
                "function": "f",
                "source": {
                    "type": "kafka",
                    "bootstrap_servers": bootstrap,
                    "topics": [topic],
                    "client_config": brokers.KAFKA_TEST_SESSION,
                },
                "batch_size": 10,
                "maximum_batching_window_s": 0.05,
                "maximum_retry_attempts": 0,
                "destination_config": {"on_failure": {"type": "kafka", "topic": dlq}},
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = run(path, tmp_path, timeout_s=240)

    assert done.returncode == 1, done.stderr[-3000:]
    handled = set()
    for line in events.read_bytes().splitlines():
        for items in orjson.loads(line)["records"].values():
            handled |= {base64.b64decode(i["value"]).decode() for i in items}
    assert handled == set(values) - {"v13"}
    [message] = read_topic(bootstrap, dlq)
    letter = orjson.loads(message.value() or b"")
    assert letter["error"]["errorType"] == "Runtime.PollerDied"
    [item] = letter["payload"]["records"][f"{topic}-0"]
    assert item["offset"] == 13
    assert brokers.committed_offsets(bootstrap, topic, topic) == {0: 30}
