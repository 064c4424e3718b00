"""The dead-letter store contract on a Kafka destination topic, against a Kafka-protocol broker
(Tansu). Letters keyed like their records spread over the topic's partitions, so replay progress
is checked per partition: the replay group's committed offsets and the replay-state topic.
Also what only Kafka does: the publisher falls back to the key partitioner, and a missing
dead-letter topic reads as empty without being created."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer

from connectors.kafka.config import KafkaSource
from connectors.kafka.shape import KafkaMeta
from tests import brokers
from tests.brokers import KafkaRecord, Tansu, committed_offsets, end_offsets, read_topic
from tests.contract.store import (
    DeadLetterStoreContract,
    DestinationContract,
    PublisherContract,
    ReplayToSourceContract,
    Scenario,
)
from workers.app import config as cfg
from workers.app import registry
from workers.engine.records import Record

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

MAPPING = "orders"
REPLAY_GROUP = f"{MAPPING}-dlq-replay"
# Where the store keeps letters replayed past a commit (connectors/kafka).
REPLAY_STATE_TOPIC = "_esm-dlq-replay-state"
# A short session: Tansu joins a member after half of it (tests/brokers.py).
CLIENT_CONFIG = dict(brokers.KAFKA_TEST_SESSION)
# All poison records are on source partition 1; their letters are keyed like them, so the keys
# spread the letters over both partitions of the dead-letter topic: [3, 15] on one, [7, 10] on
# the other.
POISON_KEY = {3: "apple", 7: "banana", 10: "banana", 15: "apple"}
FAIL = {"ValueError": "value", "KeyError": "key"}


class TestKafkaStore(DestinationContract, DeadLetterStoreContract, PublisherContract):
    @pytest.fixture(autouse=True)
    def _broker(self, kafka_broker: Tansu) -> None:
        self.bootstrap = kafka_broker.bootstrap

    def fresh_mapping(self) -> cfg.EventSourceMapping:
        source = brokers.unique_name("kafka-store-src")
        dlq = brokers.unique_name("kafka-store-dlq")
        brokers.create_topic(self.bootstrap, source, 2)
        brokers.create_topic(self.bootstrap, dlq, 1)  # one partition: one order
        return cfg.EventSourceMapping.model_validate(
            {
                "name": MAPPING,
                "function": "f",
                "source": {
                    "type": "kafka",
                    "bootstrap_servers": self.bootstrap,
                    "topics": [source],
                    "client_config": CLIENT_CONFIG,
                },
                "destination_config": {"on_failure": {"type": "kafka", "topic": dlq}},
            }
        )

    def produce_source(
        self,
        mapping: cfg.EventSourceMapping,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        assert isinstance(mapping.source, KafkaSource)
        [topic] = mapping.source.topics
        records = [KafkaRecord(v, k, headers=headers) for v, k in zip(values, keys, strict=True)]
        brokers.produce(self.bootstrap, topic, records)


def topic_exists(bootstrap: str, topic: str) -> bool:
    """Asked as a consumer: Tansu creates a missing topic for an admin client's metadata
    request."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "esm-tests-metadata"})
    try:
        found = consumer.list_topics(topic, timeout=10).topics.get(topic)
    finally:
        consumer.close()
    return found is not None and found.error is None


def state_records(bootstrap: str, dlq: str) -> list[tuple[bytes, bytes | None]]:
    """This dead-letter topic's records in the replay-state topic (key, value)."""
    if not topic_exists(bootstrap, REPLAY_STATE_TOPIC):
        return []
    return [
        (m.key() or b"", m.value())
        for m in read_topic(bootstrap, REPLAY_STATE_TOPIC)
        if (m.key() or b"").startswith(f"{REPLAY_GROUP}/{dlq}/".encode())
    ]


