"""`workers validate --connect` for a Kafka dead-letter topic: it exists and can be written, so a
mapping never starts with letters that nothing can store (they would stall their partition until
it is fixed)."""

from __future__ import annotations

from typing import Any

from connectors.kafka import config as cfg
from workers.engine.probing import CONNECT_TIMEOUT_S, DestinationUnusable


def probe_destination(dst: cfg.KafkaDestination) -> str:
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []
    producer = Producer(
        {
            "bootstrap.servers": dst.bootstrap_servers,
            **_producer_settings(dst.client_config),
            "error_cb": lambda err: errors.append(err.str()),
        }
    )
    servers = dst.bootstrap_servers
    try:
        # Every topic, not just this one: a request naming a missing topic makes brokers with
        # auto.create.topics.enable create it, and the check would create what it checks.
        metadata = producer.list_topics(timeout=CONNECT_TIMEOUT_S)
    except KafkaException as exc:
        producer.poll(0)
        reason = errors[-1] if errors else str(exc.args[0] if exc.args else exc)
        raise DestinationUnusable(f"cannot reach bootstrap servers {servers}: {reason}") from None
    topic = metadata.topics.get(dst.topic)
    if topic is None or topic.error is not None:
        reason = topic.error.str() if topic is not None and topic.error else "missing"
        raise DestinationUnusable(
            f"dead-letter topic {dst.topic!r} at {servers}: {reason}"
            " (esm-workers does not create it)"
        )
    return f"topic {dst.topic!r} at {servers} exists"


def _producer_settings(client_config: dict[str, Any]) -> dict[str, Any]:
    """The destination's client settings that a producer takes (consumer-only ones warn)."""
    from connectors.kafka.connector import _CONSUMER_ONLY

    return {k: v for k, v in client_config.items() if not _CONSUMER_ONLY.match(k)}
