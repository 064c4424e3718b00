"""What every contract mixin builds on: the hooks a source's test class provides, and helpers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from workers.engine.ports import Destination, Source
from workers.engine.records import Record


class RecordingListener:
    def __init__(self) -> None:
        self.assigned: set[str] = set()
        self.revoked: set[str] = set()

    def on_assigned(self, units: Collection[str]) -> None:
        self.assigned |= set(units)

    def on_revoked(self, units: Collection[str]) -> None:
        self.revoked |= set(units)


def poll_n(source: Source, n: int, timeout_s: float = 30.0) -> list[Record]:
    """Poll until `n` records arrived (or the timeout passed)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(source.poll(n - len(out), min(0.5, max(0.0, deadline - time.monotonic()))))
    return out


def poll_for(source: Source, duration_s: float) -> list[Record]:
    """Everything that arrives within `duration_s` (to see that something does not)."""
    out: list[Record] = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        out.extend(source.poll(100, min(0.2, max(0.0, deadline - time.monotonic()))))
    return out


def next_positions(records: Sequence[Record]) -> dict[str, int]:
    """Per unit, the position after the last of these records (an offset checkpoint)."""
    last: dict[str, int] = {}
    for r in records:
        last[r.source] = max(last.get(r.source, -1), r.position + 1)
    return last


def by_unit(records: Sequence[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.source, []).append(r)
    return out


def settle(source: Source, records: Sequence[Record]) -> None:
    if source.capabilities.checkpoint == "offset":
        source.commit(next_positions(records))
    else:
        source.ack(records)


class ContractBase:
    """The hooks a source's test class provides for one broker, and what the mixins share.

    A mixin names the capabilities it tests in `needs` (fields of `Capabilities` and the value
    the source must declare); a source whose declaration disagrees fails the test, never skips it.
    """

    needs: ClassVar[Mapping[str, object]] = {}
    # How long a source may take to join and see its first record (Kafka groups take seconds).
    join_timeout_s = 30.0
    # How long to watch for records that must not arrive, once the source has read the others.
    quiet_s = 1.0
    # The broker counts deliveries, so a record delivered again says so in `Record.attempts`.
    delivery_counts = False
    # How long the poller must find nothing to read before a run stops (`--until-idle`).
    idle_s = 1.0

    def make_source(self, name: str) -> Source:
        raise NotImplementedError

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        raise NotImplementedError

    def make_destination(self, name: str) -> Destination:
        raise NotImplementedError

    def dead_letter_values(self, name: str) -> list[bytes]:
        """Values of every record in the destination's letters (read back from the broker)."""
        raise NotImplementedError

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        """The record values of a handler event of this broker's shape."""
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------------

    def fresh(self) -> str:
        return f"contract-{uuid.uuid4().hex[:10]}"

    @classmethod
    def required_capabilities(cls) -> dict[str, object]:
        """What the mixed-in contracts need of the source, merged over the class's bases."""
        out: dict[str, object] = {}
        for klass in reversed(cls.__mro__):
            out.update(vars(klass).get("needs", {}))
        return out

    def check_capabilities(self, source: Source) -> None:
        for name, value in self.required_capabilities().items():
            declared = getattr(source.capabilities, name)
            assert declared == value, (
                f"{type(self).__name__} runs the contract for {name}={value!r},"
                f" but {type(source).__name__} declares {name}={declared!r}"
            )

    def opened(self, name: str) -> tuple[Source, RecordingListener]:
        source = self.make_source(name)
        self.check_capabilities(source)
        listener = RecordingListener()
        source.open(listener)
        return source, listener
