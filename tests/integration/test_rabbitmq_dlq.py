"""`workers dlq list/show/replay` on a RabbitMQ dead-letter queue, through the command line on the
real broker; and the dead-letter store and source publisher behind them."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pika
import pytest
import yaml

from connectors.rabbitmq import config as rabbitmq_cfg
from connectors.rabbitmq.connection import DeliveryRefused, RabbitMQConfigError
from connectors.rabbitmq.publisher import RabbitMQSourcePublisher, replay_properties
from connectors.rabbitmq.shape import RabbitMeta, header_json, header_value
from connectors.rabbitmq.store import LetterNotSettled, RabbitMQDeadLetterStore
from tests.brokers import rabbitmq_reachable, rabbitmq_url, require, unique_name
from tests.cli import interrupted_replay
from workers.app import config as cfg
from workers.engine.ports import StoredLetter
from workers.engine.records import Record

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

REPO = Path(__file__).resolve().parents[2]
URL = rabbitmq_url()
VHOST = "/" if urlsplit(URL).path in ("", "/") else unquote(urlsplit(URL).path[1:])


@pytest.fixture(scope="module", autouse=True)
def _rabbitmq_up() -> None:
    require("RabbitMQ", rabbitmq_reachable(URL))


# --- broker helpers ----------------------------------------------------------------------------


class Queues:
    """Declares this test's queues (deleted afterwards), publishes and counts."""

    def __init__(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.created: list[str] = []

    def declare(self, name: str) -> str:
        self.channel.queue_declare(name, durable=True)
        self.created.append(name)
        return name

    def publish(self, name: str, bodies: Sequence[bytes], **props: Any) -> None:
        for i, body in enumerate(bodies):
            properties = pika.BasicProperties(
                delivery_mode=2, timestamp=int(time.time()), message_id=f"m-{i}", **props
            )
            self.channel.basic_publish("", name, body, properties)

    def ready(self, name: str) -> int:
        count: int = self.channel.queue_declare(name, passive=True).method.message_count
        return count

    def close(self) -> None:
        for name in self.created:
            self.channel.queue_delete(name)
        self.connection.close()


@pytest.fixture
def queues() -> Iterator[Queues]:
    admin = Queues()
    yield admin
    admin.close()


# --- the command line --------------------------------------------------------------------------


class Setup:
    def __init__(self, tmp_path: Path, queues: Queues, poison: Sequence[str]) -> None:
        self.queue = queues.declare(unique_name("rmq-dlq"))
        self.dlq = queues.declare(f"{self.queue}.dlq")
        self.out = tmp_path / "handled.jsonl"
        self.fixed = tmp_path / "fixed"
        self.config = tmp_path / "mappings.yaml"
        function = {
            "handler": "tests.handlers.rmq_replay_handlers:picky",
            "isolation": "thread",
            "timeout_s": 10,
            "environment": {
                "RR_OUT": str(self.out),
                "RR_FIXED": str(self.fixed),
                "RR_POISON": ",".join(poison),
            },
        }
        mapping = {
            "name": self.queue,
            "function": "fn",
            "source": {"type": "rabbitmq", "url": URL, "queue": self.queue},
            "batch_size": 10,
            "maximum_batching_window_s": 0.1,
            "bisect_batch_on_function_error": True,
            "maximum_retry_attempts": 0,
            "destination_config": {
                "on_failure": {"type": "rabbitmq", "url": URL, "routing_key": self.dlq}
            },
        }
        config = {"functions": {"fn": function}, "event_source_mappings": [mapping]}
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def run(self) -> dict[str, Any]:
        summary = self.config.parent / "summary.json"
        done = self.cli(
            "run", str(self.config), "--until-idle", "1", "--summary-json", str(summary)
        )
        assert done.returncode == 0, done.stderr[-3000:]
        counts: dict[str, Any] = orjson.loads(summary.read_bytes())[self.queue]
        return counts

    def pending(self) -> list[dict[str, Any]]:
        done = self.cli("dlq", "list", str(self.config), self.queue, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        return [orjson.loads(line) for line in done.stdout.splitlines()]

    def replay(self, *extra: str) -> dict[str, Any]:
        done = self.cli("dlq", "replay", str(self.config), self.queue, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        summary: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
        return summary

    def handled(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [orjson.loads(line) for line in self.out.read_bytes().splitlines()]

    def handled_values(self) -> list[str]:
        return sorted(h["value"] for h in self.handled())

    def dead_letter(self, queues: Queues, values: Sequence[str], **props: Any) -> None:
        """Publish `values`, run until idle: the poison ones end up in the dead-letter queue."""
        queues.publish(self.queue, [v.encode() for v in values], **props)
        counts = self.run()
        poison = [v for v in values if v not in self.handled_values()]
        assert counts["dead_lettered"] == len(poison)
        assert queues.ready(self.dlq) == len(poison)
        self.out.unlink(missing_ok=True)


def summary_of(letters: int, succeeded: int, failed_again: int) -> dict[str, Any]:
    return {
        "letters": letters,
        "records": letters,
        "succeeded": succeeded,
        "failed_again": failed_again,
        "interrupted": False,
        "dry_run": False,
    }


def test_list_show_and_replay_to_the_handler(tmp_path: Path, queues: Queues) -> None:
    poison = ["v2", "v5", "v7"]
    s = Setup(tmp_path, queues, poison)
    s.dead_letter(queues, [f"v{i}" for i in range(10)])

    rows = s.pending()
    assert [r["records"] for r in rows] == [1, 1, 1]
    assert all(r["condition"] == "RetryAttemptsExhausted" for r in rows)
    assert all(r["error"] == "ValueError" and r["replays"] == 0 for r in rows)
    assert all(r["source"] == f"{s.queue}(1)" for r in rows)
    assert queues.ready(s.dlq) == 3  # listing takes nothing away

    table = s.cli("dlq", "list", str(s.config), s.queue)
    assert table.returncode == 0 and rows[0]["id"] in table.stdout
    shown = s.cli("dlq", "show", str(s.config), s.queue, rows[0]["id"])
    assert shown.returncode == 0, shown.stderr
    letter = orjson.loads(shown.stdout)
    assert letter["requestContext"]["requestId"] == rows[0]["id"]
    (item,) = letter["payload"]["rmqMessagesByQueue"][f"{s.queue}::{VHOST}"]
    assert item["dataDecoded"] in poison
    assert letter["error"]["errorMessage"] == f"cannot handle {item['dataDecoded']}"
    missing = s.cli("dlq", "show", str(s.config), s.queue, "no-such-letter")
    assert missing.returncode == 1 and "no pending dead letter" in missing.stderr
    assert queues.ready(s.dlq) == 3

    dry = s.replay("--dry-run")
    assert dry["dry_run"] and dry["letters"] == 3 and dry["succeeded"] == 0
    assert queues.ready(s.dlq) == 3 and s.handled() == []

    # Still broken: each letter is tried once and written back with its replay count raised;
    # this run does not pick up the letters it writes.
    assert s.replay("--to", "handler") == summary_of(3, 0, 3)
    again = s.pending()
    assert len(again) == 3 and all(r["replays"] == 1 for r in again)
    assert not {r["id"] for r in again} & {r["id"] for r in rows}

    s.fixed.touch()
    assert s.replay("--to", "handler") == summary_of(3, 3, 0)
    assert s.handled_values() == poison  # each exactly once
    assert queues.ready(s.dlq) == 0 and s.pending() == []
    assert s.replay()["letters"] == 0  # a second replay does nothing
    assert s.handled_values() == poison


def test_replay_to_the_source(tmp_path: Path, queues: Queues) -> None:
    s = Setup(tmp_path, queues, ["p1", "p2"])
    values = ["ok1", "p1", "ok2", "p2", "forever1"]
    s.dead_letter(queues, values, content_type="text/plain", headers={"tenant": "acme"})
    s.fixed.touch()

    assert s.replay("--to", "source") == summary_of(3, 3, 0)
    assert queues.ready(s.dlq) == 0
    assert queues.ready(s.queue) == 3

    counts = s.run()
    assert counts["succeeded"] == 2 and counts["dead_lettered"] == 1
    seen = sorted(s.handled(), key=lambda h: h["value"])
    # Published back with their original properties and the replay header.
    assert seen == [
        {"value": v, "replay": 1, "messageId": m, "contentType": "text/plain", "tenant": "acme"}
        for v, m in (("p1", "m-1"), ("p2", "m-3"))
    ]
    # The record that still fails is dead-lettered again, counting the replay; no loop.
    (row,) = s.pending()
    assert row["replays"] == 1 and row["records"] == 1
    assert queues.ready(s.dlq) == 1


def test_interrupted_replay_resumes_without_losing_records(tmp_path: Path, queues: Queues) -> None:
    poison = [f"p{i}" for i in range(6)]
    rate = ("--rate", "4")
    s = Setup(tmp_path, queues, poison)
    s.dead_letter(queues, poison)
    s.fixed.touch()
    first = interrupted_replay(s.config, s.queue, lambda: len(s.handled()) >= 2, *rate)
    assert first["interrupted"] and 2 <= first["letters"] < len(poison)
    assert queues.ready(s.dlq) == len(poison) - first["letters"]  # what was not done stays

    rest = s.replay()
    assert first["letters"] + rest["letters"] == len(poison)
    # Nothing lost, nothing repeated: SIGTERM lets the letter in progress finish and be acked.
    assert s.handled_values() == poison
    assert queues.ready(s.dlq) == 0


# --- the store and the publisher ---------------------------------------------------------------


def mapping_for(source: str, **on_failure: Any) -> cfg.EventSourceMapping:
    return cfg.EventSourceMapping.model_validate(
        {
            "name": source,
            "function": "f",
            "source": {"type": "rabbitmq", "url": URL, "queue": source},
            "destination_config": {"on_failure": {"type": "rabbitmq", "url": URL, **on_failure}},
        }
    )


def store_for(mapping: cfg.EventSourceMapping) -> RabbitMQDeadLetterStore:
    assert mapping.destination_config is not None
    dst = mapping.destination_config.on_failure
    assert isinstance(dst, rabbitmq_cfg.RabbitMQDestination)
    return RabbitMQDeadLetterStore(dst, mapping)


def letter(n: int) -> bytes:
    return orjson.dumps(
        {"requestContext": {"requestId": f"id-{n}"}, "payload": {"eventSource": "aws:rmq"}}
    )


def test_store_offers_the_queue_as_it_stood_and_skips_what_is_no_letter(
    queues: Queues, caplog: pytest.LogCaptureFixture
) -> None:
    dlq = queues.declare(unique_name("rmq-dlq-store"))
    queues.publish(dlq, [letter(1), b"not json", letter(2), b'{"requestContext": {}}', letter(3)])
    store = store_for(mapping_for(dlq, routing_key=dlq))
    seen: list[StoredLetter] = []
    with caplog.at_level(logging.WARNING, logger="connectors.rabbitmq"):
        for stored in store.pending():
            seen.append(stored)
            if len(seen) == 1:
                queues.publish(dlq, [letter(4)])  # written while reading: not offered
    assert [s.id for s in seen] == ["id-1", "id-2", "id-3"]
    assert sum("skipped, not a dead letter" in r.getMessage() for r in caplog.records) == 2

    store.done(seen[1])
    with pytest.raises(LetterNotSettled):
        store.done(seen[1])
    # A second pending() offers again what the first left unsettled, and nothing else twice.
    assert [s.id for s in store.pending()] == ["id-1", "id-3", "id-4"]
    store.close()
    # Closing gives back everything not done, including what is no letter.
    assert queues.ready(dlq) == 5
    with pytest.raises(LetterNotSettled):
        store.done(seen[0])  # its connection is gone: the broker has it again


def test_store_needs_to_know_the_letters_queue() -> None:
    mapping = mapping_for("q", exchange="amq.topic", routing_key="letters")
    with pytest.raises(RabbitMQConfigError, match=r"destination_config\.on_failure\.queue"):
        store_for(mapping)
    named = mapping_for("q", exchange="amq.topic", routing_key="letters", queue="q.letters")
    assert store_for(named).queue == "q.letters"


def test_store_on_a_missing_queue_is_a_clear_error() -> None:
    missing = unique_name("rmq-dlq-missing")
    store = store_for(mapping_for("q", routing_key=missing))
    with pytest.raises(RabbitMQConfigError, match="does not exist"):
        list(store.pending())
    store.close()


def test_publisher_refuses_a_missing_source_queue() -> None:
    src = rabbitmq_cfg.RabbitMQSource(type="rabbitmq", url=URL, queue=unique_name("rmq-nowhere"))
    publisher = RabbitMQSourcePublisher(src)
    record = Record(source="q", position=0, value=b"x", timestamp_ms=0, headers=[])
    try:
        with pytest.raises(DeliveryRefused, match="does not exist"):
            publisher.publish([record], 1)
    finally:
        publisher.close()


def test_replayed_properties_are_the_original_ones() -> None:
    when = datetime(2026, 3, 4, 17, 5, 6, tzinfo=UTC)
    original = {
        "s": "text",
        "b": b"\xff\x00",
        "n": 7,
        "t": when,
        "nested": {"k": ["a", 1, True]},
        "d": Decimal("1.5"),
        "x-death": [{"count": 1}],
        "x-delivery-count": 3,
        "x-request-id": "r-1",
        "esm-replay-count": 1,
    }
    props = {
        "contentType": "application/json",
        "headers": header_json(original),
        "deliveryMode": 1,
        "priority": 3,
        "messageId": "m-9",
        "timestamp": "Jan 1, 1970, 12:33:41 AM",
        "userId": "someone-else",
        "clusterId": "c",
    }
    record = Record(
        source="q",
        position=0,
        value=b"x",
        timestamp_ms=0,
        headers=[],
        meta=RabbitMeta("q", "/", 5, props),
    )
    out = replay_properties(record, 2, "guest", 1_800_000_000)
    assert out.headers == {
        "s": "text",
        "b": b"\xff\x00",
        "n": 7,
        "t": when,
        "nested": {"k": ["a", 1, True]},
        "d": Decimal("1.5"),
        "x-request-id": "r-1",
        "esm-replay-count": 2,
    }
    assert (out.content_type, out.delivery_mode, out.priority) == ("application/json", 2, 3)
    assert (out.message_id, out.timestamp, out.user_id, out.cluster_id) == (
        "m-9",
        1_800_000_000,
        None,
        None,
    )
    assert header_value(header_json("plain")) == "plain"
