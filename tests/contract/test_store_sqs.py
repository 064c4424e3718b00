"""The dead-letter store contract on an SQS dead-letter queue, against moto's server; and what
only SQS does: the labels as message attributes, letters SQS would refuse as they are, and a
FIFO dead-letter queue that stores a letter sent twice once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from connectors.sqs.config import SQSSource
from tests import brokers
from tests.contract.store import (
    DeadLetterStoreContract,
    DestinationContract,
    PublisherContract,
    ReplayToSourceContract,
    Scenario,
    letter,
)
from workers.app import config as cfg
from workers.app import registry
from workers.engine.ports import ConnectorConfigError

pytestmark = [pytest.mark.integration, pytest.mark.sqs]


def sqs_mapping(source_url: str, letters_url: str, name: str = "orders") -> cfg.EventSourceMapping:
    return cfg.EventSourceMapping.model_validate(
        {
            "name": name,
            "function": "f",
            "source": {"type": "sqs", "queue_url": source_url},
            "destination_config": {"on_failure": {"type": "sqs", "queue_url": letters_url}},
        }
    )


class TestSQSStore(DestinationContract, DeadLetterStoreContract, PublisherContract):
    join_timeout_s = 5.0

    @pytest.fixture(autouse=True)
    def _server(self, sqs_server: brokers.MotoServer) -> None:
        self.server = sqs_server

    def fresh_mapping(self) -> cfg.EventSourceMapping:
        source = self.server.create_queue(brokers.unique_name("sqs-store-src"))
        letters = self.server.create_queue(brokers.unique_name("sqs-store-dlq"))
        return sqs_mapping(source, letters)

    def produce_source(
        self,
        mapping: cfg.EventSourceMapping,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        # A standard queue's messages have no key; headers are message attributes.
        assert isinstance(mapping.source, SQSSource)
        client = self.server.client()
        for value in values:
            client.send_message(
                QueueUrl=mapping.source.queue_url,
                MessageBody=value.decode(),
                MessageAttributes={
                    n: {"DataType": "String", "StringValue": v.decode()} for n, v in headers
                },
            )


def test_letters_carry_their_labels_and_other_mappings_letters_stay(
    sqs_server: brokers.MotoServer,
) -> None:
    source = sqs_server.create_queue(brokers.unique_name("sqs-src"))
    letters = sqs_server.create_queue(brokers.unique_name("sqs-dlq"))
    mine, other = sqs_mapping(source, letters), sqs_mapping(source, letters, name="other")
    for mapping, n in ((mine, 1), (other, 2), (mine, 3)):
        destination = registry.open_destination(mapping)
        assert destination is not None
        one = letter(mapping.name, n)
        one["error"]["errorType"] = "ValueError"
        one["payload"]["text"] = "\ufffe is not SQS text"
        destination.deliver(one, [])
        destination.close()
    got = sqs_server.client().receive_message(
        QueueUrl=letters, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )["Messages"]
    labels = sorted(
        (
            (m["MessageAttributes"]["esm-mapping"]["StringValue"], m["MessageAttributes"])
            for m in got
        ),
        key=lambda pair: pair[0],
    )
    assert [name for name, _ in labels] == ["orders", "orders", "other"]
    for _, attributes in labels:
        assert attributes["esm-condition"]["StringValue"] == "RetryAttemptsExhausted"
        assert attributes["esm-error-type"]["StringValue"] == "ValueError"
    for m in got:  # back, for the store
        sqs_server.client().change_message_visibility(
            QueueUrl=letters, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
        )
    store = registry.open_dead_letter_store(mine)
    try:
        stored = list(store.pending())
        assert [s.letter["payload"]["n"] for s in stored] == [1, 3]
        assert stored[0].letter["payload"]["text"] == "\ufffe is not SQS text"
        for s in stored:
            store.done(s)
    finally:
        store.close()
    store = registry.open_dead_letter_store(other)
    try:
        assert [s.letter["payload"]["n"] for s in store.pending()] == [2]
    finally:
        store.close()


def test_a_fifo_dead_letter_queue_stores_a_letter_sent_twice_once(
    sqs_server: brokers.MotoServer,
) -> None:
    source = sqs_server.create_queue(brokers.unique_name("sqs-src"))
    letters = sqs_server.create_queue(brokers.unique_name("sqs-dlq") + ".fifo")
    mapping = sqs_mapping(source, letters)
    destination = registry.open_destination(mapping)
    assert destination is not None
    one = letter(mapping.name, 1)
    destination.deliver(one, [])
    destination.deliver(one, [])  # its reply was lost, say
    destination.close()
    store = registry.open_dead_letter_store(mapping)
    try:
        assert [s.id for s in store.pending()] == [one["requestContext"]["requestId"]]
    finally:
        store.close()


def test_a_destination_on_the_source_queue_is_refused(sqs_server: brokers.MotoServer) -> None:
    queue = sqs_server.create_queue(brokers.unique_name("sqs-src"))
    with pytest.raises(ValueError, match="is the queue the mapping reads"):
        sqs_mapping(queue, queue)


def test_validate_connect_checks_both_queues(sqs_server: brokers.MotoServer) -> None:
    source = sqs_server.create_queue(brokers.unique_name("sqs-src"))
    letters = sqs_server.create_queue(brokers.unique_name("sqs-dlq"))
    probed = registry.probe(sqs_mapping(source, letters))
    assert probed.destination == [f"queue {letters} exists"]
    assert probed.source.max_deliveries is None  # no redrive policy
    missing = f"{sqs_server.endpoint_url}/123456789012/{brokers.unique_name('missing')}"
    with pytest.raises(ConnectorConfigError, match="does not exist"):
        registry.probe(sqs_mapping(source, missing))
    with pytest.raises(ConnectorConfigError, match="does not exist"):
        registry.probe(sqs_mapping(missing, letters))


class TestSQSReplay(ReplayToSourceContract):
    records = 10
    poison = {2: "ValueError", 5: "ValueError", 7: "ValueError"}
    interrupt_flags = ("--rate", "4")

    def scenario(self, tmp_path: Path) -> Scenario:
        raise NotImplementedError  # replaced by the fixture below, which needs the server

    @pytest.fixture
    def s(self, tmp_path: Path, sqs_server: brokers.MotoServer) -> Iterator[Scenario]:
        name = brokers.unique_name("sqs-replay")
        s = Scenario(
            config=tmp_path / "mappings.yaml",
            mapping=name,
            out=tmp_path / "handled.jsonl",
            fixed=tmp_path / "fixed",
            source=sqs_server.create_queue(name),
            dlq=sqs_server.create_queue(f"{name}-dlq"),
            extra={"client": sqs_server.client(), "queue": name},
        )
        function = {
            "handler": "tests.handlers.sqs_replay_handlers:picky",
            "isolation": "thread",
            "timeout_s": 10,
            "environment": {
                "SR_OUT": str(s.out),
                "SR_FIXED": str(s.fixed),
                "SR_POISON": ",".join(f"v{n}" for n in self.poison),
            },
        }
        mapping = {
            "name": name,
            "function": "fn",
            "source": {"type": "sqs", "queue_url": s.source},
            "batch_size": 10,
            "maximum_batching_window_s": 0.1,
            "bisect_batch_on_function_error": True,
            "maximum_retry_attempts": 0,
            "destination_config": {"on_failure": {"type": "sqs", "queue_url": s.dlq}},
        }
        config = {"functions": {"fn": function}, "event_source_mappings": [mapping]}
        s.config.write_text(yaml.safe_dump(config, sort_keys=False))
        for n in range(self.records):
            self.client(s).send_message(
                QueueUrl=s.source,
                MessageBody=f"v{n}",
                MessageAttributes={"tenant": {"DataType": "String", "StringValue": "acme"}},
            )
        yield s

    def client(self, s: Scenario) -> Any:
        return s.extra["client"]

    def counts(self, url: str, s: Scenario) -> tuple[int, int]:
        attributes = self.client(s).get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        )

    def handled(self, s: Scenario) -> list[dict[str, Any]]:
        if not s.out.exists():
            return []
        seen = [orjson.loads(line) for line in s.out.read_bytes().splitlines()]
        for h in seen:
            h["n"] = int(h["value"][1:])
            h["replay"] = None if h["replay"] is None else int(h["replay"])
        return seen

    def dlq_state(self, s: Scenario) -> Any:
        return self.counts(s.dlq, s)  # listing takes nothing away, and holds nothing after

    def source_prefix(self, s: Scenario) -> str:
        return f"{s.extra['queue']}(1)"

    def write_raw(self, s: Scenario, bodies: Sequence[bytes]) -> None:
        for body in bodies:
            self.client(s).send_message(QueueUrl=s.dlq, MessageBody=body.decode())
        s.extra["foreign"] = len(bodies)

    def check_dead_lettered(self, s: Scenario) -> None:
        assert self.counts(s.dlq, s) == (len(self.poison), 0)
        assert self.counts(s.source, s) == (0, 0)  # the poison deleted too, once dead-lettered

    def check_shown(self, s: Scenario, letter: dict[str, Any]) -> None:
        (item,) = letter["payload"]["Records"]
        assert item["body"] in {f"v{n}" for n in self.poison}
        assert item["eventSource"] == "aws:sqs"

    def check_all_replayed(self, s: Scenario) -> None:
        # Replayed letters are deleted; what is no letter is made visible again, for whoever
        # knows what it is.
        assert self.counts(s.dlq, s) == (s.extra.get("foreign", 0), 0)

    def check_republished(self, s: Scenario) -> None:
        assert self.counts(s.dlq, s) == (0, 0)
        assert self.counts(s.source, s) == (len(self.poison), 0)

    def check_replayed_handled(self, s: Scenario, handled: list[dict[str, Any]]) -> None:
        # Sent back with their message attributes.
        assert [h["tenant"] for h in handled] == ["acme"] * len(self.poison)
        assert self.counts(s.dlq, s) == (0, 0)
