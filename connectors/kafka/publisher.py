"""Replayed records produced back onto a Kafka source (`workers dlq replay --to source`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from connectors.kafka import config as cfg
from connectors.kafka.client import (
    CONNECT_TIMEOUT_S,
    DriverLog,
    KafkaUnavailable,
    Throttled,
    log,
    producer_settings,
    reason_of,
)
from connectors.kafka.producer import DEFAULT_MESSAGE_TIMEOUT_MS, ConfirmedProducer
from connectors.kafka.shape import KafkaMeta
from workers.engine.letters import REPLAY_HEADER
from workers.engine.ports import ConnectorConfigError
from workers.engine.records import Record
from workers.engine.routing import ReplayRoutes


class KafkaSourcePublisher:
    """Produces replayed records back onto the source (`workers dlq replay --to source`).

    A record goes to the topic and partition it was read from, so records of one key stay in
    order within their partition, with its key and headers plus `esm-replay-count` (replacing an
    older one): the source hands it on as a header, so a record failing again is dead-lettered
    with its replay count. Where that partition no longer exists the key partitioner chooses;
    a record from a topic the mapping no longer reads, or from another broker's letter, goes to
    the mapping's first topic. Records get new timestamps: they are new deliveries, and
    `maximum_record_age_s` counts from the replay. `acks=all` and idempotence: confirmed records
    are on every in-sync replica, and retries neither duplicate nor reorder them.
    """

    def __init__(self, src: cfg.KafkaSource) -> None:
        self.topics = list(dict.fromkeys(src.topics))
        self.servers = src.bootstrap_servers
        self._errors = Throttled(log, f"replay producer to {src.bootstrap_servers}: ")
        self.config: dict[str, Any] = {
            "bootstrap.servers": src.bootstrap_servers,
            "client.id": "esm-workers-replay",
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
            **producer_settings(src.client_config),
            "enable.idempotence": True,
            "acks": "all",
            "error_cb": self._on_error,
            "logger": DriverLog(self._errors),
        }
        self._sender = ConfirmedProducer(self.config, "replayed records")
        self._partitions: dict[str, int] = {}
        self._routes = ReplayRoutes(
            self.servers, self._reads, [t for t in self.topics if not t.startswith("^")]
        )

    def _on_error(self, err: KafkaError) -> None:
        self._errors.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        if not records:
            return
        count = str(replay_count).encode()
        messages = []
        for record in records:
            topic, partition = self._target(record)
            headers = [(n, v) for n, v in record.headers if n != REPLAY_HEADER]
            headers.append((REPLAY_HEADER, count))
            message: dict[str, Any] = {
                "topic": topic,
                "value": record.value,
                "key": record.key,
                "headers": headers,
            }
            if partition is not None:
                message["partition"] = partition
            messages.append(message)
        self._sender.send(messages, f"the source at {self.servers}")

    def _target(self, record: Record) -> tuple[str, int | None]:
        """The topic and partition for a record; None: the key partitioner chooses."""
        meta = record.meta
        origin = meta.topic if isinstance(meta, KafkaMeta) else record.source
        topic = self._routes.target(origin, record)
        if isinstance(meta, KafkaMeta) and topic == meta.topic:
            partition = meta.partition
            if partition < self._partition_count(topic):
                return topic, partition
            self._routes.warn_once(
                f"{topic}-{partition}",
                f"partition {partition} of {topic} no longer exists; the key partitioner"
                " chooses for its records",
            )
            return topic, None
        self._partition_count(topic)  # fails readably when it does not exist
        return topic, None

    def _reads(self, topic: str) -> bool:
        return any(re.match(t, topic) if t.startswith("^") else t == topic for t in self.topics)

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            try:
                metadata = self._sender.producer().list_topics(topic, timeout=CONNECT_TIMEOUT_S)
            except KafkaException as exc:
                raise KafkaUnavailable(
                    f"cannot reach bootstrap servers {self.servers}: {reason_of(exc)}"
                ) from None
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                reason = found.error.str() if found is not None and found.error else "missing"
                raise ConnectorConfigError(f"topic {topic!r} not found at {self.servers}: {reason}")
            count = self._partitions[topic] = len(found.partitions)
        return count

    def close(self) -> None:
        self._sender.close()
