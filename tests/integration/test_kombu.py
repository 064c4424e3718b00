"""The kombu connector: the contract suite over amqp:// (the local RabbitMQ, messages published by
pika), redis:// (the local Redis) and memory:// (no broker), raw messages read with their bodies
and properties intact, and `workers run` end to end with a Powertools SQS handler."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pika
import pytest
import redis
import yaml
from kombu.connection import Connection

from connectors.file.destination import read_letters
from connectors.kombu import config as kombu_cfg
from connectors.kombu.source import KombuConfigError, KombuSource, probe_kombu
from tests import cli
from tests.brokers import (
    rabbitmq_reachable,
    rabbitmq_url,
    redis_reachable,
    redis_url,
    require,
    unique_name,
)
from tests.contract import AckContract, RecordingListener, SourceContract, poll_n
from workers.app import config as cfg
from workers.app import registry
from workers.engine.ports import Destination, Source
from workers.events import records as event_records

AMQP_URL = rabbitmq_url()
REDIS_URL = redis_url()


# --- helpers -----------------------------------------------------------------------------------


def mapping_for(
    name: str,
    url: str,
    *,
    letters: Path | None = None,
    transport_options: dict[str, Any] | None = None,
) -> cfg.EventSourceMapping:
    data: dict[str, Any] = {
        "name": name,
        "function": "f",
        "source": {
            "type": "kombu",
            "url": url,
            "queue": name,
            "transport_options": transport_options or {},
        },
    }
    if letters is not None:
        data["destination_config"] = {"on_failure": {"type": "file", "path": str(letters)}}
    return cfg.EventSourceMapping.model_validate(data)


def body_of(item: dict[str, Any]) -> bytes:
    body = str(item["body"])
    if item["attributes"].get("bodyEncoding") == "base64":
        return base64.b64decode(body)
    return body.encode()


class Rabbit:
    """Short-lived pika connections: another client than kombu publishes the messages."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(AMQP_URL))

    def declare(self, name: str) -> None:
        connection = self.connect()
        try:
            connection.channel().queue_declare(name, durable=True)
        finally:
            connection.close()
        self.created.append(name)

    def publish(self, name: str, values: Sequence[bytes], **props: Any) -> None:
        connection = self.connect()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, timestamp=int(time.time()), **props)
            for value in values:
                channel.basic_publish("", name, value, properties)
        finally:
            connection.close()

    def counts(self, name: str) -> int:
        connection = self.connect()
        try:
            declared = connection.channel().queue_declare(name, passive=True)
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
        self.created.clear()


class KombuContract(SourceContract, AckContract):
    """The contract over one kombu transport; letters go to a file destination."""

    join_timeout_s = 5.0
    url: ClassVar[str]

    @pytest.fixture(autouse=True)
    def _letters(self, tmp_path: Path) -> None:
        self.letters = tmp_path / "letters"

    def options(self, name: str) -> dict[str, Any]:
        return {}

    def mapping(self, name: str, letters: bool = False) -> cfg.EventSourceMapping:
        return mapping_for(
            name,
            self.url,
            letters=self.letters if letters else None,
            transport_options=self.options(name),
        )

    def make_source(self, name: str) -> Source:
        return registry.open_source(self.mapping(name))

    def make_destination(self, name: str) -> Destination:
        destination = registry.open_destination(self.mapping(name, letters=True))
        assert destination is not None
        return destination

    def dead_letter_values(self, name: str) -> list[bytes]:
        path = self.letters / f"{name}.jsonl"
        if not path.exists():
            return []
        return [
            body_of(item) for letter in read_letters(path) for item in letter["payload"]["Records"]
        ]

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        return [body_of(item) for item in event["Records"]]


