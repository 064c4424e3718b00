"""`workers validate --connect` for on-failure destinations: the topic, exchange, queue, stream
or directory a mapping's dead letters go to exists and can be written, so a mapping never starts
with letters that nothing can store (they would stall their partition until it is fixed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from connectors.base import ConnectorConfigError
from workers import config as cfg
from workers.config import redact_url

CONNECT_TIMEOUT_S = 5.0


class DestinationUnusable(ConnectorConfigError):
    """The on-failure destination cannot take letters as configured."""


def probe_destination(dst: cfg.Destination) -> str:
    """Check the destination; returns what was checked, raises `DestinationUnusable`."""
    if isinstance(dst, cfg.FileDestination):
        return _probe_file(Path(dst.path))
    if isinstance(dst, cfg.KafkaDestination):
        return _probe_kafka(dst)
    if isinstance(dst, cfg.RabbitMQDestination):
        return _probe_rabbitmq(dst)
    if isinstance(dst, cfg.RedisDestination):
        return _probe_redis(dst)
    raise DestinationUnusable(f"no check for destination type {dst.type!r}")


def _probe_file(directory: Path) -> str:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: a read-only mount or a full disk answers only to that.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".esm-probe-") as probe:
            probe.write(b"{}\n")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise DestinationUnusable(
            f"directory {str(directory)!r} cannot take letters: {exc.strerror or exc}"
        ) from None
    return f"directory {str(directory)!r} is writable"


def _probe_kafka(dst: cfg.KafkaDestination) -> str:
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
    from connectors.kafka import _CONSUMER_ONLY

    return {k: v for k, v in client_config.items() if not _CONSUMER_ONLY.match(k)}


def _probe_rabbitmq(dst: cfg.RabbitMQDestination) -> str:
    import pika
    import pika.exceptions

    from connectors.rabbitmq import _close_quietly, connection_parameters

    where = redact_url(dst.url)
    params = connection_parameters(dst.url, "esm-workers validate")
    params.socket_timeout = CONNECT_TIMEOUT_S
    params.stack_timeout = 2 * CONNECT_TIMEOUT_S
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise DestinationUnusable(f"cannot connect to {where}: {exc!r}") from None
    checked = []
    try:
        # Passive declarations: each checks that the object exists without creating it, and a
        # refusal closes only that channel.
        if dst.exchange:
            _passive(connection, lambda ch: ch.exchange_declare(dst.exchange, passive=True))
            checked.append(f"exchange {dst.exchange!r}")
        queue = dst.letters_queue
        if queue:
            _passive(connection, lambda ch: ch.queue_declare(queue, passive=True))
            checked.append(f"queue {queue!r}")
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise DestinationUnusable(
            f"{where}: {exc.reply_text} (esm-workers does not create dead-letter queues or"
            " exchanges)"
        ) from None
    finally:
        _close_quietly(connection)
    return f"{' and '.join(checked) or 'the default exchange'} at {where} exist"


def _passive(connection: Any, declare: Any) -> None:
    channel = connection.channel()
    declare(channel)
    channel.close()


def _probe_redis(dst: cfg.RedisDestination) -> str:
    import redis

    from connectors.redis import redis_client

    where = redact_url(dst.url)
    client = redis_client(dst.url)
    try:
        # A replica answers reads but refuses XADD: letters need the primary.
        role: Any = client.info("replication").get("role")
        if role != "master":
            raise DestinationUnusable(f"{where} is a read-only {role}: letters cannot be added")
        kind: Any = client.type(dst.stream)
        if kind not in (b"none", b"stream"):
            raise DestinationUnusable(
                f"{where}: key {dst.stream!r} is a {kind.decode()}, not a stream"
            )
    except redis.RedisError as exc:
        raise DestinationUnusable(f"cannot use {where}: {exc}") from None
    finally:
        client.close()
    return f"stream {dst.stream!r} at {where} can take letters"