class TestKafkaReplay(ReplayToSourceContract):
    interrupt_flags = ("--rate", "1")

    def scenario(self, tmp_path: Path) -> Scenario:
        raise NotImplementedError  # replaced by the fixture below, which needs the broker

    @pytest.fixture
    def s(self, kafka_broker: Tansu, tmp_path: Path) -> Iterator[Scenario]:
        """A mapping reading a fresh two-partition topic into a fresh two-partition dead-letter
        topic."""
        bootstrap = kafka_broker.bootstrap
        s = Scenario(
            config=tmp_path / "esm.yaml",
            mapping=MAPPING,
            out=tmp_path / "handled.jsonl",
            fixed=tmp_path / "fixed",
            source=brokers.unique_name("kafka-dlq-src"),
            dlq=brokers.unique_name("kafka-dlq-letters"),
            extra={"bootstrap": bootstrap},
        )
        brokers.create_topic(bootstrap, s.source, 2)
        brokers.create_topic(bootstrap, s.dlq, 2)
        function = {
            "handler": "tests.handlers.kafka_replay_handlers:picky",
            "isolation": "thread",
            "environment": {"KDLQ_OUT": str(s.out), "KDLQ_FIXED": str(s.fixed)},
        }
        mapping = {
            "name": MAPPING,
            "function": "picky",
            "source": {
                "type": "kafka",
                "bootstrap_servers": bootstrap,
                "topics": [s.source],
                "client_config": CLIENT_CONFIG,
            },
            "batch_size": 5,
            "maximum_batching_window_s": 0.05,
            "bisect_batch_on_function_error": True,
            "maximum_retry_attempts": 0,
            "destination_config": {"on_failure": {"type": "kafka", "topic": s.dlq}},
        }
        config = {"functions": {"picky": function}, "event_source_mappings": [mapping]}
        s.config.write_text(yaml.safe_dump(config, sort_keys=False))
        records = []
        for n in range(self.records):
            value: dict[str, Any] = {"n": n}
            if n in self.poison:
                value["fail"] = FAIL[self.poison[n]]
            records.append(
                KafkaRecord(
                    orjson.dumps(value),
                    POISON_KEY.get(n, f"k{n % 3}"),
                    headers=[("tenant", b"acme")],
                    partition=1 if n in self.poison else n % 2,
                )
            )
        placed = brokers.produce(bootstrap, s.source, records)
        # n -> (partition, offset, key, value) of the source record
        s.extra["originals"] = {
            n: (partition, offset, record.key, record.value)
            for n, ((partition, offset), record) in enumerate(zip(placed, records, strict=True))
        }
        yield s

    def bootstrap(self, s: Scenario) -> str:
        bootstrap: str = s.extra["bootstrap"]
        return bootstrap

    def handled(self, s: Scenario) -> list[dict[str, Any]]:
        if not s.out.exists():
            return []
        seen = [orjson.loads(line) for line in s.out.read_bytes().splitlines()]
        for h in seen:
            h["replay"] = None if h["replay"] is None else int(h["replay"])
        return seen

    def dlq_state(self, s: Scenario) -> Any:
        bootstrap = self.bootstrap(s)
        return (
            end_offsets(bootstrap, s.dlq),
            committed_offsets(bootstrap, REPLAY_GROUP, s.dlq),
            state_records(bootstrap, s.dlq),
        )

    def source_prefix(self, s: Scenario) -> str:
        return f"{s.source}-1@"

    def write_raw(self, s: Scenario, bodies: Sequence[bytes]) -> None:
        records = [KafkaRecord(body, partition=i % 2) for i, body in enumerate(bodies)]
        brokers.produce(self.bootstrap(s), s.dlq, records)

    def add_foreign(self, s: Scenario, letter: dict[str, Any]) -> int:
        no_letters = super().add_foreign(s, letter)
        # Another mapping's letters: named in the letter only, and named by the header.
        letter["mapping"] = "other-mapping"
        letter["requestContext"]["requestId"] = "someone-else"
        by_header = orjson.dumps(letter)
        letter["requestContext"]["requestId"] = "someone-else-too"
        brokers.produce(
            self.bootstrap(s),
            s.dlq,
            [
                KafkaRecord(orjson.dumps(letter), partition=0),
                KafkaRecord(by_header, headers=[("esm-mapping", b"other-mapping")], partition=1),
            ],
        )
        return no_letters

    def letters_by_partition(self, s: Scenario) -> dict[int, list[int]]:
        """The n of each dead letter's record, per partition of the dead-letter topic, in
        order."""
        out: dict[int, list[int]] = {}
        for m in read_topic(self.bootstrap(s), s.dlq):
            try:
                letter = orjson.loads(m.value() or b"")
                [item] = next(iter(letter["payload"]["records"].values()))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not a dead letter
            if letter["mapping"] == MAPPING:
                n = orjson.loads(base64.b64decode(item["value"]))["n"]
                out.setdefault(m.partition() or 0, []).append(n)
        return out

    def check_dead_lettered(self, s: Scenario) -> None:
        by_partition = self.letters_by_partition(s)
        # The keys spread the letters as this test needs (the partitioner hashes keys the same
        # way on every run).
        assert sorted(by_partition.values()) == [[3, 15], [7, 10]], by_partition
        ends, committed, state = self.dlq_state(s)
        assert committed == {} and state == []
        s.extra["ends"] = ends

    def check_shown(self, s: Scenario, letter: dict[str, Any]) -> None:
        [item] = letter["payload"]["records"][f"{s.source}-1"]
        n = item["valueDecoded"]["n"]
        assert item["valueDecoded"] == {"n": n, "fail": FAIL[self.poison[n]]}
        assert item["keyDecoded"] == POISON_KEY[n]
        assert item["offset"] == s.extra["originals"][n][1]
        assert letter["error"]["errorType"] == self.poison[n]

    def check_filtered_replay(self, s: Scenario) -> None:
        # On one partition a KeyError letter comes before a ValueError one: the commit stops at
        # the KeyError letter, and the ValueError letter replayed past it is remembered in the
        # replay state.
        committed = committed_offsets(self.bootstrap(s), REPLAY_GROUP, s.dlq)
        for partition, ns in self.letters_by_partition(s).items():
            # [3, 15]: past 3 only; [7, 10]: nothing committed past 7, 10 in the state.
            assert committed[partition] == (1 if ns[:2] == [3, 15] else 0)
        [(_, value)] = state_records(self.bootstrap(s), s.dlq)
        assert value is not None and orjson.loads(value)["done"] == [[1, 1]]
        s.extra["filtered"] = True

    def check_all_replayed(self, s: Scenario) -> None:
        ends, committed, state = self.dlq_state(s)
        # Replaying keeps the letters; the group's offsets are the progress.
        assert committed == ends
        if s.extra.get("filtered"):
            # Everything replayed is behind the commit: the state record is deleted.
            assert state[-1][1] is None
        else:
            assert state == [] and ends == s.extra["ends"]

    def check_republished(self, s: Scenario) -> None:
        originals = s.extra["originals"]
        ends = {0: 0, 1: 0}
        for partition, _, _, _ in originals.values():
            ends[partition] += 1
        replayed = [
            m
            for m in read_topic(self.bootstrap(s), s.source)
            if (m.offset() or 0) >= ends[m.partition() or 0]
        ]
        assert len(replayed) == len(self.poison)
        for m in replayed:
            partition, _, key, value = originals[orjson.loads(m.value() or b"")["n"]]
            assert (m.partition(), m.key(), m.value()) == (partition, key.encode(), value)
            assert m.headers() == [("tenant", b"acme"), ("esm-replay-count", b"1")]

    def check_replayed_handled(self, s: Scenario, handled: list[dict[str, Any]]) -> None:
        assert sorted((h["n"], h["tenant"], h["partition"]) for h in handled) == [
            (n, "acme", 1) for n in sorted(self.poison)
        ]
        total = sum(end_offsets(self.bootstrap(s), s.source).values())
        assert total == self.records + 2 * len(self.poison)


