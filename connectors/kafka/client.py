"""What every confluent-kafka client of the connector shares: its errors, their readable text,
librdkafka's logs through Python logging, and which client_config settings each client takes."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from workers.engine.redact import describe, redact_text

log = logging.getLogger("connectors.kafka")

# How long start-up waits for the cluster's metadata before reporting it unreachable; the
# engine then retries `open()` with backoff.
CONNECT_TIMEOUT_S = 5.0
# Repeated driver errors (librdkafka retries a down broker many times a second) are logged once
# per this interval, with a count of the ones held back.
LOG_EVERY_S = 30.0

# Record headers as confluent-kafka gives and takes them.
Headers = list[tuple[str, str | bytes | None]]

# Consumer-only properties a destination inherits with the source's client_config; a producer
# warns about each of them, so they are left out.
CONSUMER_ONLY = re.compile(
    r"^(session\.timeout\.ms|heartbeat\.interval\.ms|max\.poll\.interval\.ms"
    r"|partition\.assignment\.strategy|group\..*|isolation\.level|auto\.commit\.interval\.ms"
    r"|check\.crcs|enable\.partition\.eof|fetch\..*|queued\..*|coordinator\.query\.interval\.ms)$"
)
# Producer-only properties a destination's client_config may hold; the consumer reading the
# letters back would warn about each of them.
PRODUCER_ONLY = re.compile(
    r"^(acks|request\.required\.acks|enable\.idempotence|enable\.gapless\.guarantee|linger\.ms"
    r"|queue\.buffering\..*|batch\.(size|num\.messages)|compression\.(type|codec|level)"
    r"|message\.timeout\.ms|delivery\.timeout\.ms|request\.timeout\.ms|retries"
    r"|message\.send\.max\.retries|partitioner|sticky\.partitioning\.linger\.ms"
    r"|transactional\.id|transaction\.timeout\.ms)$"
)


def producer_settings(client_config: dict[str, Any]) -> dict[str, Any]:
    """The settings a producer takes: consumer-only ones left out."""
    return {k: v for k, v in client_config.items() if not CONSUMER_ONLY.match(k)}


def consumer_settings(client_config: dict[str, Any]) -> dict[str, Any]:
    """The settings a consumer (or an admin client) takes: producer-only ones left out."""
    return {k: v for k, v in client_config.items() if not PRODUCER_ONLY.match(k)}


class KafkaUnavailable(KafkaException):
    """The cluster cannot be reached, or a topic is missing; retried with backoff."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "Kafka unavailable"


class KafkaFatalError(RuntimeError):
    """librdkafka reported a fatal error: this client is unusable and the poller must restart."""


def reason_of(exc: BaseException) -> str:
    """The readable part of a confluent-kafka exception (its KafkaError's text), never empty,
    passwords masked."""
    first = exc.args[0] if exc.args else None
    if isinstance(first, KafkaError) and first.str():
        return redact_text(first.str())
    return describe(exc)


class Throttled:
    """Logs each kind of message at most once per `LOG_EVERY_S`, counting the ones held back.

    librdkafka reports a refused connection on every reconnect attempt (many per second when
    the port is closed); without this a broker outage floods the log.
    """

    _DIGITS = re.compile(r"\d+")

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        self.logger = logger
        self.prefix = prefix
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, message: str) -> None:
        # Numbers (timings, offsets, counts) vary between otherwise identical messages.
        key = self._DIGITS.sub("#", message)[:200]
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < LOG_EVERY_S:
                self._last[key] = (last, held + 1)
                return
            self._last[key] = (now, 0)
        suffix = f" (and {held} similar since the last time)" if held else ""
        self.logger.log(level, "%s%s%s", self.prefix, message, suffix)


class DriverLog:
    """librdkafka's log lines, sent to Python logging through `Throttled`.

    confluent-kafka calls `.log(level, "%s [%s] %s", facility, client, text)`.
    """

    def __init__(self, throttled: Throttled) -> None:
        self.throttled = throttled

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if args and args[0] == "FAIL":
            return  # a failed connection, which the error callback reports as well
        self.throttled.log(level, fmt % args if args else fmt)
