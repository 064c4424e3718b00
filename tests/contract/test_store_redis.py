"""The dead-letter store contract on a Redis stream destination, against the real server."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from connectors.redis.config import RedisSource
from tests import brokers
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

pytestmark = [pytest.mark.integration, pytest.mark.redis]

MAPPING = "orders"
FAIL_FIELD = {"ValueError": "value", "KeyError": "key"}
KEY_FIELD = "key"


class Streams:
    """Names fresh streams and deletes them afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.created: list[str] = []

    def fresh(self, prefix: str) -> str:
        name = brokers.unique_name(prefix)
        self.created.append(name)
        return name

    def close(self) -> None:
        if self.created:
            self.client.delete(*self.created)
        self.client.close()


@pytest.fixture
def streams(redis_url: str) -> Iterator[Streams]:
    made = Streams(redis_url)
    yield made
    made.close()


class TestRedisStore(DestinationContract, DeadLetterStoreContract, PublisherContract):
    @pytest.fixture(autouse=True)
    def _streams(self, streams: Streams) -> None:
        self.streams = streams

    def fresh_mapping(self) -> cfg.EventSourceMapping:
        url = self.streams.url
        return cfg.EventSourceMapping.model_validate(
            {
                "name": MAPPING,
                "function": "f",
                "source": {
                    "type": "redis",
                    "url": url,
                    "streams": [self.streams.fresh("redis-store-src")],
                    "partition_key_field": KEY_FIELD,
                },
                "destination_config": {
                    "on_failure": {
                        "type": "redis",
                        "url": url,
                        "stream": self.streams.fresh("redis-store-dlq"),
                    }
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
        # Entries have fields, not headers: the key is a field, the value another.
        assert isinstance(mapping.source, RedisSource)
        [stream] = mapping.source.streams
        for value, key in zip(values, keys, strict=True):
            fields: dict[Any, Any] = {"value": value}
            if key is not None:
                fields[KEY_FIELD] = key
            self.streams.client.xadd(stream, fields)


class TestRedisReplay(ReplayToSourceContract):
    until_idle_s = 0.3

    def scenario(self, tmp_path: Path) -> Scenario:
        raise NotImplementedError  # replaced by the fixture below, which needs the server

    @pytest.fixture
    def s(self, tmp_path: Path, streams: Streams) -> Iterator[Scenario]:
        s = Scenario(
            config=tmp_path / "mappings.yaml",
            mapping=MAPPING,
            out=tmp_path / "handled.jsonl",
            fixed=tmp_path / "fixed",
            source=streams.fresh("redis-dlq-src"),
            dlq=streams.fresh("redis-dlq-letters"),
            extra={"client": streams.client},
        )
        function = {
            "handler": "tests.handlers.redis_replay_handlers:picky",
            "isolation": "thread",
            "environment": {"RDLQ_OUT": str(s.out), "RDLQ_FIXED": str(s.fixed)},
        }
        mapping = {
            "name": MAPPING,
            "function": "picky",
            "source": {
                "type": "redis",
                "url": streams.url,
                "streams": [s.source],
                "consumer_name": "test",
            },
            "batch_size": 5,
            "maximum_batching_window_s": 0.05,
            "bisect_batch_on_function_error": True,
            "maximum_retry_attempts": 0,
            "destination_config": {
                "on_failure": {"type": "redis", "url": streams.url, "stream": s.dlq}
            },
        }
        config = {"functions": {"picky": function}, "event_source_mappings": [mapping]}
        s.config.write_text(yaml.safe_dump(config, sort_keys=False))
        pipe = streams.client.pipeline(transaction=False)
        for n in range(self.records):
            fields: dict[Any, Any] = {"n": n, "tenant": "acme"}
            if n in self.poison:
                fields["fail"] = FAIL_FIELD[self.poison[n]]
            pipe.xadd(s.source, fields)
        pipe.execute()
        yield s

    def client(self, s: Scenario) -> redis.Redis:
        client: redis.Redis = s.extra["client"]
        return client

    def handled(self, s: Scenario) -> list[dict[str, Any]]:
        if not s.out.exists():
            return []
        seen = [orjson.loads(line) for line in s.out.read_bytes().splitlines()]
        for h in seen:
            h["replay"] = None if h["replay"] is None else int(h["replay"])
        return seen

    def dlq_state(self, s: Scenario) -> Any:
        client = self.client(s)
        return client.xlen(s.dlq), client.xinfo_groups(s.dlq), client.xrange(s.dlq)

    def source_prefix(self, s: Scenario) -> str:
        return f"{s.source}@"

    def write_raw(self, s: Scenario, bodies: Sequence[bytes]) -> None:
        for body in bodies:
            self.client(s).xadd(s.dlq, {"letter": body, "mapping": MAPPING})

    def add_foreign(self, s: Scenario, letter: dict[str, Any]) -> int:
        no_letters = super().add_foreign(s, letter)
        letter["requestContext"]["requestId"] = "someone-else"
        self.client(s).xadd(s.dlq, {"letter": orjson.dumps(letter), "mapping": "other-mapping"})
        s.extra["foreign"] = no_letters + 1
        return no_letters

    def check_dead_lettered(self, s: Scenario) -> None:
        assert self.client(s).xlen(s.dlq) == len(self.poison)
        assert self.client(s).xinfo_groups(s.dlq) == []

    def check_rows(self, s: Scenario, rows: list[dict[str, Any]]) -> None:
        assert [r["error"] for r in rows] == [self.poison[n] for n in sorted(self.poison)]

    def check_shown(self, s: Scenario, letter: dict[str, Any]) -> None:
        [item] = letter["payload"]["records"][s.source]
        assert item["fieldsDecoded"] == {"n": 7, "tenant": "acme", "fail": "key"}

    def check_filtered_replay(self, s: Scenario) -> None:
        rows = self.pending(s)
        assert rows[0]["error"] == "KeyError"  # oldest first
        # The letter skipped before a replayed one waits in the replay group's pending entries.
        assert self.client(s).xpending(s.dlq, "esm-replay")["pending"] == 1

    def check_all_replayed(self, s: Scenario) -> None:
        client = self.client(s)
        assert client.xlen(s.dlq) >= len(self.poison)  # replaying keeps the letters, as progress
        # What is not this mapping's letter stays offered, in the group's pending entries.
        assert client.xpending(s.dlq, "esm-replay")["pending"] == s.extra.get("foreign", 0)

    def check_republished(self, s: Scenario) -> None:
        client = self.client(s)
        entries: Any = client.xrange(s.source)
        replayed = entries[self.records :]
        assert [
            {k.decode(): v.decode() for k, v in fields.items() if k != b"fail"}
            for _, fields in replayed
        ] == [{"n": str(n), "tenant": "acme", "esm-replay-count": "1"} for n in sorted(self.poison)]

    def check_replayed_handled(self, s: Scenario, handled: list[dict[str, Any]]) -> None:
        assert self.client(s).xlen(s.source) == self.records + 2 * len(self.poison)


class RecordingListener:
    def on_assigned(self, units: Any) -> None:
        pass

    def on_revoked(self, units: Any) -> None:
        pass


def test_a_refused_letter_acks_none_of_its_source_entries(streams: Streams) -> None:
    """Same server: the letter and the ack of its entries go together, and a refused XADD
    (here the letter key holds a string) leaves the entries pending, so a crash before the
    letter is stored loses nothing."""
    url = streams.url
    source_stream, letters = streams.fresh("redis-atomic-src"), streams.fresh("redis-atomic-dlq")
    mapping = cfg.EventSourceMapping.model_validate(
        {
            "name": MAPPING,
            "function": "f",
            "source": {"type": "redis", "url": url, "streams": [source_stream]},
            "destination_config": {"on_failure": {"type": "redis", "url": url, "stream": letters}},
        }
    )
    for i in range(3):
        streams.client.xadd(source_stream, {"v": str(i)})
    source = registry.open_source(mapping)
    destination = registry.open_destination(mapping)
    assert destination is not None
    source.open(RecordingListener())
    try:
        records: list[Record] = []
        deadline = time.monotonic() + 10
        while len(records) < 3 and time.monotonic() < deadline:
            records += source.poll(3 - len(records), 0.2)
        assert len(records) == 3
        letter = {"requestContext": {"requestId": "r1", "condition": "RetryAttemptsExhausted"}}

        def pending() -> int:
            summary: Any = streams.client.xpending(source_stream, MAPPING)
            return int(summary["pending"])

        streams.client.set(letters, "not a stream")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            destination.deliver(letter, records)
        assert pending() == 3  # MULTI/EXEC would have acked them with the XADD refused
        streams.client.delete(letters)
        destination.deliver(letter, records)
        assert pending() == 0
        rows: Any = streams.client.xrange(letters)
        (entry,) = rows
        assert orjson.loads(entry[1][b"letter"]) == letter
    finally:
        destination.close()
        source.close()
