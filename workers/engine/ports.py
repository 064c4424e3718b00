"""The connector contract: what a broker module implements so the engine can drive it.

A source polls records, reports its assignment and checkpoints what the engine says has settled;
a destination durably stores dead letters; an event shape turns records into the Lambda event a
handler expects. Connectors never decide policy (retry, bisect, dead-letter): the engine does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from workers.engine.outcomes import ErrorInfo
from workers.engine.records import Record
from workers.engine.rewind import Rewinder

# errorType of the letter of a message the connector could not convert.
UNDECODABLE_ERROR_TYPE = "Runtime.UndecodableRecord"


class ConnectorConfigError(RuntimeError):
    """The broker setup or configuration cannot work as it is; retrying will not help."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a source can do, declared as data so the engine can plan around it."""

    # Records of one source unit (partition, stream) must reach the handler in order, and a
    # partial batch response retries from the lowest failed record (Lambda's ordered semantics).
    ordered: bool
    # "offset": the engine commits, per source unit, the next position to read once every record
    # before it has settled. "ack": the engine acknowledges each settled record by itself.
    checkpoint: Literal["offset", "ack"]
    # The source can stop fetching some units while others keep flowing.
    pausable: bool = False
    # (source, position) names the same message on every delivery (a Kafka offset, a Redis
    # entry id). Otherwise `Source.fingerprint` tells a message again after a redelivery.
    stable_positions: bool = True
    # The broker can take a record back and deliver it again after a delay, counting its
    # deliveries (`Source.release`; SQS's ChangeMessageVisibility and ApproximateReceiveCount).
    # A retry then waits out its backoff in the broker rather than in the poller, so it survives
    # a restart; and with no on-failure destination, a record that exhausts its retries is
    # handed back for the broker's own dead-letter policy (SQS's redrive policy), never dropped.
    broker_retries: bool = False


class EventShape(Protocol):
    """Builds Lambda's event for a batch and reads `batchItemFailures` identifiers back."""

    # Name of the batch-info section of the dead-letter record, e.g. "KafkaBatchInfo".
    batch_info_name: str

    def event(self, records: Sequence[Record]) -> dict[str, Any]:
        """The handler's event for these records, exactly as Lambda shapes it."""
        ...

    def records(self, event: dict[str, Any]) -> list[Record]:
        """The records an event of this shape carries (for replaying stored dead letters)."""
        ...

    def item_key(self, record: Record) -> Hashable:
        """A hashable form of the record's `itemIdentifier`."""
        ...

    def item_identifier(self, record: Record) -> Any:
        """The record's `itemIdentifier` as a handler would return it (an object of coordinates
        for the stream shapes, the `messageId` string for SQS-shaped events)."""
        ...

    def parse_item(self, identifier: Any) -> Hashable | None:
        """`item_key` of the record an identifier names, or None when it is malformed."""
        ...

    def batch_info(self, records: Sequence[Record]) -> dict[str, Any]:
        """The `<Broker>BatchInfo` section of a dead-letter record for these records."""
        ...

    def filter_view(self, record: Record) -> dict[str, Any]:
        """The document filter patterns are matched against (value decoded from JSON if it is)."""
        ...


@runtime_checkable
class PackingShape(Protocol):
    """Optional part of an `EventShape`: a batch packed into compact columns for an environment
    in another process, which builds Lambda's event there (`unpacker(pack(records))` equals
    `event(records)`), so the poller's core does not build per-record dicts or encode JSON."""

    # "module:function" the environment imports to turn `pack`'s bytes into the event.
    unpacker: str

    def pack(self, records: Sequence[Record]) -> bytes: ...


@runtime_checkable
class FieldedShape(Protocol):
    """Optional part of an `EventShape` whose records are made of named fields (Redis entries)."""

    def handler_fields(self, record: Record) -> dict[str, bytes]:
        """The record's fields as `workers.events.EventRecord.fields` holds them."""
        ...


@runtime_checkable
class OrderAwareShape(Protocol):
    """Optional part of an `EventShape` whose sources are not all ordered (queues): it tells,
    from records alone, whether they must be handled in order. A shape without it is ordered.
    `workers dlq replay` asks it of a letter's records."""

    def ordered(self, records: Sequence[Record]) -> bool:
        """True if a failure must hold up the records after it (a partial response is retried
        from the first failed record), as on a Kafka partition or an SQS FIFO group."""
        ...


