"""The Kafka source's consumer: its configuration, which `validate --connect` uses as well, and
Lambda's starting positions for partitions the consumer group never committed an offset for."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka import config as cfg
from connectors.kafka.client import DriverLog, log, reason_of

# How long a fetch waits at the broker for new data (librdkafka's default is 500 ms). A resumed
# partition joins the next fetch only, so a long wait makes every resume stall the partition.
DEFAULT_FETCH_WAIT_MAX_MS = 100
# librdkafka backs the fetcher off for fetch.queue.backoff.ms (1 s by default) whenever its local
# queue is full; a poller draining fast then waits idle for that second (measured: 1.7x the
# throughput at 10 ms, bench/results/stages-thread.md).
DEFAULT_FETCH_QUEUE_BACKOFF_MS = 10
# Bound on broker round trips made inside rebalance callbacks (committed offsets, offset lookup
# by time): the callback runs on the poll thread, which must keep polling.
CALLBACK_TIMEOUT_S = 10.0


def consumer_config(
    src: cfg.KafkaSource,
    group: str,
    client_id: str,
    on_error: Callable[[KafkaError], None],
    logger: DriverLog,
) -> dict[str, Any]:
    """The source's consumer configuration, which `validate --connect` reaches the cluster with
    as well: the runtime's defaults, client_config over them, what the runtime owns over both."""
    return {
        "bootstrap.servers": src.bootstrap_servers,
        "group.id": group,
        "client.id": client_id,
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": DEFAULT_FETCH_WAIT_MAX_MS,
        "fetch.queue.backoff.ms": DEFAULT_FETCH_QUEUE_BACKOFF_MS,
        **src.client_config,
        # Owned by the runtime (config validation rejects them in client_config): offsets are
        # committed by hand once records settle, and end-of-partition events tell when a
        # partition is caught up. AT_TIMESTAMP falls back to the earliest offset where no offset
        # matches the time.
        "auto.offset.reset": "latest" if src.starting_position == "LATEST" else "earliest",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "error_cb": on_error,
        "logger": logger,
    }


def missing_topics(metadata: Any, topics: Sequence[str]) -> list[str]:
    """The topics named in `topics` that the cluster does not have (a regex subscription, "^...",
    matches whatever exists)."""
    return [
        t
        for t in topics
        if not t.startswith("^")
        and (t not in metadata.topics or metadata.topics[t].error is not None)
    ]


def fresh_partitions(
    consumer: Consumer,
    partitions: list[TopicPartition],
    starting_position: str,
    starting_timestamp_ms: int | None,
    mapping: str,
) -> tuple[list[TopicPartition], int]:
    """LATEST / AT_TIMESTAMP for partitions the group has no committed offset for, while they
    are being assigned: AT_TIMESTAMP sets the offset of `partitions` to the first record at or
    after the time. Returns those partitions, and the time (ms) before which their records
    are to be skipped."""
    try:
        committed = consumer.committed(partitions, timeout=CALLBACK_TIMEOUT_S)
    except KafkaException as exc:
        # librdkafka resumes from the committed offset by itself; without knowing whether
        # there is one, leave the partitions to it rather than risk skipping records.
        log.warning(
            "mapping %s: could not read committed offsets (%s); %s applies only where"
            " librdkafka finds none",
            mapping,
            reason_of(exc),
            starting_position,
        )
        return [], 0
    fresh = [tp for tp in committed if tp.offset < 0]
    if not fresh:
        return [], 0
    if starting_position == "LATEST":
        since = int(time.time() * 1000)
    else:
        assert starting_timestamp_ms is not None
        since = starting_timestamp_ms
        _seek_by_time(consumer, partitions, fresh, since, mapping)
    return fresh, since


def _seek_by_time(
    consumer: Consumer,
    partitions: list[TopicPartition],
    fresh: list[TopicPartition],
    since_ms: int,
    mapping: str,
) -> None:
    query = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in fresh]
    try:
        found = consumer.offsets_for_times(query, timeout=CALLBACK_TIMEOUT_S)
    except KafkaException as exc:
        log.warning(
            "mapping %s: offset lookup by time failed (%s); reading from the earliest offset"
            " and skipping older records",
            mapping,
            reason_of(exc),
        )
        return
    # -1: no record at or after the time, so start at the end (Kafka's ListOffsets).
    offsets = {
        (tp.topic, tp.partition): tp.offset if tp.offset >= 0 else OFFSET_END for tp in found
    }
    for tp in partitions:
        offset = offsets.get((tp.topic, tp.partition))
        if offset is not None:
            tp.offset = offset