# --- amqp:// -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.rabbitmq
class TestKombuAmqpContract(KombuContract):
    url = AMQP_URL

    @pytest.fixture(autouse=True)
    def _rabbit(self) -> Iterator[None]:
        require("RabbitMQ", rabbitmq_reachable(AMQP_URL))
        self.rabbit = Rabbit()
        yield
        self.rabbit.delete_all()

    def fresh(self) -> str:
        name = super().fresh()
        self.rabbit.declare(name)
        return name

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        self.rabbit.publish(name, values)

    # --- raw messages of another client ---------------------------------------------------------

    def test_raw_messages_keep_their_bodies_and_properties(self) -> None:
        name = self.fresh()
        not_utf8 = b"\xff\xfe\x00binary"
        # A body kombu would alter: decoded by its content_encoding, decompressed by a
        # `compression` header, deserialised by its content_type.
        self.rabbit.publish(
            name,
            [not_utf8],
            content_type="application/octet-stream",
            content_encoding="utf-8",
            headers={"tenant": "acme", "n": 7, "flag": True, "raw": b"\xff", "nested": {"a": 1}},
            message_id="publisher-1",
            correlation_id="c-1",
            reply_to="replies",
            priority=3,
            app_id="billing",
            type="invoice",
        )
        # What kombu calls application/x-gzip is a zlib stream.
        compressed = zlib.compress(b'{"n": 1}')
        self.rabbit.publish(
            name,
            [compressed],
            content_type="application/json",
            headers={"compression": "application/x-gzip"},
        )
        latin = "café".encode("latin-1")
        self.rabbit.publish(name, [latin], content_type="text/plain", content_encoding="latin-1")
        self.rabbit.publish(name, ["☃ text".encode()], content_type="text/plain")
        source = self.make_source(name)
        source.open(RecordingListener())
        try:
            records = poll_n(source, 4, self.join_timeout_s)
            bodies = [not_utf8, compressed, latin, "☃ text".encode()]
            assert sorted(r.value for r in records) == sorted(bodies)
            event = orjson.loads(orjson.dumps(source.shape.event(records)))
            items = {body_of(item): item for item in event["Records"]}
            assert sorted(items) == sorted(bodies)
            second = items[not_utf8]
            assert second["body"] == base64.b64encode(not_utf8).decode()
            attributes = second["attributes"]
            assert attributes["bodyEncoding"] == "base64"
            assert attributes["contentType"] == "application/octet-stream"
            assert attributes["contentEncoding"] == "utf-8"
            assert attributes["deliveryMode"] == "2" and attributes["priority"] == "3"
            assert attributes["publisherMessageId"] == "publisher-1"
            assert attributes["correlationId"] == "c-1" and attributes["replyTo"] == "replies"
            assert attributes["appId"] == "billing" and attributes["type"] == "invoice"
            assert attributes["routingKey"] == name and attributes["redelivered"] == "false"
            assert attributes["ApproximateReceiveCount"] == "1"
            assert int(attributes["SentTimestamp"]) == int(attributes["timestamp"]) * 1000
            assert second["messageAttributes"]["tenant"] == {
                "stringValue": "acme",
                "stringListValues": [],
                "binaryListValues": [],
                "dataType": "String",
            }
            assert second["messageAttributes"]["n"]["dataType"] == "Number"
            assert second["messageAttributes"]["raw"]["binaryValue"] == "/w=="
            assert second["messageAttributes"]["nested"]["dataType"] == "String.Json"
            # Still compressed, with the header that says so.
            assert items[compressed]["attributes"]["bodyEncoding"] == "base64"
            assert items[compressed]["messageAttributes"]["compression"]["stringValue"] == (
                "application/x-gzip"
            )
            assert items[latin]["attributes"]["contentEncoding"] == "latin-1"
            text = items["☃ text".encode()]
            assert text["body"] == "☃ text" and "bodyEncoding" not in text["attributes"]
            for item in event["Records"]:
                assert item["eventSource"] == "kombu:amqp"
                assert item["eventSourceARN"].endswith(f":queue/{name}")
                assert item["awsRegion"] == "local" and item["md5OfBody"]
            assert len({item["messageId"] for item in event["Records"]}) == 4
            # A handler reading the event with workers.events sees what the engine saw.
            back = {r.value: r for r in event_records(event)}
            engine = {r.value: r for r in records}
            assert back[not_utf8].headers == list(engine[not_utf8].headers)
            assert ("raw", b"\xff") in back[not_utf8].headers
            assert back[not_utf8].timestamp_ms == engine[not_utf8].timestamp_ms
            source.ack(records)
        finally:
            source.close()
        assert self.rabbit.counts(name) == 0

    def test_missing_queue_is_a_clear_error(self) -> None:
        name = unique_name("kombu-missing")
        source = self.make_source(name)
        with pytest.raises(KombuConfigError, match=name):
            source.open(RecordingListener())
        source.close()
        src = self.mapping(name).source
        assert isinstance(src, kombu_cfg.KombuSource)
        with pytest.raises(KombuConfigError):
            probe_kombu(src)

    def test_acks_of_a_lost_connection_are_dropped(self) -> None:
        name = self.fresh()
        self.rabbit.publish(name, [b"a", b"b"])
        source = self.make_source(name)
        assert isinstance(source, KombuSource)
        listener = RecordingListener()
        source.open(listener)
        try:
            old = poll_n(source, 2, self.join_timeout_s)
            source._drop(ConnectionError("test"))  # as after a lost connection
            assert listener.revoked == {name}
            source.ack(old)
            assert source.dropped_acks == 2
            again = poll_n(source, 2, self.join_timeout_s)
            assert sorted(r.value for r in again) == [b"a", b"b"]
            assert all(r.redelivered and r.attempts == 1 for r in again)
            source.ack(again)
        finally:
            source.close()