class AssignmentListener(Protocol):
    """Told by a source when its assignment changes (consumer-group rebalances)."""

    def on_assigned(self, units: Collection[str]) -> None: ...

    def on_revoked(self, units: Collection[str]) -> None:
        """Called before `units` are released; returns once their in-flight work is settled."""
        ...


class Source(Protocol):
    """One poller's connection to a topic, queue or set of streams.

    The one threading rule: the engine calls every method from the poller's loop thread only
    (the assignment listener, too, is called back on that thread, from inside `poll`), except
    `fingerprint`, which must not touch the driver, and the optional `wake`.
    """

    capabilities: Capabilities
    shape: EventShape
    # Driver errors after which reconnecting and trying again makes sense.
    retryable_errors: tuple[type[BaseException], ...]

    def open(self, listener: AssignmentListener) -> None:
        """Connect and join; raises a retryable error when the broker cannot be reached."""
        ...

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to `max_records` records, waiting at most `timeout_s` for the first one.

        `max_records == 0` keeps the connection serviced (heartbeats, rebalances) and returns [].
        """
        ...

    def commit(self, positions: Mapping[str, int]) -> None:
        """Offset checkpoint: `positions[unit]` is the next position to read after a restart.

        Positions only move forward; the engine commits a position once every record before it
        has settled. Also called from inside `on_revoked`, before the units are released.
        """
        ...

    def ack(self, records: Sequence[Record]) -> None:
        """Ack checkpoint: these records have settled and must not be delivered again.

        Each record is acked once, in the order it settled (not necessarily delivery order).
        """
        ...

    def release(self, records: Sequence[Record], delay_s: float) -> None:
        """With `capabilities.broker_retries`: these records have not settled; the broker is to
        deliver them again (to any consumer) once `delay_s` has passed, counting a delivery.

        Each record is released at most once per delivery, and never acked after it.
        """
        ...

    def pause(self, units: Collection[str]) -> None: ...

    def resume(self, units: Collection[str]) -> None: ...

    def assignment(self) -> frozenset[str]:
        """The source units this poller currently owns."""
        ...

    def caught_up(self) -> bool:
        """Joined, assigned and nothing more to read right now (for `--until-idle`)."""
        ...

    def lag(self) -> Mapping[str, int]:
        """Records not yet read per unit, where the broker can tell."""
        ...

    def fingerprint(self, record: Record) -> str:
        """A name for the message that survives redelivery (where positions do not).

        Called from worker threads: a pure function of the record.
        """
        ...

    def close(self) -> None: ...

    # Optional: `wake()`, callable from any thread, makes a `poll` that is blocked in the
    # driver return soon, so that records settled meanwhile are checkpointed promptly. Without
    # it they wait for the poll's timeout (at most 50 ms while batches are in flight).


class LetterTooLarge(Exception):
    """The destination refused a letter for its size: sending the same letter again cannot help.

    `limit_bytes` is the largest letter (its JSON body) the destination is now known to take,
    or None when the refusal did not say; the engine then splits the letter or drops its payload.
    """

    def __init__(self, message: str, limit_bytes: int | None = None) -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes


# A broker that pushes messages up to a window of unacked ones (AMQP's prefetch): the window a
# mapping gets when it does not set one. Four rounds of batches: one in flight, one waiting, and
# two the broker may send meanwhile. With two, the broker stood idle while a round was invoked
# (RabbitMQ, batches of 500: 23.5k records/s at 1,000 against 27.8k at 2,000).
MIN_PREFETCH = 100
MAX_PREFETCH = 5000


def prefetch_window(batch_size: int, parallelization_factor: int) -> int:
    """Four times `batch_size x parallelization_factor`, between 100 and 5000, and never below
    one batch (or a batch could only fill up by its window running out)."""
    wanted = 4 * batch_size * parallelization_factor
    return max(min(max(wanted, MIN_PREFETCH), MAX_PREFETCH), batch_size)


def undecodable(
    source: str, position: int, raw: bytes, exc: BaseException, **fields: Any
) -> Record:
    """A record for a message that could not be converted, with its coordinates, its raw bytes
    and why; the engine dead-letters it without invoking. `fields` are further `Record` fields
    (meta, timestamp_ms, ...) the connector could still fill in."""
    error = ErrorInfo(UNDECODABLE_ERROR_TYPE, f"{type(exc).__name__}: {exc}"[:1000])
    return Record(source, position, raw, **fields, fault=error)


class Destination(Protocol):
    """An on-failure destination: stores a dead-letter record durably.

    A destination that refuses a letter for its size raises `LetterTooLarge`; one that knows
    its limit beforehand also implements `SizeLimited`, so the engine splits before sending.
    """

    def deliver(self, letter: dict[str, Any], records: Sequence[Record]) -> None:
        """Returns once the letter is durable (confirmed); raises if it could not be stored."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SizeLimited(Protocol):
    """Optional part of a `Destination`: the largest letter it is known to take."""

    def max_letter_bytes(self) -> int | None:
        """Bytes of a letter's JSON body the destination accepts, with room left for its own
        envelope (headers, key), or None when it knows no limit. May ask the broker once."""
        ...


