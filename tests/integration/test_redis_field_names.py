"""Redis field names that are not UTF-8 keep their identity: through `workers run` on the real
server the handler sees every field under its own name, and a replay to the source writes the
exact bytes back."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis
import yaml
from redis.typing import EncodableT, FieldT

from tests import brokers
from tests.cli import REPO, run_workers

pytestmark = [pytest.mark.integration, pytest.mark.redis]

FIELDS = {b"\xff": b"ff", b"\xfe": b"fe", b"name": b"plain", b"b64:bmFtZQ==": b"looks-encoded"}


def test_names_that_are_not_utf8_reach_the_handler_and_replay_exactly(
    redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = brokers.unique_name("redis-field-names")
    # XADD only reads the fields: bytes names and values are what it accepts.
    fields = cast("dict[FieldT, EncodableT]", FIELDS)
    entry_id = brokers.redis_text(client.xadd(stream, fields))
    seen, dlq = tmp_path / "seen.jsonl", tmp_path / "dlq"
    config = tmp_path / "mappings.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "functions": {
                    "dump": {
                        "handler": "tests.handlers.redis_handlers:dump_fields_then_fail",
                        "isolation": "thread",
                        "environment": {"REDIS_TEST_LOG": str(seen)},
                    }
                },
                "event_source_mappings": [
                    {
                        "name": "names",
                        "function": "dump",
                        "source": {
                            "type": "redis",
                            "url": redis_url,
                            "streams": [stream],
                            "consumer_name": "test",
                        },
                        "maximum_retry_attempts": 0,
                        "destination_config": {"on_failure": {"type": "file", "path": str(dlq)}},
                    }
                ],
            }
        )
    )
    try:
        counts = run_workers(config, tmp_path / "summary.json")["names"]
        assert counts["dead_lettered"] == 1
        got = orjson.loads(seen.read_bytes().splitlines()[0])
        event_fields = got["event"]
        assert len(event_fields) == len(FIELDS)
        assert event_fields["name"] == base64.b64encode(b"plain").decode()
        assert event_fields["b64:" + base64.b64encode(b"\xff").decode()] == "ZmY="
        assert event_fields["b64:" + base64.b64encode(b"\xfe").decode()] == "ZmU="
        assert event_fields["b64:" + base64.b64encode(b"b64:bmFtZQ==").decode()]
        assert got["read"] == {name.hex(): value.decode() for name, value in FIELDS.items()}

        command = ["dlq", "replay", str(config), "names", "--to", "source"]
        replay = subprocess.run(
            [sys.executable, "-m", "workers", *command],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replay.returncode == 0, replay.stderr
        entries: Any = client.xrange(stream)
        assert len(entries) == 2 and entries[0][0].decode() == entry_id
        replayed = dict(entries[1][1])
        assert replayed.pop(b"esm-replay-count") == b"1"
        assert replayed == FIELDS
    finally:
        client.delete(stream)