# --- redis:// ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.redis
class TestKombuRedisContract(KombuContract):
    url = REDIS_URL

    @pytest.fixture(autouse=True)
    def _redis(self) -> Iterator[None]:
        require("Redis", redis_reachable(REDIS_URL))
        self.prefixes: list[str] = []
        yield
        # Every key of a test is under its prefix; the database is shared, never flushed.
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for prefix in self.prefixes:
                keys = list(client.scan_iter(match=f"{prefix}*"))
                if keys:
                    client.delete(*keys)
        finally:
            client.close()

    def fresh(self) -> str:
        name = super().fresh()
        self.prefixes.append(f"{name}:")
        return name

    def options(self, name: str) -> dict[str, Any]:
        # The queue, kombu's unacked hash and its index under the test's own prefix.
        return {"global_keyprefix": f"{name}:"}

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        self.publish(name, values)

    def publish(self, name: str, values: Sequence[Any], **options: Any) -> None:
        with Connection(REDIS_URL, transport_options=self.options(name)) as connection:
            producer = connection.Producer()
            for value in values:
                producer.publish(value, routing_key=name, **options)

    def test_kombu_serialised_messages_are_read_raw(self) -> None:
        name = self.fresh()
        self.publish(
            name,
            [{"order": 1}],
            serializer="json",
            headers={"tenant": "acme"},
            correlation_id="c-9",
        )
        self.publish(name, [b"\x80\x81"])
        source = self.make_source(name)
        source.open(RecordingListener())
        try:
            records = poll_n(source, 2, self.join_timeout_s)
            event = source.shape.event(records)
            items = {body_of(item): item for item in event["Records"]}
            assert set(items) == {b'{"order": 1}', b"\x80\x81"}
            as_json = items[b'{"order": 1}']
            assert as_json["body"] == '{"order": 1}'
            assert as_json["attributes"]["contentType"] == "application/json"
            assert as_json["attributes"]["correlationId"] == "c-9"
            assert as_json["messageAttributes"]["tenant"]["stringValue"] == "acme"
            assert as_json["eventSource"] == "kombu:redis"
            assert items[b"\x80\x81"]["attributes"]["bodyEncoding"] == "base64"
            source.ack(records)
        finally:
            source.close()

    def test_a_restored_message_has_no_header_kombu_added(self) -> None:
        name = self.fresh()
        self.publish(name, [b"once"], headers={"tenant": "acme"})
        source = self.make_source(name)
        source.open(RecordingListener())
        try:
            poll_n(source, 1, self.join_timeout_s)
        finally:
            source.close()  # unacked: kombu restores it to the queue
        source = self.make_source(name)
        source.open(RecordingListener())
        try:
            (record,) = poll_n(source, 1, self.join_timeout_s)
            assert record.redelivered and record.attempts == 1
            assert [name for name, _ in record.headers] == ["tenant"]
            source.ack([record])
        finally:
            source.close()


