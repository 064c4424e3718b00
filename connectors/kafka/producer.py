"""A confluent-kafka producer that returns once the cluster confirmed what it sent, shared by
the dead-letter destination, the replay state of the dead-letter store and the replay publisher."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from connectors.kafka.client import reason_of
from connectors.kafka.limits import is_size_error

# Dead letters not confirmed in this time fail, and the engine retries them with backoff; kept
# well below librdkafka's 300 s default so that a stuck producer never holds up a drain.
DEFAULT_MESSAGE_TIMEOUT_MS = 10_000
# Producer errors after which a new producer is needed: an idempotent producer whose id the
# broker forgot (e.g. after a restart) otherwise keeps failing (docs/brokers.md).
_RESET_CODES = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._FATAL,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.INVALID_PRODUCER_EPOCH,
}


class KafkaDeliveryError(RuntimeError):
    """A dead letter was not confirmed by the cluster."""


class KafkaRecordTooLarge(KafkaDeliveryError):
    """The producer or the broker refused a record for its size; the same record never fits."""


class ConfirmedProducer:
    """A producer whose `send` returns once the cluster confirmed every message, or raises.

    A message not confirmed in time is purged, so that it is not produced later next to the
    caller's retry, and the producer is replaced, as it is after errors that leave it unusable.
    """

    def __init__(self, config: dict[str, Any], what: str) -> None:
        self.config = config
        self.what = what
        timeout_ms = config.get("delivery.timeout.ms", config.get("message.timeout.ms", 300_000))
        # librdkafka reports a definite failure after message.timeout.ms; wait a little longer.
        self.timeout_s = float(timeout_ms) / 1000 + 5.0
        self._lock = threading.Lock()
        self._producer: Producer | None = None

    def producer(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = Producer(dict(self.config))
            return self._producer

    def send(self, messages: Sequence[dict[str, Any]], where: str) -> None:
        """Produce `messages` (keyword arguments of `Producer.produce`), in order."""
        outcome: list[KafkaError | None] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            outcome.append(err)

        # One send at a time: a failed producer is replaced here without racing another thread.
        with self._lock:
            producer = self._producer
            if producer is None:
                producer = self._producer = Producer(dict(self.config))
            try:
                for message in messages:
                    producer.produce(**message, on_delivery=on_delivery)
            except (KafkaException, BufferError) as exc:
                self._discard(producer)
                first = exc.args[0] if exc.args else None
                too_large = isinstance(first, KafkaError) and is_size_error(first)
                raise (KafkaRecordTooLarge if too_large else KafkaDeliveryError)(
                    f"{self.what} not accepted for {where}: {reason_of(exc)}"
                ) from None
            producer.flush(self.timeout_s)
            if len(outcome) < len(messages):
                self._discard(producer)
                raise KafkaDeliveryError(
                    f"{self.what} not confirmed by {where} within {self.timeout_s:.0f}s"
                )
            errors = [err for err in outcome if err is not None]
            if errors:
                if any(err.fatal() or err.code() in _RESET_CODES for err in errors):
                    self._producer = None
                too_large = any(is_size_error(err) for err in errors)
                raise (KafkaRecordTooLarge if too_large else KafkaDeliveryError)(
                    f"{self.what} refused by {where}: {errors[0].str()}"
                )

    def _discard(self, producer: Producer) -> None:
        producer.purge(in_queue=True, in_flight=True)
        producer.poll(0)
        self._producer = None

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(5.0)
