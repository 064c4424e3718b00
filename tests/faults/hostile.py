"""Fixtures and functions of the hostile-record and hostile-handler scenarios: a mapping file with
a `file` destination, `workers run --until-idle` in a subprocess that cannot hang the suite,
producers for each broker, and what the run left behind (journal, letters) as record refs.

Records are counted by reference rather than payload (see `handlers.refs`): Kafka
"topic-partition@offset", Redis "stream@id", RabbitMQ the `messageId` property, SQS the
`MessageId` SQS gave the message, so a record whose
payload is not JSON, empty or absent still has an identity in the handler's journal and in its
dead letter.
"""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest
import redis
import yaml

from tests.brokers import KAFKA_TEST_SESSION, unique_name
from tests.cli import REPO, workers_run
from tests.faults.handlers import EVENTS_ENV, JOURNAL_ENV, items_by_ref, refs
from tests.faults.results import Tally, file_letters, letter_ids, read_journal

# A short session: Tansu joins a member after half of it (tests/brokers.py).
KAFKA_CLIENT_CONFIG: dict[str, Any] = dict(KAFKA_TEST_SESSION)
# Seconds of quiet before `--until-idle` ends a run: short, since the suite waits for each run.
UNTIL_IDLE_S = 1.0
# A hang must fail its test, never block the suite.
RUN_TIMEOUT_S = 120.0


@dataclass
class FaultRun:
    """What one `workers run --until-idle` left behind."""

    returncode: int | None  # None: it did not end within its timeout and was killed
    stderr: str
    elapsed_s: float
    summary: dict[str, Any]
    handled: list[str]  # refs the handler journaled, once per successful invocation
    letters: list[dict[str, Any]]
    mapping: str
    events_path: Path
    letters_before: int = 0  # letters the destination held before this run (an earlier run's)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def counters(self) -> dict[str, Any]:
        found: dict[str, Any] = self.summary.get(self.mapping, {})
        return found

    def items(self) -> dict[str, dict[str, Any]]:
        """ref -> the record's item as the handler was given it (its last invocation, with
        `recording_refs`) or, for a record without one, as its letter carries it."""
        out: dict[str, dict[str, Any]] = {}
        for letter in self.letters:
            if isinstance(letter.get("payload"), dict):
                out.update(items_by_ref(letter["payload"]))
        if self.events_path.exists():
            for line in self.events_path.read_bytes().splitlines():
                out.update(items_by_ref(orjson.loads(line)))
        return out

    def dead_lettered(self) -> list[str]:
        return letter_refs(self.letters)

    def records_in_new_letters(self) -> int:
        """Records in the letters this run wrote, by each letter's batch info."""
        names = ("KafkaBatchInfo", "RedisStreamBatchInfo", "RabbitMQBatchInfo", "SQSBatchInfo")
        return sum(
            int(letter.get(name, {}).get("batchSize", 0))
            for letter in self.letters[self.letters_before :]
            for name in names
        )

    def dead_lettered_ids(self) -> list[str]:
        """The JSON payload ids of the records the letters carry (runs of `hostile`)."""
        return letter_ids(self.letters)

    def conditions(self) -> dict[str, str]:
        """ref -> the condition of the letter that carries it."""
        out: dict[str, str] = {}
        for letter in self.letters:
            condition = letter.get("requestContext", {}).get("condition", "")
            for ref in letter_refs([letter]):
                out[ref] = condition
        return out

    def assert_ended_cleanly(self) -> None:
        assert not self.timed_out, f"workers run hung; log tail:\n{self.stderr[-3000:]}"
        assert self.returncode == 0, f"exit {self.returncode}; log tail:\n{self.stderr[-3000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]


def letter_refs(letters: Sequence[dict[str, Any]]) -> list[str]:
    """Refs of the records the letters carry: from the payload, or, for a letter whose payload
    was omitted (too large for any letter), from the coordinates in its batch info."""
    out: list[str] = []
    for letter in letters:
        payload = letter.get("payload")
        if isinstance(payload, dict) and not letter.get("payloadOmitted"):
            out += refs(payload)
            continue
        kafka = letter.get("KafkaBatchInfo", {}).get("recordsInfo", {})
        for unit, info in kafka.items():
            first, last = int(info["firstRecordOffset"]), int(info["lastRecordOffset"])
            out += [f"{unit}@{offset}" for offset in range(first, last + 1)]
        streams = letter.get("RedisStreamBatchInfo", {}).get("streams", {})
        for stream, info in streams.items():
            out += sorted({f"{stream}@{info['firstId']}", f"{stream}@{info['lastId']}"})
        queues = letter.get("RabbitMQBatchInfo", {}).get("queues", {})
        for info in queues.values():
            out += [str(i) for i in info.get("messageIds", [])]
        sqs = letter.get("SQSBatchInfo", {})
        if sqs:
            out += sorted({str(sqs["firstMessageId"]), str(sqs["lastMessageId"])})
    return out


