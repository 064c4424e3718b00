"""Dead letters to a Kafka topic: one JSON record each, returned from once the cluster confirmed
it, sized against the topic's limit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import KafkaError

from connectors.kafka import config as cfg
from connectors.kafka.client import (
    DriverLog,
    Headers,
    Throttled,
    consumer_settings,
    log,
    producer_settings,
)
from connectors.kafka.limits import RecordLimit, record_bytes
from connectors.kafka.producer import (
    DEFAULT_MESSAGE_TIMEOUT_MS,
    ConfirmedProducer,
    KafkaRecordTooLarge,
)
from connectors.kafka.shape import KafkaMeta
from workers.engine.letters import letter_labels
from workers.engine.lettersize import PAYLOAD_OMITTED
from workers.engine.ports import LetterTooLarge
from workers.engine.records import Record

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# The header naming the mapping a dead letter belongs to (a topic may hold several mappings').
# Room `max_letter_bytes` leaves for a letter's headers (mapping, condition, error type, source
# topic, partition and offset) and its framing; `deliver` checks the exact size.
LETTER_ENVELOPE_BYTES = 1024


class KafkaDestination:
    """Produces each dead letter as one JSON record and returns once the cluster confirmed it.

    `enable.idempotence` and `acks=all` by default (client_config can override them), so a
    confirmed letter is on every in-sync replica and retries do not duplicate it.
    """

    def __init__(self, dst: cfg.KafkaDestination, mapping: EventSourceMapping) -> None:
        if dst.bootstrap_servers is None:
            raise ValueError(
                f"mapping {mapping.name}: the Kafka destination has no bootstrap_servers"
            )
        self.topic = dst.topic
        self.servers = dst.bootstrap_servers
        self.mapping = mapping.name
        self._errors = Throttled(log, f"mapping {mapping.name}: dead-letter producer: ")
        self.config: dict[str, Any] = {
            "bootstrap.servers": dst.bootstrap_servers,
            "client.id": f"esm-workers-{mapping.name}-dlq",
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
            **producer_settings(dst.client_config),
            "error_cb": self._on_error,
            "logger": DriverLog(self._errors),
        }
        # Dead letters are rare: one at a time.
        self._sender = ConfirmedProducer(self.config, "dead letter")
        self.timeout_s = self._sender.timeout_s
        self._limit = RecordLimit(self.config, self.topic, self._admin_config)

    def _admin_config(self) -> dict[str, Any]:
        return consumer_settings(self.config)

    def max_letter_bytes(self) -> int | None:
        """The topic's limit less room for the headers (a key as large again is checked when
        the letter is delivered)."""
        return max(0, self._limit.bytes() - LETTER_ENVELOPE_BYTES)

    def _on_error(self, err: KafkaError) -> None:
        self._errors.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        body = orjson.dumps(letter)
        headers: Headers = [
            (name, value.encode()) for name, value in letter_labels(letter, self.mapping).items()
        ]
        key: bytes | None = None
        if records:
            first = records[0]
            key = first.key
            meta = first.meta
            topic, partition = (
                (meta.topic, meta.partition) if isinstance(meta, KafkaMeta) else (first.source, 0)
            )
            headers += [
                ("esm-source-topic", topic.encode()),
                ("esm-source-partition", str(partition).encode()),
                ("esm-source-offset", str(first.position).encode()),
            ]
        size = record_bytes(body, key, headers)
        limit = self._limit.bytes()
        if size > limit and key is not None and letter.get(PAYLOAD_OMITTED):
            # The key only spreads letters over partitions: a letter without payload that its
            # record's key alone makes too large goes without it.
            key = None
            size = record_bytes(body, key, headers)
        where = f"topic {self.topic!r} at {self.servers}"
        if size > limit:
            # librdkafka would refuse it too (message.max.bytes), or a broker enforcing the
            # topic's max.message.bytes: sending it cannot succeed.
            raise LetterTooLarge(
                f"a letter of {size} bytes is over the limit of {limit} bytes for {where}",
                limit - (size - len(body)),
            )
        message = {"topic": self.topic, "value": body, "key": key, "headers": headers}
        try:
            self._sender.send([message], where)
        except KafkaRecordTooLarge as exc:
            limit = self._limit.refused(size)
            raise LetterTooLarge(str(exc), limit - (size - len(body))) from None

    def close(self) -> None:
        self._sender.close()
