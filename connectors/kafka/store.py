"""Reading a Kafka dead-letter topic back for `workers dlq`, with resumable replay progress: a
consumer group's committed offsets, and the letters replayed past them in a compacted topic."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    AdminClient,
    NewTopic,
)

from connectors.kafka import config as cfg
from connectors.kafka.client import (
    CONNECT_TIMEOUT_S,
    DriverLog,
    Headers,
    KafkaFatalError,
    KafkaUnavailable,
    Throttled,
    consumer_settings,
    log,
    producer_settings,
    reason_of,
)
from connectors.kafka.producer import (
    DEFAULT_MESSAGE_TIMEOUT_MS,
    ConfirmedProducer,
    KafkaDeliveryError,
)
from workers.engine.letters import MAPPING_LABEL, belongs_to, parse_letter
from workers.engine.ports import StoredLetter

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# A mapping's replay progress: this consumer group's committed offsets on the dead-letter topic.
REPLAY_GROUP_SUFFIX = "-dlq-replay"
# Letters replayed beyond a group's committed offset (past a letter a filter skipped): one small
# compacted topic per cluster, created by the first replay that needs it (see
# KafkaDeadLetterStore).
REPLAY_STATE_TOPIC = "_esm-dlq-replay-state"
# Reading the topic fails when the cluster sends nothing for this long.
READ_TIMEOUT_S = 30.0
READ_BATCH = 500
READ_WAIT_S = 0.1
READ_FETCH_WAIT_MS = 10
# Records held per partition while partitions are merged oldest first; a partition that runs
# ahead of the others is paused until they catch up.
MERGE_HOLD_RECORDS = 500


@dataclass(slots=True)
class _Progress:
    """Replay progress on one partition of the dead-letter topic, for one `pending()`."""

    end: int  # the partition's end when `pending()` was called
    committed: int | None  # the group's committed offset; None: never committed
    passed: int  # every record before this offset was offered or passed over
    done: set[int]  # offsets replayed beyond the committed one
    offered: set[int] = field(default_factory=set)  # offered and not (yet) marked done
    saved: bool = False  # the state topic holds a record for this partition


class KafkaDeadLetterStore:
    """Reads a dead-letter topic back for `workers dlq`; replay progress is the consumer group
    `<mapping>-dlq-replay` on that topic, so an interrupted replay resumes where it stopped.

    `pending()` only reads: the group's committed offsets (without joining the group), the replay
    state below, and the topic through `assign()`. It takes the end of every partition when
    called, by reading to the end of the partition (some brokers answer ListOffsets inexactly,
    docs/brokers.md), and yields the records from the committed offset (the beginning when there
    is none) up to that end: oldest first by record time across partitions, in offset order
    within one. Letters a replay writes back later wait for the next replay. Records of other
    mappings (`esm-mapping` header or `mapping` field) are passed over silently; records that
    are no dead letter, with a warning.

    `done()` commits, synchronously and per partition, the offset after the longest run of
    records replayed or passed over: a letter offered but not replayed (skipped by `--error-type`
    or `--since`, or not reached before `--limit` or a signal) holds the commit back, so that it
    is offered again. Letters replayed beyond the committed offset are remembered, before the
    commit, in the compacted topic `_esm-dlq-replay-state` (key `<group>/<topic>/<partition>`,
    value their offsets and the committed offset they apply from) and passed over by every later
    `pending()`; the record is ignored once the group's offsets are deleted or reset below it,
    and deleted when the commit passes them all. (Kafka keeps such data in a commit's metadata
    string, but not every Kafka-protocol broker does: Tansu drops it, docs/brokers.md.) Where the
    state cannot be written (no right to create the topic, say), a warning says that those
    letters may be offered again. A crash repeats at most the letter being replayed.

    Two replays of one mapping must not run at the same time.
    """

    def __init__(self, dst: cfg.KafkaDestination, mapping: EventSourceMapping) -> None:
        if dst.bootstrap_servers is None:
            raise ValueError(
                f"mapping {mapping.name}: the Kafka destination has no bootstrap_servers"
            )
        self.topic = dst.topic
        self.servers = dst.bootstrap_servers
        self.mapping = mapping.name
        self.group = f"{mapping.name}{REPLAY_GROUP_SUFFIX}"
        self._where = f"dead-letter topic {self.topic!r} at {self.servers}"
        self._errors = Throttled(log, f"mapping {mapping.name}: dead-letter topic: ")
        self._last_error = ""
        client = {
            "bootstrap.servers": dst.bootstrap_servers,
            "client.id": f"esm-workers-{mapping.name}-dlq-replay",
            "error_cb": self._on_error,
            "logger": DriverLog(self._errors),
        }
        self.config: dict[str, Any] = {
            **client,
            # The end of a partition is known only from an empty fetch, which the broker holds
            # this long waiting for data: librdkafka's 500 ms would be paid on every read.
            "fetch.wait.max.ms": READ_FETCH_WAIT_MS,
            **consumer_settings(dst.client_config),
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
        producer_config = producer_settings(dst.client_config)
        self.state_config: dict[str, Any] = {
            **client,
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
            **producer_config,
            "acks": "all",
        }
        self.admin_config: dict[str, Any] = {
            **client,
            **consumer_settings(producer_config),
        }
        self._consumer: Consumer | None = None
        self._state: ConfirmedProducer | None = None
        self._state_failed = False
        self._progress: dict[int, _Progress] = {}
        # Replayed by this process: passed over by a later `pending()` whatever the state says.
        self._done_ids: set[str] = set()
        self._done_offsets: dict[int, set[int]] = {}

    def _on_error(self, err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            self._last_error = err.str()
        self._errors.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())

    def _require(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(dict(self.config))
        return self._consumer

    def _unreachable(self, what: str, exc: KafkaException) -> KafkaUnavailable:
        reason = self._last_error or reason_of(exc)
        return KafkaUnavailable(f"{self._where}: cannot {what}: {reason}")

    # --- reading -------------------------------------------------------------------------------

    def pending(self) -> Iterator[StoredLetter]:
        consumer = self._require()
        # Everything is taken now, not at the first next(): "as the topic stands when called".
        partitions = self._partitions_of(consumer, self.topic)
        if partitions is None:
            log.info("mapping %s: %s does not exist: no dead letters", self.mapping, self._where)
            return iter(())
        try:
            found = consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], timeout=READ_TIMEOUT_S
            )
        except KafkaException as exc:
            raise self._unreachable(f"read the offsets of group {self.group!r}", exc) from None
        failed = [f"partition {tp.partition}: {tp.error.str()}" for tp in found if tp.error]
        if failed:
            raise KafkaUnavailable(
                f"{self._where}: cannot read the offsets of group {self.group!r}: "
                + "; ".join(failed)
            )
        committed = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        bounds = self._bounds(consumer, self.topic, partitions)
        saved = self._read_state(consumer)
        self._progress = {}
        for p in partitions:
            low, end = bounds[p]
            at = committed.get(p)
            start = min(max(low, at if at is not None else low), end)
            done = {o for o in self._done_offsets.get(p, ()) if o >= start}
            state = saved.get(p)
            # Applies only from the committed offset it was written with: deleting the group or
            # resetting its offsets below that offers those letters again.
            if state is not None and at is not None and state[0] <= at:
                done.update(o for o in state[1] if o >= start)
            self._progress[p] = _Progress(end, at, start, done, saved=state is not None)
        return self._letters(consumer, self._progress)

    def _partitions_of(self, consumer: Consumer, topic: str) -> list[int] | None:
        """The topic's partitions, or None when it does not exist."""
        try:
            metadata = consumer.list_topics(topic, timeout=CONNECT_TIMEOUT_S)
        except KafkaException as exc:
            raise self._unreachable("fetch metadata", exc) from None
        found = metadata.topics.get(topic)
        if found is None or (
            found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            return None
        if found.error is not None:
            raise KafkaUnavailable(f"{self._where}: topic {topic!r}: {found.error.str()}")
        return sorted(found.partitions)

    def _bounds(
        self, consumer: Consumer, topic: str, partitions: list[int]
    ) -> dict[int, tuple[int, int]]:
        """(low watermark, end) of each partition, the end read from the last record batch."""
        lows: dict[int, int] = {}
        starts = []
        for p in partitions:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=READ_TIMEOUT_S
                )
            except KafkaException as exc:
                raise self._unreachable("read the topic's offsets", exc) from None
            lows[p] = low
            if high > low:
                # The listed end may be the start of the last batch plus one (docs/brokers.md).
                starts.append(TopicPartition(topic, p, max(low, high - 1)))
        ends = self._read_to_end(consumer, starts)
        return {p: (lows[p], ends.get(p, lows[p])) for p in partitions}

    def _read_to_end(
        self,
        consumer: Consumer,
        starts: list[TopicPartition],
        on_record: Callable[[Message], None] | None = None,
    ) -> dict[int, int]:
        """Reads the partitions from `starts` to their end-of-partition events; returns the
        ends. `on_record` gets every record before its partition's end."""
        if not starts:
            return {}
        consumer.assign(starts)
        ends: dict[int, int] = {}
        waiting = {tp.partition for tp in starts}
        heard = time.monotonic()
        while waiting:
            messages = consumer.consume(READ_BATCH, READ_WAIT_S)
            heard = self._check_heard(messages, heard)
            for m in messages:
                p = m.partition() or 0
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if p in waiting:
                            ends[p] = m.offset() or 0
                            waiting.discard(p)
                    else:
                        self._read_error(p, err)
                elif p in waiting and on_record is not None:
                    on_record(m)
        consumer.unassign()
        return ends

    def _check_heard(self, messages: list[Message], heard: float) -> float:
        now = time.monotonic()
        if messages:
            return now
        if now - heard > READ_TIMEOUT_S:
            reason = f": {self._last_error}" if self._last_error else ""
            raise KafkaUnavailable(
                f"{self._where}: nothing received for {READ_TIMEOUT_S:.0f}s{reason}"
            )
        return heard

    def _read_error(self, partition: int, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaFatalError(f"{self._where}: {err.str()}")
        self._errors.log(logging.WARNING, f"partition {partition}: {err.str()}")

    def _letters(
        self, consumer: Consumer, progress: dict[int, _Progress]
    ) -> Iterator[StoredLetter]:
        """The letters up to each partition's end, merged oldest first across partitions."""
        topic = self.topic
        reading = {p for p, pr in progress.items() if pr.passed < pr.end}
        if not reading:
            return
        held: dict[int, deque[Message]] = {p: deque() for p in reading}
        paused: set[int] = set()
        seen: set[str] = set()
        consumer.assign([TopicPartition(topic, p, progress[p].passed) for p in sorted(reading)])
        heard = time.monotonic()

        def stop_reading(p: int) -> None:
            reading.discard(p)
            if p not in paused:
                paused.add(p)  # what was appended since `pending()` is not read
                consumer.pause([TopicPartition(topic, p)])

        while reading or any(held.values()):
            if any(not held[p] for p in reading):
                messages = consumer.consume(READ_BATCH, READ_WAIT_S)
                heard = self._check_heard(messages, heard)
                for m in messages:
                    p = m.partition() or 0
                    if p not in reading:
                        continue
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            stop_reading(p)
                        else:
                            self._read_error(p, err)
                        continue
                    offset = m.offset() or 0
                    if offset >= progress[p].end:
                        stop_reading(p)
                        continue
                    held[p].append(m)
                    if offset + 1 >= progress[p].end:
                        stop_reading(p)
                    elif len(held[p]) >= MERGE_HOLD_RECORDS and p not in paused:
                        paused.add(p)
                        consumer.pause([TopicPartition(topic, p)])
                continue
            # Every partition still being read has a record held: the oldest goes first.
            p = min((q for q in held if held[q]), key=lambda q: (held[q][0].timestamp()[1], q))
            m = held[p].popleft()
            if p in reading and p in paused and len(held[p]) <= MERGE_HOLD_RECORDS // 2:
                paused.discard(p)
                consumer.resume([TopicPartition(topic, p)])
            stored = self._stored(p, m, progress[p], seen)
            if stored is not None:
                yield stored

    def _stored(
        self, partition: int, m: Message, progress: _Progress, seen: set[str]
    ) -> StoredLetter | None:
        offset = m.offset() or 0
        progress.passed = offset + 1
        if offset in progress.done:
            return None
        label = next(
            (data for name, data in cast(Headers, m.headers() or []) if name == MAPPING_LABEL),
            None,
        )
        if not belongs_to(self.mapping, label):
            return None  # another mapping's letter on a shared topic
        letter, problem = parse_letter(m.value())
        if letter is None:
            log.warning(
                "mapping %s: %s: record %d@%d skipped, not a dead letter: %s",
                self.mapping,
                self._where,
                partition,
                offset,
                problem,
            )
            return None
        if label is None and not belongs_to(self.mapping, None, letter):
            return None
        letter_id: str = letter["requestContext"]["requestId"]
        if letter_id in self._done_ids or letter_id in seen:
            # A letter written twice (its delivery retried after a lost confirmation).
            return None
        seen.add(letter_id)
        progress.offered.add(offset)
        return StoredLetter(letter_id, letter, handle=(partition, offset))

    # --- progress ------------------------------------------------------------------------------

    def done(self, stored: StoredLetter) -> None:
        handle = stored.handle
        progress = (
            self._progress.get(handle[0])
            if isinstance(handle, tuple) and len(handle) == 2
            else None
        )
        if progress is None:
            raise ValueError(f"letter {stored.id} was not offered by {self._where}")
        partition, offset = handle
        if offset not in progress.offered:
            return  # marked already
        progress.offered.discard(offset)
        self._done_ids.add(stored.id)
        self._done_offsets.setdefault(partition, set()).add(offset)
        # The commit may pass everything up to the first letter still offered, or else up to
        # the last record looked at.
        target = min(progress.offered) if progress.offered else progress.passed
        progress.done = {o for o in progress.done if o >= target}
        if offset >= target:
            progress.done.add(offset)
            # Saved before the commit and applying from the offset committed before it, so a
            # crash between the two loses nothing.
            since = progress.committed if progress.committed is not None else target
            self._save(partition, progress, since)
        if progress.committed is None or target > progress.committed:
            self._commit(partition, target)
            progress.committed = target
        if progress.saved and not progress.done:
            self._save(partition, progress, target)  # nothing beyond the commit: delete it

    def _commit(self, partition: int, offset: int) -> None:
        consumer = self._require()
        try:
            result = consumer.commit(
                offsets=[TopicPartition(self.topic, partition, offset)], asynchronous=False
            )
        except KafkaException as exc:
            raise self._unreachable(f"save replay progress (group {self.group!r})", exc) from None
        failed = [tp for tp in result or [] if tp.error is not None]
        if failed and failed[0].error is not None:
            raise KafkaUnavailable(
                f"{self._where}: cannot save replay progress (group {self.group!r}):"
                f" {failed[0].error.str()}"
            )

    def _state_key(self, partition: int) -> bytes:
        return f"{self.group}/{self.topic}/{partition}".encode()

    def _read_state(self, consumer: Consumer) -> dict[int, tuple[int, set[int]]]:
        """This group's saved state per partition: (committed offset it applies from, done)."""
        partitions = self._partitions_of(consumer, REPLAY_STATE_TOPIC)
        if partitions is None:
            return {}
        prefix = f"{self.group}/{self.topic}/".encode()
        found: dict[int, tuple[int, set[int]] | None] = {}

        def on_record(m: Message) -> None:
            key = m.key()
            if key is None or not key.startswith(prefix) or not key[len(prefix) :].isdigit():
                return
            found[int(key[len(prefix) :])] = _parse_state(m.value())

        starts = [TopicPartition(REPLAY_STATE_TOPIC, p, OFFSET_BEGINNING) for p in partitions]
        self._read_to_end(consumer, starts, on_record)
        return {p: state for p, state in found.items() if state is not None}

    def _save(self, partition: int, progress: _Progress, since: int) -> None:
        """Writes the offsets replayed beyond the commit (a tombstone when there are none)."""
        if self._state_failed:
            return
        value = None
        if progress.done:
            value = orjson.dumps(
                {
                    "group": self.group,
                    "topic": self.topic,
                    "partition": partition,
                    "since": since,
                    "done": _ranges(progress.done),
                }
            )
        message = {"topic": REPLAY_STATE_TOPIC, "key": self._state_key(partition), "value": value}
        try:
            if self._state is None:
                self._create_state_topic()
                self._state = ConfirmedProducer(self.state_config, "replay state")
            self._state.send([message], f"topic {REPLAY_STATE_TOPIC!r} at {self.servers}")
        except (KafkaException, KafkaDeliveryError) as exc:
            self._state_failed = True
            log.warning(
                "mapping %s: %s: letters replayed past one that was not are not remembered"
                " (%s); a later replay may offer them again",
                self.mapping,
                self._where,
                reason_of(exc),
            )
            return
        progress.saved = value is not None

    def _create_state_topic(self) -> None:
        admin = AdminClient(dict(self.admin_config))
        topic = NewTopic(
            REPLAY_STATE_TOPIC,
            num_partitions=1,
            replication_factor=-1,  # the cluster's default
            config={"cleanup.policy": "compact"},
        )
        futures = admin.create_topics(
            [topic], operation_timeout=READ_TIMEOUT_S, request_timeout=READ_TIMEOUT_S
        )
        try:
            futures[REPLAY_STATE_TOPIC].result(timeout=READ_TIMEOUT_S)
        except KafkaException as exc:
            first = exc.args[0] if exc.args else None
            if not (
                isinstance(first, KafkaError) and first.code() == KafkaError.TOPIC_ALREADY_EXISTS
            ):
                raise

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        state, self._state = self._state, None
        if state is not None:
            state.close()
        if consumer is not None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning(
                    "mapping %s: closing the %s reader: %s",
                    self.mapping,
                    self._where,
                    reason_of(exc),
                )


def _ranges(offsets: Collection[int]) -> list[list[int]]:
    """Sorted offsets as inclusive [first, last] runs: {1, 2, 3, 7} -> [[1, 3], [7, 7]]."""
    runs: list[list[int]] = []
    for o in sorted(offsets):
        if runs and runs[-1][1] == o - 1:
            runs[-1][1] = o
        else:
            runs.append([o, o])
    return runs


def _parse_state(raw: bytes | None) -> tuple[int, set[int]] | None:
    """A replay-state record: (committed offset it applies from, offsets done); None for a
    tombstone or a record this version cannot read."""
    if raw is None:
        return None
    try:
        state = orjson.loads(raw)
        since = int(state["since"])
        done = {o for first, last in state["done"] for o in range(int(first), int(last) + 1)}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return since, done
