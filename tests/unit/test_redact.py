"""workers.engine.redact: the one rule that keeps passwords out of messages, and `describe`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from connectors.redis.shape import RedisMeta, RedisShape
from workers.engine.clock import FakeClock
from workers.engine.letters import Condition, DeadLetters, build_letter
from workers.engine.outcomes import ErrorInfo
from workers.engine.records import Record
from workers.engine.redact import describe, redact_client_config, redact_text
from workers.engine.stats import MappingStats


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("amqps//user:s3cret@host", "amqps//user:***@host"),  # no ':' after the scheme
        ("user:s3cret@host:5672", "user:***@host:5672"),  # no scheme at all
        ("got 'amqp://u:s3cret@h/%2f' here", "got 'amqp://u:***@h/%2f' here"),
        ("amqp://u:s3/cr@et@h/v?heartbeat=5", "amqp://u:***@h/v?heartbeat=5"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("SASL_SSL://u:s3cret@b1:9092,b2:9092", "SASL_SSL://u:***@b1:9092,b2:9092"),
        (
            "cannot connect (ConnectionError(amqp://u:s3cret@h))",
            "cannot connect (ConnectionError(amqp://u:***@h))",
        ),
        ("redis://h/0?db=1&password=s3cret&x=1", "redis://h/0?db=1&password=***&x=1"),
        ("sasl.password=s3cret", "sasl.password=***"),
        ("amqp://user@localhost/", "amqp://user@localhost/"),
        ("orders-0@17-19, s@1700000000000-0", "orders-0@17-19, s@1700000000000-0"),
        ("max.poll.interval.ms=300000", "max.poll.interval.ms=300000"),
        ("not a url", "not a url"),
    ],
)
def test_passwords_are_masked_in_anything_url_like(text: str, shown: str) -> None:
    assert redact_text(text) == shown
    assert redact_text(shown) == shown


def test_secret_looking_client_settings_are_masked() -> None:
    config = {
        "sasl.password": "a",
        "ssl.key.password": "b",
        "sasl.oauthbearer.client.secret": "c",
        "my_token": "d",
        "session.timeout.ms": 6000,
    }
    assert redact_client_config(config) == {
        "sasl.password": "***",
        "ssl.key.password": "***",
        "sasl.oauthbearer.client.secret": "***",
        "my_token": "***",
        "session.timeout.ms": 6000,
    }


class Quiet(Exception):
    def __str__(self) -> str:
        return ""

    def __repr__(self) -> str:
        return "Quiet()"


def test_describe_is_never_empty_and_hides_passwords() -> None:
    assert describe(ValueError("bad value")) == "ValueError: bad value"
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ConnectionError("amqp://u:s3cret@h\nrefused")) == (
        "ConnectionError: amqp://u:***@h refused"
    )
    try:
        try:
            raise OSError(111, "Connection refused")
        except OSError as exc:
            raise Quiet() from exc
    except Quiet as exc:
        assert (
            describe(exc) == "Quiet (from ConnectionRefusedError: [Errno 111] Connection refused)"
        )


class RefusesQuietly:
    """A destination whose error says nothing in str(), as some drivers' errors do."""

    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise Quiet()

    def close(self) -> None:
        pass


def test_a_refusal_is_logged_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    letters = DeadLetters(
        mapping="m",
        function="f",
        destination=RefusesQuietly(),
        shape=RedisShape("h"),
        clock=FakeClock(),
        stats=MappingStats(),
    )
    record = Record("s", 1, b"", meta=RedisMeta("s", "0-1", {"v": b"1"}))
    with caplog.at_level(logging.WARNING, logger="workers.deadletter"):
        sent = letters.send(
            [record], Condition.RETRY_ATTEMPTS_EXHAUSTED, None, 1, threading.Event()
        )
    assert sent
    assert "on-failure destination refused 1 record(s): Quiet; retry in" in caplog.text


def test_a_letter_does_not_keep_a_password_the_handler_error_quoted() -> None:
    error = ErrorInfo(
        "OperationalError",
        "cannot connect to postgres://app:s3cret@db:5432/orders",
        ['  File "app.py", line 3, in h\n    connect("postgres://app:s3cret@db")\n'],
    )
    letter = build_letter(
        mapping="m",
        function="f",
        condition=Condition.RETRY_ATTEMPTS_EXHAUSTED,
        invoke_count=1,
        error=error,
        records=[Record("s", 1, b"", meta=RedisMeta("s", "0-1", {"v": b"1"}))],
        shape=RedisShape("h"),
        now_ms=1_700_000_000_000,
    )
    assert "s3cret" not in orjson.dumps(letter).decode()
    assert letter["error"]["errorMessage"] == "cannot connect to postgres://app:***@db:5432/orders"