# --- memory:// ---------------------------------------------------------------------------------


class TestKombuMemoryContract(KombuContract):
    """kombu's in-process transport: the contract without a broker. It does not restore unacked
    messages when its channel closes; the source puts them back itself."""

    url = "memory://"

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        with Connection(self.url) as connection:
            producer = connection.Producer()
            for value in values:
                producer.publish(value, routing_key=name)


# --- workers run -------------------------------------------------------------------------------


def workers(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=cli.REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.integration
@pytest.mark.rabbitmq
def test_workers_run_dead_letters_the_records_a_handler_fails(tmp_path: Path) -> None:
    require("RabbitMQ", rabbitmq_reachable(AMQP_URL))
    rabbit = Rabbit()
    name = unique_name("kombu-run")
    rabbit.declare(name)
    try:
        n = 120
        values = [f"m{i}" for i in range(n)]
        failing = {"m13", "m77"}
        rabbit.publish(name, [v.encode() for v in values])
        out = tmp_path / "handled.txt"
        letters = tmp_path / "letters"
        mapping: dict[str, Any] = {
            "name": name,
            "function": "fn",
            "source": {"type": "kombu", "url": AMQP_URL, "queue": name},
            "batch_size": 20,
            "maximum_batching_window_s": 0.1,
            "maximum_retry_attempts": 1,
            "function_response_types": ["ReportBatchItemFailures"],
            "destination_config": {"on_failure": {"type": "file", "path": str(letters)}},
        }
        function: dict[str, Any] = {
            "handler": "tests.handlers.kombu_handlers:partial",
            "timeout_s": 10,
            "concurrency": 2,
            "environment": {"KOMBU_OUT": str(out), "KOMBU_FAIL": ",".join(sorted(failing))},
        }
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump({"functions": {"fn": function}, "event_source_mappings": [mapping]})
        )
        summary = cli.run_workers(config, tmp_path / "summary.json")[name]

        handled = out.read_text().split()
        assert sorted(handled) == sorted(v for v in values if v not in failing)  # each once
        dead = list(read_letters(letters / f"{name}.jsonl"))
        assert sorted(body_of(i).decode() for d in dead for i in d["payload"]["Records"]) == sorted(
            failing
        )
        for letter in dead:
            assert letter["requestContext"]["condition"] == "RetryAttemptsExhausted"
            info = letter["KombuBatchInfo"]
            assert info["transport"] == "amqp" and info["queues"][name]["messageIds"]
        assert summary["dead_lettered"] == len(failing)
        assert rabbit.counts(name) == 0

        # The letters read back: listed, then replayed to a handler that no longer fails them.
        listed = workers("dlq", "list", str(config), name)
        assert listed.count("RetryAttemptsExhausted") == len(dead), listed
        function["environment"]["KOMBU_FAIL"] = ""
        config.write_text(
            yaml.safe_dump({"functions": {"fn": function}, "event_source_mappings": [mapping]})
        )
        workers("dlq", "replay", str(config), name)
        assert sorted(out.read_text().split()) == sorted(values)
    finally:
        rabbit.delete_all()
