"""The largest record a Kafka producer may write to a topic: the producer's `message.max.bytes`,
the topic's `max.message.bytes` where the cluster tells, and what refusals taught."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    AdminClient,
    ConfigResource,
)

log = logging.getLogger("connectors.kafka")

# librdkafka's default message.max.bytes: it refuses a larger record itself, before sending.
# https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
# A record's size as both limits count it, besides its key, value and header bytes: the record
# batch header (61 bytes in format v2) plus the record's own framing and varints.
RECORD_OVERHEAD_BYTES = 128
# How long a topic's max.message.bytes (or the failure to read it) is trusted before asking again.
DESCRIBE_EVERY_S = 300.0
DESCRIBE_TIMEOUT_S = 5.0
# Errors meaning "this record is too large": librdkafka's own check against message.max.bytes
# and the broker's MESSAGE_TOO_LARGE share code 10; RECORD_LIST_TOO_LARGE is 18.
SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


def record_bytes(
    value: bytes, key: bytes | None, headers: Sequence[tuple[str, str | bytes | None]]
) -> int:
    """A record's size as `message.max.bytes` and `max.message.bytes` count it (a bound)."""
    framing = sum(len(name.encode()) + len(data or b"") + 10 for name, data in headers)
    return len(value) + len(key or b"") + framing + RECORD_OVERHEAD_BYTES


def is_size_error(err: KafkaError) -> bool:
    return err.code() in SIZE_ERRORS


class RecordLimit:
    """The largest record known to fit a topic, for a producer configured with `config`.

    Asks the cluster for the topic's `max.message.bytes` (DescribeConfigs) at most every
    DESCRIBE_EVERY_S; a cluster that does not answer (no ACL, a broker without the API) leaves
    the producer's limit and the refusals. Thread-safe.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str,
        admin_config: Callable[[], dict[str, Any]],
    ) -> None:
        self.topic = topic
        self.producer_max = int(config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))
        self._admin_config = admin_config
        self._lock = threading.Lock()
        self._topic_max: int | None = None
        self._described_at: float | None = None
        self._refused: int | None = None

    def bytes(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._described_at is None or now - self._described_at >= DESCRIBE_EVERY_S:
                self._described_at = now
                self._topic_max = self._describe()
            known = [self.producer_max, self._topic_max, self._refused]
            return min(n for n in known if n is not None)

    def refused(self, size_bytes: int) -> int:
        """A record of `size_bytes` was refused for its size; returns the limit now known."""
        with self._lock:
            bound = size_bytes - 1
            self._refused = bound if self._refused is None else min(self._refused, bound)
        return self.bytes()

    def _describe(self) -> int | None:
        resource = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
        try:
            admin = AdminClient(self._admin_config())
            futures = admin.describe_configs([resource], request_timeout=DESCRIBE_TIMEOUT_S)
            entries = futures[resource].result(timeout=DESCRIBE_TIMEOUT_S + 1)
            entry = entries.get("max.message.bytes")
            value = None if entry is None or entry.value is None else int(entry.value)
        except (KafkaException, ValueError, TypeError, TimeoutError) as exc:
            log.info(
                "topic %r: max.message.bytes not readable (%s); dead letters are sized by the"
                " producer's message.max.bytes (%d) and the broker's refusals",
                self.topic,
                exc,
                self.producer_max,
            )
            return None
        # A cluster that stores only explicitly set topic configs (Tansu) has no entry: unknown.
        return value if value is not None and value > 0 else None