def write_config(
    path: Path,
    *,
    name: str,
    source: Mapping[str, Any],
    handler: str,
    letters_dir: Path,
    journal: Path,
    function: Mapping[str, Any] | None = None,
    environment: Mapping[str, str] | None = None,
    **mapping: Any,
) -> Path:
    config = {
        "functions": {
            "f": {
                "handler": handler,
                "timeout_s": 5,
                "environment": {JOURNAL_ENV: str(journal), **(environment or {})},
                **(function or {}),
            }
        },
        "event_source_mappings": [
            {
                "name": name,
                "function": "f",
                "source": dict(source),
                "maximum_batching_window_s": 0.05,
                "bisect_batch_on_function_error": True,
                "maximum_retry_attempts": 0,
                "function_response_types": ["ReportBatchItemFailures"],
                "destination_config": {"on_failure": {"type": "file", "path": str(letters_dir)}},
                **mapping,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_mapping(
    tmp_path: Path,
    *,
    name: str,
    source: Mapping[str, Any],
    handler: str = "tests.faults.handlers:recording_refs",
    timeout_s: float = RUN_TIMEOUT_S,
    file_size_limit: int | None = None,
    keep_events: bool = False,
    **options: Any,
) -> FaultRun:
    """Write a one-mapping file, run it until idle (killed after `timeout_s`), read back.

    `file_size_limit` caps every file the run writes (RLIMIT_FSIZE): a write that would grow a
    file past it writes what fits and then fails, as on a full disk. Python ignores SIGXFSZ, so
    the write returns a short count or raises OSError(EFBIG) instead of killing the process.
    With `keep_events`, `recording_refs` keeps every event it is given (see `FaultRun.items`).
    """
    work = tmp_path / name
    work.mkdir(parents=True, exist_ok=True)
    journal, letters_dir, summary = work / "journal", work / "letters", work / "summary.json"
    events = work / "events.jsonl"
    if keep_events:
        options["environment"] = {**options.get("environment", {}), EVENTS_ENV: str(events)}
    config = write_config(
        work / "mappings.yaml",
        name=name,
        source=source,
        handler=handler,
        letters_dir=letters_dir,
        journal=journal,
        **options,
    )
    letters_before = len(file_letters(letters_dir, name))
    started = time.monotonic()
    proc = subprocess.Popen(
        workers_run(config, summary, UNTIL_IDLE_S),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A handler may write any bytes to its output, which the run passes through.
        errors="replace",
        # Its own process group: a hang is ended with its pollers and environments, not only
        # the supervisor (whose pollers could outlive it).
        start_new_session=True,
        preexec_fn=None if file_size_limit is None else partial(_limit_files, file_size_limit),
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        returncode = None
    elapsed_s = time.monotonic() - started
    return FaultRun(
        returncode=returncode,
        stderr=stderr,
        elapsed_s=elapsed_s,
        summary=orjson.loads(summary.read_bytes()) if summary.exists() else {},
        handled=read_journal(journal),
        letters=file_letters(letters_dir, name),
        mapping=name,
        events_path=events,
        letters_before=letters_before,
    )


def _limit_files(size: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


# --- what the handler was given -----------------------------------------------------------------


def kafka_item_bytes(item: dict[str, Any]) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """(value, key, headers) of a Kafka event item, as bytes."""
    key = None if item.get("key") is None else base64.b64decode(item["key"])
    headers = [(name, bytes(data)) for h in item["headers"] for name, data in h.items()]
    return base64.b64decode(item["value"]), key, headers


def field_name_bytes(name: str) -> bytes:
    """A field name of a Redis event as the bytes Redis holds: issue 12 writes a name that is
    not UTF-8 as "b64:" and the base64 of its bytes."""
    if name.startswith("b64:"):
        return base64.b64decode(name[4:])
    return name.encode()


def redis_item_fields(item: dict[str, Any]) -> dict[bytes, bytes]:
    return {field_name_bytes(k): base64.b64decode(v) for k, v in item["fields"].items()}


def as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


# --- counting ---------------------------------------------------------------------------------


def good(n: int) -> bytes:
    return orjson.dumps({"id": n, "ok": True})


def poison(n: int) -> bytes:
    """A record the `hostile` handler fails on, so that it is dead-lettered."""
    return orjson.dumps({"id": n, "act": "raise"})


def tally_refs(scenario: str, broker: str, produced: list[str], run: FaultRun) -> Tally:
    """A tally by record reference (see `handlers.refs`), for runs of `recording_refs`."""
    return Tally(
        scenario,
        broker,
        produced,
        run.handled,
        run.dead_lettered(),
        recovery_s=run.elapsed_s,
        extra={"exit": run.returncode},
    )


def tally_ids(scenario: str, broker: str, produced: int, run: FaultRun) -> Tally:
    """A tally by the ids in JSON payloads (ids 0..produced-1), for runs of `hostile`."""
    return Tally(
        scenario,
        broker,
        [str(i) for i in range(produced)],
        run.handled,
        letter_ids(run.letters),
        recovery_s=run.elapsed_s,
        extra={"exit": run.returncode},
    )


# The recovery time of these scenarios is the whole run: from `workers run` starting on the
# produced records to it exiting with all of them settled.


def check_run(
    result: Tally,
    run: FaultRun,
    *,
    key_of: dict[str, str] | None = None,
    max_duplicates: int = 0,
) -> None:
    run.assert_ended_cleanly()
    result.check(key_of=key_of, max_duplicates=max_duplicates)
    # A destination is configured, so nothing may be dropped, and the run's own count of
    # letters must match what the destination holds (a torn or lost letter shows here).
    assert run.counters.get("dropped") == 0, run.counters
    assert run.counters.get("dead_lettered") == run.records_in_new_letters(), run.counters
    # A record is either handled or dead-lettered, never both (that would be a duplicate).
    both = set(result.handled) & set(result.dead_lettered)
    assert not both, f"handled and dead-lettered: {sorted(both)[:10]}"


# --- brokers -------------------------------------------------------------------------------------


def kafka_source(bootstrap: str, topic: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "kafka",
        "bootstrap_servers": bootstrap,
        "topics": [topic],
        "client_config": {**KAFKA_CLIENT_CONFIG, **extra.pop("client_config", {})},
        **extra,
    }


def redis_source(url: str, stream: str, **extra: Any) -> dict[str, Any]:
    return {"type": "redis", "url": url, "streams": [stream], **extra}


def rabbitmq_source(url: str, queue: str, **extra: Any) -> dict[str, Any]:
    return {"type": "rabbitmq", "url": url, "queue": queue, **extra}


def sqs_source(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "sqs", "queue_url": url, **extra}


def kafka_ref(topic: str, partition: int, offset: int) -> str:
    return f"{topic}-{partition}@{offset}"


def xadd(client: redis.Redis, stream: str, entries: Sequence[Any]) -> list[str]:
    """XADD each entry (a fields dict, or (id, fields) for an explicit id); their refs."""
    pipe = client.pipeline(transaction=False)
    for entry in entries:
        if isinstance(entry, tuple):
            pipe.xadd(stream, entry[1], id=entry[0])
        else:
            pipe.xadd(stream, entry)
    return [f"{stream}@{entry_id.decode()}" for entry_id in pipe.execute()]


@dataclass
class Message:
    """One RabbitMQ message to publish; its ref is `message_id`."""

    message_id: str
    body: bytes
    headers: dict[str, Any] | None = None
    timestamp: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RabbitQueues:
    """Queues for one test, published to with confirms and deleted afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    def declare(self, name: str) -> str:
        connection = self.connect()
        try:
            connection.channel().queue_declare(name, durable=True)
        finally:
            connection.close()
        self.created.append(name)
        return name

    def publish(self, queue: str, messages: Sequence[Message]) -> list[str]:
        connection = self.connect()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for m in messages:
                props = pika.BasicProperties(
                    delivery_mode=2,
                    message_id=m.message_id,
                    headers=m.headers,
                    timestamp=int(time.time()) if m.timestamp is None else m.timestamp,
                    **m.extra,
                )
                channel.basic_publish("", queue, m.body, props)
        finally:
            connection.close()
        return [m.message_id for m in messages]

    def ready(self, queue: str) -> int:
        connection = self.connect()
        try:
            declared = connection.channel().queue_declare(queue, passive=True)
            count: int = declared.method.message_count
            return count
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


@dataclass
class SQSMessage:
    """One SQS message to send; its ref is the MessageId SQS gives it."""

    body: str
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)


class SQSQueues:
    """Queues on the test session's moto server for one test, deleted afterwards."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.client = server.client()
        self.created: list[str] = []

    def create(self, name: str, **attributes: str) -> str:
        url: str = self.server.create_queue(name, **attributes)
        self.created.append(url)
        return url

    def send(self, url: str, messages: Sequence[SQSMessage]) -> list[str]:
        """One SendMessage each (a batch holds 1 MiB at most); their MessageIds, in order."""
        ids = []
        for m in messages:
            request: dict[str, Any] = {"QueueUrl": url, "MessageBody": m.body}
            if m.attributes:
                request["MessageAttributes"] = m.attributes
            ids.append(str(self.client.send_message(**request)["MessageId"]))
        return ids

    def left(self, url: str) -> dict[str, str]:
        """What the queue still holds: visible, in flight and delayed counts."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        names.append("ApproximateNumberOfMessagesDelayed")
        reply = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=names)
        return dict(reply["Attributes"])

    def delete_all(self) -> None:
        for url in self.created:
            with contextlib.suppress(Exception):
                self.client.delete_queue(QueueUrl=url)


@pytest.fixture
def sqs(sqs_server: Any) -> Iterator[SQSQueues]:
    queues = SQSQueues(sqs_server)
    try:
        yield queues
    finally:
        queues.delete_all()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def stream(redis_client: redis.Redis) -> Iterator[str]:
    """A stream name no other test uses, deleted afterwards (never the shared server's data)."""
    name = unique_name("hostile")
    try:
        yield name
    finally:
        redis_client.delete(name)


@pytest.fixture
def rabbit(rabbitmq_url: str) -> Iterator[RabbitQueues]:
    queues = RabbitQueues(rabbitmq_url)
    try:
        yield queues
    finally:
        queues.delete_all()
