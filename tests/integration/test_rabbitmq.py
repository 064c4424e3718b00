"""The RabbitMQ connector against a real broker: the contract suite on classic and quorum queues,
and `workers run` end to end (dead letters, broker-closed connections, partial batch responses)."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pika
import pytest
import yaml

from connectors.rabbitmq import config as rabbitmq_cfg
from connectors.rabbitmq.connection import DeliveryRefused, QueueNotFound
from connectors.rabbitmq.destination import RabbitMQDestination
from connectors.rabbitmq.probe import probe_rabbitmq
from connectors.rabbitmq.shape import header_json, java_date
from connectors.rabbitmq.source import RabbitMQSource
from tests import cli
from tests.brokers import rabbitmq_reachable, rabbitmq_url, require, unique_name
from tests.cli import workers_run
from tests.contract import AckContract, RecordingListener, SourceContract, poll_n
from tests.engine import letter_values, rmq_items, value_of
from tests.faults.private import PrivateRabbit
from workers.app import config as cfg
from workers.app import registry
from workers.engine.ports import Destination, Source
from workers.events import records as event_records

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

REPO = Path(__file__).resolve().parents[2]
URL = rabbitmq_url()
VHOST = "/" if urlsplit(URL).path in ("", "/") else unquote(urlsplit(URL).path[1:])
# A header of AMQP timestamp type: not a scalar, so no record header.
WHEN = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module", autouse=True)
def _rabbitmq_up() -> None:
    require("RabbitMQ", rabbitmq_reachable(URL))


def _need_rabbitmqctl() -> None:
    require("rabbitmqctl", shutil.which("rabbitmqctl") is not None, "run the tests on its host")


# --- broker helpers ----------------------------------------------------------------------------


class Rabbit:
    """Short-lived admin connections for declaring, publishing and reading back."""

    def __init__(self, url: str = URL) -> None:
        self.url = url
        self.created: list[str] = []

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    def declare(self, name: str, quorum: bool = False) -> None:
        arguments = {"x-queue-type": "quorum"} if quorum else None
        connection = self.connect()
        try:
            connection.channel().queue_declare(name, durable=True, arguments=arguments)
        finally:
            connection.close()
        if name not in self.created:
            self.created.append(name)

    def publish(self, name: str, values: Sequence[bytes], **props: Any) -> None:
        """Persistent messages with a timestamp, confirmed by the broker."""
        connection = self.connect()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, timestamp=int(time.time()), **props)
            for value in values:
                channel.basic_publish("", name, value, properties)
        finally:
            connection.close()

    def ready(self, name: str) -> int:
        connection = self.connect()
        try:
            count: int = connection.channel().queue_declare(name, passive=True).method.message_count
            return count
        finally:
            connection.close()

    def drain(self, name: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Every message of the queue, removed (basic_get + ack)."""
        out: list[tuple[pika.BasicProperties, bytes]] = []
        connection = self.connect()
        try:
            channel = connection.channel()
            while True:
                method, props, body = channel.basic_get(name, auto_ack=True)
                if method is None:
                    return out
                out.append((props, body))
        finally:
            connection.close()

    def delete_all(self) -> None:
        if not self.created:
            return
        connection = self.connect()
        try:
            channel = connection.channel()
            for name in self.created:
                channel.queue_delete(name)
        finally:
            connection.close()
        self.created.clear()


@pytest.fixture
def rabbit() -> Iterator[Rabbit]:
    admin = Rabbit()
    yield admin
    admin.delete_all()


def rabbitmqctl(*args: str, timeout_s: float = 30.0) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return result.stdout


def queue_counts(
    name: str, ctl: Callable[..., str] | None = None, vhost: str = VHOST
) -> tuple[int, int]:
    """(messages_ready, messages_unacknowledged) as `rabbitmqctl list_queues` reports them, from
    the shared node or through `ctl` (a private node's `rabbitmqctl`)."""
    columns = ("name", "messages_ready", "messages_unacknowledged")
    out = (ctl or rabbitmqctl)("list_queues", "-p", vhost, "--no-table-headers", *columns)
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {name} not listed by rabbitmqctl: {out!r}")