# --- Kafka only ------------------------------------------------------------------------------


def test_publisher_falls_back_to_the_key_partitioner_and_store_reads_no_topic(
    kafka_broker: Tansu,
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = brokers.unique_name("kafka-dlq-pub")
    brokers.create_topic(bootstrap, topic, 2)
    missing = brokers.unique_name("kafka-dlq-none")
    mapping = cfg.EventSourceMapping.model_validate(
        {
            "name": "pub",
            "function": "fn",
            "source": {"type": "kafka", "bootstrap_servers": bootstrap, "topics": [topic]},
            "destination_config": {"on_failure": {"type": "kafka", "topic": missing}},
        }
    )
    publisher = registry.open_source_publisher(mapping)
    gone = Record(
        f"{topic}-7",
        3,
        b"gone",
        b"k",
        headers=[("esm-replay-count", b"1"), ("h", b"x")],
        meta=KafkaMeta(topic, 7),  # a partition the topic no longer has
    )
    elsewhere = Record("old-topic-0", 4, b"elsewhere", None, meta=KafkaMeta("old-topic", 0))
    try:
        publisher.publish([gone, elsewhere], 2)
    finally:
        publisher.close()
    got = {m.value(): m for m in read_topic(bootstrap, topic)}
    assert set(got) == {b"gone", b"elsewhere"}
    assert got[b"gone"].key() == b"k" and got[b"gone"].partition() in (0, 1)
    assert got[b"gone"].headers() == [("h", b"x"), ("esm-replay-count", b"2")]
    assert got[b"elsewhere"].headers() == [("esm-replay-count", b"2")]

    # A dead-letter topic that does not exist (yet) holds no letters, and reading it creates
    # nothing.
    store = registry.open_dead_letter_store(mapping)
    try:
        assert list(store.pending()) == []
    finally:
        store.close()
    assert not topic_exists(bootstrap, missing)
