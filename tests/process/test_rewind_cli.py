"""`workers rewind` refusals that need no broker: queues cannot be rewound, a bad --to or mapping
is named; exit 2 for each, 1 (one line) for a broker that cannot be reached."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

QUEUES = {
    "rabbitmq": "{type: rabbitmq, url: 'amqp://guest:guest@127.0.0.1:1/', queue: q}",
    "sqs": "{type: sqs, queue_url: 'http://127.0.0.1:1/000000000000/q', region: us-east-1}",
    "kombu": "{type: kombu, url: 'memory://', queue: q}",
}


def mapping_file(tmp_path: Path, source: str) -> Path:
    config = tmp_path / "mappings.yaml"
    config.write_text(
        f"""
functions:
  f: {{handler: "tests.handlers.misbehaving:ok", isolation: thread}}
event_source_mappings:
  - name: m
    function: f
    source: {source}
"""
    )
    return config


def rewind(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "rewind", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("kind", sorted(QUEUES))
def test_a_queue_cannot_be_rewound(tmp_path: Path, kind: str) -> None:
    config = mapping_file(tmp_path, QUEUES[kind])
    for flags in ((), ("--dry-run",)):
        done = rewind(config, "m", "--to", "earliest", *flags)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr == (
            f"error: mapping m: a {kind} source cannot be rewound: not possible on a queue,"
            " which deletes each message once it is acked, so there is no earlier position to go"
            " back to (dead letters can be replayed: `workers dlq replay`)\n"
        )
        assert done.stdout == ""


@pytest.mark.parametrize(
    ("to", "says"),
    [
        ("yesterday", "--to must be an ISO-8601 time or epoch milliseconds (got 'yesterday')"),
        ("1700000000", "--to must be epoch milliseconds (got '1700000000', which looks like"),
        ("2024-13-01T00:00:00Z", "--to must be an ISO-8601 time or epoch milliseconds"),
    ],
)
def test_a_bad_time_is_refused_with_what_it_takes(tmp_path: Path, to: str, says: str) -> None:
    config = mapping_file(tmp_path, "{type: redis, url: 'redis://127.0.0.1:1/0', streams: [s]}")
    done = rewind(config, "m", "--to", to)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "or earliest, or latest" in done.stderr


def test_an_unknown_mapping_is_named(tmp_path: Path) -> None:
    config = mapping_file(tmp_path, "{type: redis, url: 'redis://127.0.0.1:1/0', streams: [s]}")
    done = rewind(config, "nope", "--to", "earliest")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no mapping named 'nope' (known: 'm')" in done.stderr


def test_an_unreachable_broker_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = mapping_file(
        tmp_path, "{type: redis, url: 'redis://:hunter2@127.0.0.1:1/0', streams: [s]}"
    )
    done = rewind(config, "m", "--to", "earliest")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("error: rewind m: ") and done.stderr.count("\n") == 1
    assert "hunter2" not in done.stderr
