"""Steady load for fault scenarios: a producer thread per broker that writes records with known ids
durably, a `workers run` subprocess to kill or drain, and the readers that say what became of
each id (the handler's journal, dead letters in a private Redis stream).

Records are JSON `{"id": "<prefix>-<n>", "k": "k<n % keys>"}` (plus `"poison": true` for every
`poison_every`-th); on Redis the same names are the entry's fields, so the handler sees the same
JSON object. A record counts as produced once the broker confirmed it durable (Kafka acks=all,
RabbitMQ publisher confirms on persistent messages, Redis XADD on an fsync-always server).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from tests.faults.handlers import JOURNAL_ENV
from tests.faults.results import REPO, read_journal

if TYPE_CHECKING:
    from confluent_kafka import Producer


@dataclass(frozen=True)
class Item:
    id: str
    key: str
    poison: bool

    def doc(self) -> dict[str, Any]:
        return {"id": self.id, "k": self.key, **({"poison": True} if self.poison else {})}


class Sender:
    """Writes one record durably, retrying through outages. Kafka and Redis senders also note
    where each id landed (`where`: partition and offset, or entry id)."""

    def __init__(self) -> None:
        # Confirmed ids, in confirmation order (per key, the order the source holds them).
        self.confirmed: list[str] = []
        # Ids sent again after a connection loss left their first attempt unconfirmed: the
        # source may hold them twice, so they may be handled twice without the worker at fault.
        self.resent: set[str] = set()

    def send(self, item: Item) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        """Serve delivery reports (Kafka)."""

    def finish(self, timeout_s: float) -> None:
        """Wait until everything sent is confirmed."""

    def close(self) -> None:
        pass


class Load(threading.Thread):
    """Produces `count` records at `rate_per_s`, steadily, through `sender`."""

    def __init__(
        self,
        sender: Sender,
        prefix: str,
        count: int,
        rate_per_s: float,
        *,
        keys: int = 8,
        poison_every: int = 0,
    ) -> None:
        super().__init__(name=f"load-{prefix}", daemon=True)
        self.sender = sender
        self.items = [
            Item(f"{prefix}-{n}", f"k{n % keys}", poison_every > 0 and n % poison_every == 7)
            for n in range(count)
        ]
        self.key_of = {item.id: item.key for item in self.items}
        self.rate_per_s = rate_per_s
        self.produced = sender.confirmed
        self.resent = sender.resent
        self.error: BaseException | None = None
        self.done = threading.Event()

    @property
    def poison(self) -> list[str]:
        return [i.id for i in self.items if i.poison]

    def run(self) -> None:
        started = time.monotonic()
        try:
            for n, item in enumerate(self.items):
                # Pacing only: a late record (after an outage) is sent at once, then the rate
                # resumes.
                delay = started + n / self.rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.sender.send(item)
                self.sender.poll()
            self.sender.finish(180.0)
        except BaseException as exc:  # reported by wait()
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout_s: float = 180.0) -> list[str]:
        """Wait for the whole load to be confirmed; returns the produced ids."""
        assert self.done.wait(timeout_s), f"the load did not finish within {timeout_s}s"
        if self.error is not None:
            raise self.error
        assert len(self.produced) == len(self.items), (
            f"{len(self.produced)}/{len(self.items)} confirmed"
        )
        return list(self.produced)

    def reached(self, fraction: float) -> bool:
        return len(self.produced) >= fraction * len(self.items)


# --- senders --------------------------------------------------------------------------------------


class KafkaSender(Sender):
    """acks=all, idempotent, and patient: a cut or frozen link delays records, never fails them."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Producer

        super().__init__()
        self.topic = topic
        self.where: dict[str, tuple[int, int]] = {}
        self.failed: list[str] = []
        self._producer: Producer | None = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 240_000,
            }
        )

    @property
    def producer(self) -> Producer:
        assert self._producer is not None, "the sender is closed"
        return self._producer

    def send(self, item: Item) -> None:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                self.failed.append(item.id)
                return
            self.where[item.id] = (msg.partition(), msg.offset())
            self.confirmed.append(item.id)

        while True:
            try:
                self.producer.produce(
                    self.topic,
                    orjson.dumps(item.doc()),
                    key=item.key.encode(),
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                self.producer.poll(0.1)

    def poll(self) -> None:
        self.producer.poll(0)

    def finish(self, timeout_s: float) -> None:
        remaining = self.producer.flush(timeout_s)
        assert remaining == 0 and not self.failed, f"unconfirmed {remaining}, failed {self.failed}"

    def close(self) -> None:
        # Dropping the producer closes its connections, so a broker stopping after the test
        # need not wait for them.
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None


class RedisSender(Sender):
    """XADD with an explicit, increasing entry id, so a retry after a lost reply cannot write the
    entry twice: Redis refuses an id not above the last one, which means the first try landed."""

    def __init__(self, url: str, stream: str, deadline_s: float = 120.0) -> None:
        import redis

        super().__init__()
        self.url = url
        self.stream = stream
        self.deadline_s = deadline_s
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.where: dict[str, str] = {}
        self._last_ms = 0

    def send(self, item: Item) -> None:
        import redis

        self._last_ms = max(self._last_ms, int(time.time() * 1000))
        entry_id = f"{self._last_ms}-{item.id.rsplit('-', 1)[1]}"
        fields: dict[Any, Any] = {
            k: orjson.dumps(v) if isinstance(v, bool) else v for k, v in item.doc().items()
        }
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                self.client.xadd(self.stream, fields, id=entry_id)
                break
            except redis.ResponseError as exc:
                if "equal or smaller" not in str(exc):
                    raise
                break  # the earlier attempt was written before its reply was lost
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.where[item.id] = entry_id
        self.confirmed.append(item.id)

    def close(self) -> None:
        self.client.close()


class RabbitSender(Sender):
    """Persistent messages with publisher confirms; after a lost connection the unconfirmed
    message is published again (and noted in `resent`)."""

    def __init__(self, url: str, queue: str, deadline_s: float = 180.0) -> None:
        super().__init__()
        self.url = url
        self.queue = queue
        self.deadline_s = deadline_s
        self.connection: Any = None
        self.channel: Any = None

    def _open(self) -> None:
        import pika

        params = pika.URLParameters(self.url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def send(self, item: Item) -> None:
        import pika
        import pika.exceptions

        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        deadline = time.monotonic() + self.deadline_s
        attempts = 0
        while True:
            try:
                if self.channel is None:
                    self._open()
                attempts += 1
                self.channel.basic_publish(
                    "", self.queue, orjson.dumps(item.doc()), properties, mandatory=True
                )
                break
            except (pika.exceptions.AMQPError, OSError):
                self._drop()
                if attempts:
                    self.resent.add(item.id)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.confirmed.append(item.id)

    def _drop(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        self._drop()


# --- the worker -----------------------------------------------------------------------------------


class SQSSender(Sender):
    """SendMessage, confirmed by its reply; on a FIFO queue the key is the MessageGroupId and
    the id the MessageDeduplicationId, so a message sent again after a lost reply is stored
    once."""

    def __init__(self, client: Any, queue_url: str, deadline_s: float = 180.0) -> None:
        super().__init__()
        self.client = client
        self.queue_url = queue_url
        self.fifo = queue_url.endswith(".fifo")
        self.deadline_s = deadline_s

    def send(self, item: Item) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        request: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": orjson.dumps(item.doc()).decode(),
        }
        if self.fifo:
            request["MessageGroupId"] = item.key
            request["MessageDeduplicationId"] = item.id
        deadline = time.monotonic() + self.deadline_s
        attempts = 0
        while True:
            try:
                attempts += 1
                self.client.send_message(**request)
                break
            except (BotoCoreError, ClientError):
                if not self.fifo:
                    self.resent.add(item.id)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.confirmed.append(item.id)


def write_config(
    path: Path,
    *,
    name: str,
    source: dict[str, Any],
    journal: Path,
    handler: str = "tests.faults.handlers:recording",
    environment: dict[str, str] | None = None,
    timeout_s: float = 10,
    **mapping: Any,
) -> Path:
    """One function and one mapping named `name` reading `source`."""
    if source.get("type") == "kafka":
        source = {"client_config": dict(KAFKA_CLIENT_CONFIG), **source}
    config = {
        "functions": {
            "f": {
                "handler": handler,
                "timeout_s": timeout_s,
                "concurrency": 4,
                "environment": {JOURNAL_ENV: str(journal), **(environment or {})},
            }
        },
        "event_source_mappings": [
            {
                "name": name,
                "function": "f",
                "source": source,
                "batch_size": 20,
                "maximum_batching_window_s": 0.05,
                **mapping,  # overrides the defaults above
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# A session short enough that a group joins in seconds on Tansu (see tests/brokers.py), yet
# longer than the 3 s outages of the broker faults, which a group must be able to outlast.
KAFKA_CLIENT_CONFIG = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


class Worker:
    """`workers run CONFIG` in a process group of its own (supervisor, pollers, environments)."""

    def __init__(self, config: Path, log: Path, *, until_idle_s: float | None = None) -> None:
        command = [sys.executable, "-m", "workers", "run", str(config)]
        if until_idle_s is not None:
            command += ["--until-idle", str(until_idle_s)]
        self.log = log
        self.started = time.monotonic()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill9(self) -> None:
        """SIGKILL to the whole process group, as an OOM killer or a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> None:
        """SIGTERM to the supervisor alone, as Kubernetes or systemd stopping the main pid."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            message = f"workers run still running after {timeout_s}s:\n{self.tail()}"
            raise AssertionError(message) from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def close(self) -> None:
        if self.alive():
            self.kill9()


# --- readers --------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def journals(*paths: Path) -> list[str]:
    """Ids completed by the handler, over several runs' journals in run order."""
    return [i for path in paths for i in read_journal(path)]


def redis_letter_ids(url: str, stream: str) -> list[str]:
    """Ids carried by the letters in a `redis` destination's stream."""
    import redis

    from tests.faults.results import letter_ids

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        rows: Any = client.xrange(stream)
    finally:
        client.close()
    return letter_ids(orjson.loads(fields[b"letter"]) for _, fields in rows)
