"""The RabbitMQ destination: dead letters published with publisher confirms."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import pika

from connectors.rabbitmq import config as cfg
from connectors.rabbitmq.connection import ConfirmedChannel
from workers.engine.letters import letter_labels
from workers.engine.records import Record
from workers.engine.redact import redact_url

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping


class RabbitMQDestination:
    """Publishes dead letters with publisher confirms; `deliver` returns once the broker has
    taken responsibility for the letter (https://www.rabbitmq.com/docs/confirms)."""

    def __init__(self, dst: cfg.RabbitMQDestination, mapping: EventSourceMapping) -> None:
        self.url = dst.url
        self.exchange = dst.exchange
        self.routing_key = dst.routing_key
        self.mapping = mapping.name
        self._where = (
            f"exchange {self.exchange or '(default)'!r} routing key {self.routing_key!r}"
            f" at {redact_url(self.url)}"
        )
        self._lock = threading.Lock()
        self._channel = ConfirmedChannel(
            self.url, f"esm-workers {self.mapping} dead letters", self._where
        )

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        body = orjson.dumps(letter)
        request = letter.get("requestContext") or {}
        headers: dict[str, Any] = {
            **letter_labels(letter, self.mapping),
            "esm-batch-size": len(records),
        }
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent.value,
            headers=headers,
            message_id=request.get("requestId"),
            timestamp=int(time.time()),
            app_id="esm-workers",
        )
        with self._lock:
            self._channel.publish(
                [(self.exchange, self.routing_key, body, properties)],
                "the dead letter",
                f"no queue bound for {self._where}",
            )

    def close(self) -> None:
        with self._lock:
            self._channel.reset()
