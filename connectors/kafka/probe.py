"""`workers validate --connect` for Kafka: the source's cluster is reachable with the source's
own client configuration and has its topics; a dead-letter topic exists and can be written, so a
mapping never starts with letters that nothing can store (they would stall their partition until
it is fixed)."""

from __future__ import annotations

import logging

from confluent_kafka import Consumer, KafkaException, Producer

from connectors.kafka import config as cfg
from connectors.kafka.client import (
    CONNECT_TIMEOUT_S,
    DriverLog,
    KafkaUnavailable,
    Throttled,
    producer_settings,
    reason_of,
)
from connectors.kafka.consumer import consumer_config, missing_topics
from workers.engine.probing import CONNECT_TIMEOUT_S as PROBE_TIMEOUT_S
from workers.engine.probing import DestinationUnusable


def probe_kafka(src: cfg.KafkaSource) -> None:
    """Fetch the cluster's metadata and check that every topic exists; raises readably."""
    errors: list[str] = []
    consumer = Consumer(
        consumer_config(
            src,
            group=src.consumer_group_id or "esm-workers-validate",
            client_id="esm-workers-validate",
            on_error=lambda err: errors.append(err.str()),
            logger=DriverLog(Throttled(logging.getLogger("connectors.kafka.probe"), "")),
        )
    )
    try:
        try:
            metadata = consumer.list_topics(timeout=CONNECT_TIMEOUT_S)
        except KafkaException as exc:
            consumer.poll(0)
            reason = errors[-1] if errors else reason_of(exc)
            raise KafkaUnavailable(
                f"cannot reach bootstrap servers {src.bootstrap_servers}: {reason}"
            ) from None
        missing = missing_topics(metadata, src.topics)
        if missing:
            raise KafkaUnavailable(
                f"topic(s) {', '.join(missing)} not found at {src.bootstrap_servers}"
            )
    finally:
        consumer.close()


def probe_destination(dst: cfg.KafkaDestination) -> str:
    errors: list[str] = []
    producer = Producer(
        {
            "bootstrap.servers": dst.bootstrap_servers,
            **producer_settings(dst.client_config),
            "error_cb": lambda err: errors.append(err.str()),
        }
    )
    servers = dst.bootstrap_servers
    try:
        # Every topic, not just this one: a request naming a missing topic makes brokers with
        # auto.create.topics.enable create it, and the check would create what it checks.
        metadata = producer.list_topics(timeout=PROBE_TIMEOUT_S)
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
