"""The dead-letter store contract on a RabbitMQ dead-letter queue, against the real broker; and
what only RabbitMQ does: the store holds letters unacked, needs to know the letters' queue, and
replayed messages keep their original properties."""

from __future__ import annotations

import logging
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

from connectors.rabbitmq.publisher import replay_properties
from connectors.rabbitmq.shape import RabbitMeta, header_json, header_value
from tests.brokers import unique_name
from tests.contract.store import (
    DeadLetterStoreContract,
    DestinationContract,
    PublisherContract,
    ReplayToSourceContract,
    Scenario,
)
from workers.app import config as cfg
from workers.app import registry
from workers.engine.ports import ConnectorConfigError, StoredLetter
from workers.engine.records import Record

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


class Queues:
    """Declares this test's queues (deleted afterwards), publishes and counts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
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
def queues(rabbitmq_url: str) -> Iterator[Queues]:
    admin = Queues(rabbitmq_url)
    yield admin
    admin.close()


class TestRabbitMQStore(DestinationContract, DeadLetterStoreContract, PublisherContract):
    @pytest.fixture(autouse=True)
    def _queues(self, queues: Queues) -> None:
        self.queues = queues

    def fresh_mapping(self) -> cfg.EventSourceMapping:
        source = self.queues.declare(unique_name("rmq-store"))
        dlq = self.queues.declare(f"{source}.dlq")
        url = self.queues.url
        return cfg.EventSourceMapping.model_validate(
            {
                "name": source,
                "function": "f",
                "source": {"type": "rabbitmq", "url": url, "queue": source},
                "destination_config": {
                    "on_failure": {"type": "rabbitmq", "url": url, "routing_key": dlq}
                },
            }
        )

    def produce_source(
        self,
        mapping: cfg.EventSourceMapping,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        # Messages have no key; headers as the broker's own table.
        self.queues.publish(mapping.name, values, headers={n: v.decode() for n, v in headers})


class TestRabbitMQReplay(ReplayToSourceContract):
    records = 10
    poison = {2: "ValueError", 5: "ValueError", 7: "ValueError"}
    interrupt_flags = ("--rate", "4")
    exactly_once_on_interrupt = True

    def scenario(self, tmp_path: Path) -> Scenario:
        raise NotImplementedError  # replaced by the fixture below, which needs the broker

    @pytest.fixture
    def s(self, tmp_path: Path, queues: Queues) -> Iterator[Scenario]:
        queue = queues.declare(unique_name("rmq-dlq"))
        s = Scenario(
            config=tmp_path / "mappings.yaml",
            mapping=queue,
            out=tmp_path / "handled.jsonl",
            fixed=tmp_path / "fixed",
            source=queue,
            dlq=queues.declare(f"{queue}.dlq"),
            extra={"queues": queues},
        )
        function = {
            "handler": "tests.handlers.rmq_replay_handlers:picky",
            "isolation": "thread",
            "timeout_s": 10,
            "environment": {
                "RR_OUT": str(s.out),
                "RR_FIXED": str(s.fixed),
                "RR_POISON": ",".join(f"v{n}" for n in self.poison),
            },
        }
        mapping = {
            "name": queue,
            "function": "fn",
            "source": {"type": "rabbitmq", "url": queues.url, "queue": queue},
            "batch_size": 10,
            "maximum_batching_window_s": 0.1,
            "bisect_batch_on_function_error": True,
            "maximum_retry_attempts": 0,
            "destination_config": {
                "on_failure": {"type": "rabbitmq", "url": queues.url, "routing_key": s.dlq}
            },
        }
        config = {"functions": {"fn": function}, "event_source_mappings": [mapping]}
        s.config.write_text(yaml.safe_dump(config, sort_keys=False))
        values = [f"v{n}".encode() for n in range(self.records)]
        queues.publish(queue, values, content_type="text/plain", headers={"tenant": "acme"})
        yield s

    def queues(self, s: Scenario) -> Queues:
        queues: Queues = s.extra["queues"]
        return queues

    def handled(self, s: Scenario) -> list[dict[str, Any]]:
        if not s.out.exists():
            return []
        seen = [orjson.loads(line) for line in s.out.read_bytes().splitlines()]
        for h in seen:
            h["n"] = int(h["value"][1:])
        return seen

    def dlq_state(self, s: Scenario) -> Any:
        return self.queues(s).ready(s.dlq)  # listing takes nothing away

    def source_prefix(self, s: Scenario) -> str:
        return f"{s.source}(1)"

    def write_raw(self, s: Scenario, bodies: Sequence[bytes]) -> None:
        self.queues(s).publish(s.dlq, bodies)
        s.extra["foreign"] = len(bodies)

    def check_dead_lettered(self, s: Scenario) -> None:
        assert self.queues(s).ready(s.dlq) == len(self.poison)

    def check_shown(self, s: Scenario, letter: dict[str, Any]) -> None:
        path = urlsplit(self.queues(s).url).path
        vhost = "/" if path in ("", "/") else unquote(path[1:])
        (item,) = letter["payload"]["rmqMessagesByQueue"][f"{s.source}::{vhost}"]
        assert item["dataDecoded"] in {f"v{n}" for n in self.poison}
        assert letter["error"]["errorMessage"] == f"cannot handle {item['dataDecoded']}"

    def check_all_replayed(self, s: Scenario) -> None:
        # Replayed letters are acked away; what is no letter is given back, for whoever knows.
        assert self.queues(s).ready(s.dlq) == s.extra.get("foreign", 0)

    def check_republished(self, s: Scenario) -> None:
        assert self.queues(s).ready(s.dlq) == 0
        assert self.queues(s).ready(s.source) == len(self.poison)

    def check_replayed_handled(self, s: Scenario, handled: list[dict[str, Any]]) -> None:
        # Published back with their original properties.
        assert sorted((h["messageId"], h["contentType"], h["tenant"]) for h in handled) == [
            (f"m-{n}", "text/plain", "acme") for n in sorted(self.poison)
        ]
        assert self.queues(s).ready(s.dlq) == 0


# --- RabbitMQ only -----------------------------------------------------------------------------


def mapping_for(url: str, source: str, **on_failure: Any) -> cfg.EventSourceMapping:
    return cfg.EventSourceMapping.model_validate(
        {
            "name": source,
            "function": "f",
            "source": {"type": "rabbitmq", "url": url, "queue": source},
            "destination_config": {"on_failure": {"type": "rabbitmq", "url": url, **on_failure}},
        }
    )


def letter(n: int) -> bytes:
    return orjson.dumps(
        {"requestContext": {"requestId": f"id-{n}"}, "payload": {"eventSource": "aws:rmq"}}
    )


def not_settled(exc: BaseException) -> bool:
    return type(exc).__name__ == "LetterNotSettled"


def test_store_offers_the_queue_as_it_stood_and_skips_what_is_no_letter(
    queues: Queues, caplog: pytest.LogCaptureFixture
) -> None:
    dlq = queues.declare(unique_name("rmq-dlq-store"))
    queues.publish(dlq, [letter(1), b"not json", letter(2), b'{"requestContext": {}}', letter(3)])
    store = registry.open_dead_letter_store(mapping_for(queues.url, dlq, routing_key=dlq))
    seen: list[StoredLetter] = []
    with caplog.at_level(logging.WARNING, logger="connectors.rabbitmq"):
        for stored in store.pending():
            seen.append(stored)
            if len(seen) == 1:
                queues.publish(dlq, [letter(4)])  # written while reading: not offered
    assert [s.id for s in seen] == ["id-1", "id-2", "id-3"]
    assert sum("skipped, not a dead letter" in r.getMessage() for r in caplog.records) == 2

    store.done(seen[1])
    with pytest.raises(RuntimeError) as twice:
        store.done(seen[1])
    assert not_settled(twice.value)
    # A second pending() offers again what the first left unsettled, and nothing else twice.
    assert [s.id for s in store.pending()] == ["id-1", "id-3", "id-4"]
    store.close()
    # Closing gives back everything not done, including what is no letter.
    assert queues.ready(dlq) == 5
    with pytest.raises(RuntimeError) as gone:
        store.done(seen[0])  # its connection is gone: the broker has it again
    assert not_settled(gone.value)


def test_store_needs_to_know_the_letters_queue(rabbitmq_url: str) -> None:
    mapping = mapping_for(rabbitmq_url, "q", exchange="amq.topic", routing_key="letters")
    with pytest.raises(ConnectorConfigError, match=r"destination_config\.on_failure\.queue"):
        registry.open_dead_letter_store(mapping)
    named = mapping_for(
        rabbitmq_url, "q", exchange="amq.topic", routing_key="letters", queue="q.letters"
    )
    store = registry.open_dead_letter_store(named)
    assert store.queue == "q.letters"  # type: ignore[attr-defined]
    store.close()


def test_store_on_a_missing_queue_is_a_clear_error(rabbitmq_url: str) -> None:
    missing = unique_name("rmq-dlq-missing")
    store = registry.open_dead_letter_store(mapping_for(rabbitmq_url, "q", routing_key=missing))
    with pytest.raises(ConnectorConfigError, match="does not exist"):
        list(store.pending())
    store.close()


def test_publisher_refuses_a_missing_source_queue(rabbitmq_url: str) -> None:
    mapping = mapping_for(rabbitmq_url, unique_name("rmq-nowhere"), routing_key="unused")
    publisher = registry.open_source_publisher(mapping)
    record = Record(source="q", position=0, value=b"x", timestamp_ms=0, headers=[])
    try:
        with pytest.raises(RuntimeError, match="does not exist") as refused:
            publisher.publish([record], 1)
        assert type(refused.value).__name__ == "DeliveryRefused"
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