@dataclass(slots=True)
class StoredLetter:
    """A dead-letter record as a store holds it; `handle` is the store's own bookkeeping."""

    id: str  # the letter's requestContext.requestId
    letter: dict[str, Any]
    handle: Any = None


class DeadLetterStore(Protocol):
    """Reads an on-failure destination back, for `workers dlq list/show/replay`."""

    def pending(self) -> Iterator[StoredLetter]:
        """Letters not yet replayed, oldest first, as the destination stands when called.

        Letters added while iterating (a replay that fails again) are not included.
        """
        ...

    def done(self, stored: StoredLetter) -> None:
        """Durably mark a letter replayed: no later `pending()` offers it again."""
        ...

    def close(self) -> None:
        """Release what `pending()` holds; letters not marked done stay for a later replay."""
        ...


class SourcePublisher(Protocol):
    """Puts records back on a mapping's source (`workers dlq replay --to source`)."""

    def publish(self, records: Sequence[Record], replay_count: int) -> None:
        """Publish with the records' keys and headers plus the replay header; returns once the
        broker confirmed them all, raises otherwise."""
        ...

    def close(self) -> None: ...


class SourceBase:
    """Defaults for the optional parts of `Source`; required parts fail loudly."""

    capabilities: Capabilities
    shape: EventShape
    retryable_errors: tuple[type[BaseException], ...] = ()

    def commit(self, positions: Mapping[str, int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not checkpoint by offset")

    def ack(self, records: Sequence[Record]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not checkpoint by ack")

    def release(self, records: Sequence[Record], delay_s: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot hand records back to its broker")

    def pause(self, units: Collection[str]) -> None:
        if units:
            raise NotImplementedError(f"{type(self).__name__} cannot pause")

    def resume(self, units: Collection[str]) -> None:
        if units:
            raise NotImplementedError(f"{type(self).__name__} cannot pause")

    def lag(self) -> Mapping[str, int]:
        return {}

    def fingerprint(self, record: Record) -> str:
        return f"{record.source}@{record.position}"

    def close(self) -> None:
        pass


def lazy(module: str, name: str) -> Callable[..., Any]:
    """`module.name(...)`, importing `module` at the first call: how a connector's descriptor
    names its openers without importing its broker client."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    call.__qualname__ = f"{module}.{name}"
    return call


@dataclass(frozen=True, slots=True)
class Connector:
    """What a connector package registers under the `esm_workers.connectors` entry-point group.

    `name` is the `type` its config models carry. Every opener imports the driver lazily, so
    loading the registry never needs a broker client that a deployment does not use. Parts a
    connector does not offer are None. `mapping` is the mapping's configuration
    (`workers.app.config.EventSourceMapping`), `source`/`destination` its connector settings.
    """

    name: str
    # pydantic models with `type: Literal[name]`, assembled into the configuration's schema.
    source_settings: type[Any] | None = None
    destination_settings: type[Any] | None = None
    # `eventSource` values of the events its shape builds, and the shape that reads one back.
    event_sources: tuple[str, ...] = ()
    shape_for_event: Callable[[dict[str, Any]], EventShape] | None = None
    open_source: Callable[[Any, int], Source] | None = None
    open_destination: Callable[[Any, Any], Destination] | None = None
    open_store: Callable[[Any, Any], DeadLetterStore] | None = None
    open_publisher: Callable[[Any], SourcePublisher] | None = None
    # Connect and disconnect (`workers validate --connect`); raise with a readable message.
    # May return what it found that the mapping should agree with (`probing.SourceFacts`).
    probe_source: Callable[[Any], Any] | None = None
    # The same for a destination; returns what was checked ("topic 'x' at host:9092 exists").
    probe_destination: Callable[[Any], str] | None = None
    # The mapping's consumer group on its source, for `workers rewind`; None where the source
    # keeps no position to move (a queue).
    open_rewinder: Callable[[Any], Rewinder] | None = None