def close_connections(fragment: str) -> int:
    """Close (as the broker does on a forced close) every connection whose client properties
    mention `fragment`; returns how many. Targets only this test's connections."""
    out = rabbitmqctl(
        "list_connections", "-p", VHOST, "--no-table-headers", "pid", "client_properties"
    )
    pids = [line.split("\t", 1)[0] for line in out.splitlines() if fragment in line]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test")
    return len(pids)


def letters_of(messages: list[tuple[pika.BasicProperties, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(body) for _, body in messages]


def test_basic_properties_values_as_lambda_shows_them() -> None:
    # The timestamp of the event example in Lambda's documentation (with-mq.html).
    assert java_date(2021) == "Jan 1, 1970, 12:33:41 AM"
    assert java_date(1_700_000_000) == "Nov 14, 2023, 10:13:20 PM"
    assert header_json({"header1": "value1", "numberInHeader": 10}) == {
        "header1": {"bytes": [118, 97, 108, 117, 101, 49]},
        "numberInHeader": 10,
    }
    # Java bytes are signed; tables and arrays keep their shape.
    assert header_json({"t": {"b": b"\xff"}, "a": [True, "x"]}) == {
        "t": {"b": {"bytes": [-1]}},
        "a": [True, {"bytes": [120]}],
    }


# --- the contract ------------------------------------------------------------------------------


def mapping_for(
    name: str, *, destination: str | None = None, **extra: Any
) -> cfg.EventSourceMapping:
    data: dict[str, Any] = {
        "name": name,
        "function": "f",
        "source": {"type": "rabbitmq", "url": URL, "queue": name},
        **extra,
    }
    if destination is not None:
        data["destination_config"] = {
            "on_failure": {"type": "rabbitmq", "url": URL, "routing_key": destination}
        }
    return cfg.EventSourceMapping.model_validate(data)


def destination_for(name: str, routing_key: str) -> RabbitMQDestination:
    mapping = mapping_for(name, destination=routing_key)
    assert mapping.destination_config is not None
    dst = mapping.destination_config.on_failure
    assert isinstance(dst, rabbitmq_cfg.RabbitMQDestination)
    return RabbitMQDestination(dst, mapping)


def queue_unacked(name: str) -> int:
    """Unacked messages of a queue, as the broker counts them."""
    _need_rabbitmqctl()
    return queue_counts(name)[1]


class TestRabbitMQContract(SourceContract, AckContract):
    quorum = False
    # No group to join: a queue delivers at once. Tests that wait for records that must not
    # come wait this long.
    join_timeout_s = 3.0
    delivery_counts = True  # x-delivery-count

    @pytest.fixture(autouse=True)
    def _admin(self) -> Iterator[None]:
        self.rabbit = Rabbit()
        yield
        self.rabbit.delete_all()

    def fresh(self) -> str:
        name = super().fresh()
        self.rabbit.declare(name, quorum=self.quorum)
        return name

    def make_source(self, name: str) -> Source:
        return registry.open_source(mapping_for(name))

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        self.rabbit.publish(name, values)

    def make_destination(self, name: str) -> Destination:
        self.rabbit.declare(f"{name}.dlq")
        destination = registry.open_destination(mapping_for(name, destination=f"{name}.dlq"))
        assert destination is not None
        return destination

    def dead_letter_values(self, name: str) -> list[bytes]:
        return letter_values(letters_of(self.rabbit.drain(f"{name}.dlq")))

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        return [value_of(item) for item in rmq_items(event)]

    # --- RabbitMQ specifics on top of the contract ----------------------------------------------

    def test_event_carries_lambda_basic_properties(self) -> None:
        name = self.fresh()
        self.rabbit.publish(
            name,
            [b'{"n": 1}'],
            content_type="application/json",
            headers={"tenant": "acme", "n": 7, "flag": True, "raw": b"\xff", "at": WHEN},
            message_id="m-1",
        )
        source = self.make_source(name)
        source.open(RecordingListener())
        try:
            (record,) = poll_n(source, 1, self.join_timeout_s)
            event = source.shape.event([record])
            assert event["eventSource"] == "aws:rmq"
            (message,) = event["rmqMessagesByQueue"][f"{name}::{VHOST}"]
            props = message["basicProperties"]
            assert props["contentType"] == "application/json"
            assert props["deliveryMode"] == 2 and props["messageId"] == "m-1"
            assert props["headers"]["tenant"] == {"bytes": list(b"acme")}
            assert props["headers"]["n"] == 7
            assert props["bodySize"] == len(b'{"n": 1}') and props["type"] is None
            assert props["timestamp"].endswith(("AM", "PM"))
            assert message["redelivered"] is False and isinstance(message["deliveryTag"], int)
            assert base64.b64decode(message["data"]) == b'{"n": 1}'
            assert record.attempts == 0
            # A handler reading the event with workers.events sees the headers and the timestamp
            # the engine saw.
            (back,) = event_records(orjson.loads(orjson.dumps(event)))
            assert (
                back.headers
                == list(record.headers)
                == [
                    ("tenant", b"acme"),
                    ("n", b"7"),
                    ("flag", b"True"),
                    ("raw", b"\xff"),
                ]
            )
            assert back.timestamp_ms == record.timestamp_ms > 0
            source.ack([record])
        finally:
            source.close()

    def test_acks_in_any_order_are_each_sent_once(self) -> None:
        name = self.fresh()
        n = 400  # the prefetch window of a default mapping (4 x batch_size)
        self.rabbit.publish(name, [f"{i}".encode() for i in range(n)])
        source = self.make_source(name)
        source.open(RecordingListener())
        try:
            records = poll_n(source, n, self.join_timeout_s)
            assert len(records) == n
            # Parallel lanes settle out of order: the odd half first, one by one, then the
            # even half in reverse, and some twice (a second ack of a record is a no-op).
            for r in records[1::2]:
                source.ack([r])
            source.ack(list(reversed(records[0::2])))
            source.ack(records[:10])
            deadline = time.monotonic() + 10
            while queue_unacked(name) and time.monotonic() < deadline:
                source.poll(0, 0.1)
            assert queue_unacked(name) == 0
        finally:
            source.close()
        # An ack of a tag twice would have closed the channel (PRECONDITION_FAILED) and sent
        # the messages back; none is ready again.
        assert self.rabbit.ready(name) == 0

    def test_acks_of_a_lost_channel_are_dropped_and_the_messages_redelivered(self) -> None:
        _need_rabbitmqctl()
        name = self.fresh()
        self.rabbit.publish(name, [b"a", b"b", b"c"])
        source = self.make_source(name)
        assert isinstance(source, RabbitMQSource)
        listener = RecordingListener()
        source.open(listener)
        try:
            old = poll_n(source, 3, self.join_timeout_s)
            assert close_connections(f"esm-workers {name}#0") == 1
            with pytest.raises(source.retryable_errors):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    source.poll(10, 0.1)
            assert listener.revoked == {name} and not source.assignment()
            # Their delivery tags belong to the dead channel: never sent on the next one.
            source.ack(old)
            assert source.dropped_acks == 3
            again = poll_n(source, 3, self.join_timeout_s)
            assert sorted(r.value for r in again) == [b"a", b"b", b"c"]
            assert all(r.redelivered and r.attempts >= 1 for r in again)
            assert {r.position for r in again}.isdisjoint(r.position for r in old)
            source.ack(again)
        finally:
            source.close()
        assert self.rabbit.ready(name) == 0 and queue_unacked(name) == 0

    def test_missing_queue_is_a_clear_error(self) -> None:
        name = unique_name("contract-missing")
        source = self.make_source(name)
        with pytest.raises(QueueNotFound, match=f"'{name}'.*vhost '{VHOST}'"):
            source.open(RecordingListener())
        assert not isinstance(QueueNotFound("x"), source.retryable_errors)
        src = mapping_for(name).source
        assert isinstance(src, rabbitmq_cfg.RabbitMQSource)
        with pytest.raises(QueueNotFound):
            probe_rabbitmq(src)

    def test_unroutable_dead_letter_raises(self) -> None:
        name = self.fresh()
        destination = destination_for(name, unique_name("nowhere"))
        try:
            with pytest.raises(DeliveryRefused, match="unroutable"):
                destination.deliver({"payload": {}}, [])
        finally:
            destination.close()


class TestRabbitMQQuorumContract(TestRabbitMQContract):
    quorum = True

    def test_redelivery_counts_come_from_x_delivery_count(self) -> None:
        name = self.fresh()
        self.rabbit.publish(name, [b"again"])
        for expected in (0, 1, 2):
            source = self.make_source(name)
            source.open(RecordingListener())
            try:
                (record,) = poll_n(source, 1, self.join_timeout_s)
                assert record.attempts == expected
                assert record.redelivered is (expected > 0)
            finally:
                source.close()  # unsettled: the broker delivers it again


# --- workers run -------------------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    name: str,
    handler: str,
    environment: dict[str, str],
    isolation: str = "process",
    dlq: str | None = None,
    url: str = URL,
    **settings: Any,
) -> Path:
    mapping: dict[str, Any] = {
        "name": name,
        "function": "fn",
        "source": {"type": "rabbitmq", "url": url, "queue": name},
        **settings,
    }
    if dlq is not None:
        mapping["destination_config"] = {
            "on_failure": {"type": "rabbitmq", "url": URL, "routing_key": dlq}
        }
    function = {
        "handler": handler,
        "isolation": isolation,
        "timeout_s": 10,
        "concurrency": 4,
        "environment": environment,
    }
    config = {"functions": {"fn": function}, "event_source_mappings": [mapping]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_workers(config: Path, summary: Path) -> dict[str, Any]:
    return cli.run_workers(config, summary, check_log=assert_no_password)


def assert_no_password(log: str) -> None:
    password = urlsplit(URL).password
    if password:
        assert f":{password}@" not in log


def handled(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("quorum", [False, True], ids=["classic", "quorum"])
def test_workers_run_dead_letters_exactly_the_poison_messages(
    rabbit: Rabbit, tmp_path: Path, quorum: bool
) -> None:
    _need_rabbitmqctl()
    name = unique_name("rmq-run")
    dlq = f"{name}.dlq"
    rabbit.declare(name, quorum=quorum)
    rabbit.declare(dlq)
    n = 600
    values = [f"m{i}" for i in range(n)]
    poison = {"m7", "m301", "m599"}
    rabbit.publish(name, [v.encode() for v in values])
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        name=name,
        handler="tests.handlers.rmq_handlers:record_values",
        environment={"RMQ_OUT": str(out), "RMQ_POISON": ",".join(sorted(poison))},
        dlq=dlq,
        batch_size=50,
        maximum_batching_window_s=0.1,
        parallelization_factor=2,
        bisect_batch_on_function_error=True,
        maximum_retry_attempts=1,
    )
    summary = run_workers(config, tmp_path / "summary.json")[name]

    seen = handled(out)
    assert sorted(seen) == sorted(v for v in values if v not in poison)  # each exactly once
    letters = rabbit.drain(dlq)
    dead = sorted(v.decode() for v in letter_values(letters_of(letters)))
    assert dead == sorted(poison)
    for props, body in letters:
        letter = orjson.loads(body)
        assert props.delivery_mode == 2 and props.content_type == "application/json"
        assert props.headers["esm-mapping"] == name
        assert props.headers["esm-condition"] == "RetryAttemptsExhausted"
        assert props.headers["esm-error-type"] == "ValueError"
        assert letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
        assert letter["RabbitMQBatchInfo"]["queues"][f"{name}::{VHOST}"]["deliveryTags"]
        assert letter["payload"]["eventSource"] == "aws:rmq"
    assert summary["dead_lettered"] == len(poison)
    assert summary["succeeded"] == n - len(poison)
    assert rabbit.ready(name) == 0
    assert queue_counts(name) == (0, 0)


def test_workers_run_survives_broker_closing_its_connections(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    _need_rabbitmqctl()
    name = unique_name("rmq-close")
    rabbit.declare(name)
    n = 3000
    values = [f"c{i}" for i in range(n)]
    rabbit.publish(name, [v.encode() for v in values])
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        name=name,
        handler="tests.handlers.rmq_handlers:record_values",
        # ~6 s of work in all, so both closes land mid-run even on a loaded machine.
        environment={"RMQ_OUT": str(out), "RMQ_SLEEP_S": "0.05"},
        batch_size=25,
        maximum_batching_window_s=0.05,
        maximum_retry_attempts=10,
    )
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        # Long enough a wait that a reconnect never ends the run.
        workers_run(config, summary_path, until_idle_s=3.0),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        closed = 0
        for threshold in (300, 1200):
            deadline = time.monotonic() + 30
            while len(handled(out)) < threshold and time.monotonic() < deadline:
                assert process.poll() is None, process.communicate()[1][-3000:]
                time.sleep(0.05)
            # Distinct values: messages redelivered after a close are handled twice.
            assert len(set(handled(out))) < n, "the run finished before the connection closed"
            closed += close_connections(f"esm-workers {name}#0")
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert_no_password(stderr)
    assert closed >= 2
    assert stderr.count("reconnected to") >= 2, stderr[-3000:]
    seen = handled(out)
    assert set(seen) == set(values)  # at least once, none lost
    summary = orjson.loads(summary_path.read_bytes())[name]
    assert summary["dead_lettered"] == 0 and summary["dropped"] == 0
    assert rabbit.ready(name) == 0
    assert queue_counts(name) == (0, 0)


def test_partial_batch_response_retries_only_the_reported_messages(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    name = unique_name("rmq-partial")
    rabbit.declare(name)
    values = [f"fail{i}" if i % 10 == 3 else f"ok{i}" for i in range(200)]
    rabbit.publish(name, [v.encode() for v in values])
    invocations = tmp_path / "invocations.jsonl"
    config = write_config(
        tmp_path / "config.yaml",
        name=name,
        handler="tests.handlers.rmq_handlers:report_failures",
        environment={"RMQ_INVOCATIONS": str(invocations)},
        isolation="thread",
        batch_size=50,
        maximum_batching_window_s=0.1,
        maximum_retry_attempts=2,
        function_response_types=["ReportBatchItemFailures"],
    )
    summary = run_workers(config, tmp_path / "summary.json")[name]

    calls = [orjson.loads(line) for line in invocations.read_text().splitlines()]
    first = [v for c in calls if c["attempt"] == 1 for v in c["values"]]
    again = [v for c in calls if c["attempt"] > 1 for v in c["values"]]
    assert sorted(first) == sorted(values)
    assert sorted(again) == sorted(v for v in values if v.startswith("fail"))
    assert summary["succeeded"] == len(values) and summary["dead_lettered"] == 0
    assert rabbit.ready(name) == 0


def test_workers_run_survives_a_broker_restart(
    private_rabbit: PrivateRabbit, tmp_path: Path
) -> None:
    """stop_app/start_app: the poller backs off while the broker is down, then reconnects. On a
    RabbitMQ node of the test's own: stopping the shared one would cut every other test."""
    node = private_rabbit
    rabbit = Rabbit(node.url)
    name = unique_name("rmq-restart")
    rabbit.declare(name)
    n = 1500
    values = [f"r{i}" for i in range(n)]
    rabbit.publish(name, [v.encode() for v in values])
    out = tmp_path / "handled.txt"
    config = write_config(
        tmp_path / "config.yaml",
        name=name,
        handler="tests.handlers.rmq_handlers:record_values",
        environment={"RMQ_OUT": str(out), "RMQ_SLEEP_S": "0.02"},
        isolation="thread",
        url=node.url,
        batch_size=25,
        maximum_batching_window_s=0.05,
        maximum_retry_attempts=10,
    )
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        workers_run(config, summary_path, until_idle_s=4.0),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(handled(out)) < 200 and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.05)
        assert len(handled(out)) < n, "the run finished before the broker stopped"
        try:
            node.ctl("stop_app")
            time.sleep(1.0)
        finally:
            node.ctl("start_app")
            node.ctl("await_startup")
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert "reconnected to" in stderr, stderr[-3000:]
    assert_no_password(stderr)
    assert set(handled(out)) == set(values)
    assert rabbit.ready(name) == 0
    assert queue_counts(name, node.ctl, vhost="/") == (0, 0)  # the node's default vhost


def test_validate_connect_probes_the_queue(rabbit: Rabbit, tmp_path: Path) -> None:
    name = unique_name("rmq-probe")
    rabbit.declare(name)
    config = write_config(
        tmp_path / "config.yaml",
        name=name,
        handler="tests.handlers.rmq_handlers:record_values",
        environment={},
        isolation="thread",
    )
    ok = subprocess.run(
        [sys.executable, "-m", "workers", "validate", str(config), "--connect"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    missing = config.read_text().replace(f"queue: {name}", "queue: no-such-queue-here")
    config.write_text(missing)
    bad = subprocess.run(
        [sys.executable, "-m", "workers", "validate", str(config), "--connect"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "no-such-queue-here" in bad.stderr and "does not exist" in bad.stderr
    assert_no_password(bad.stderr)
