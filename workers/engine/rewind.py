"""The rewind port: what a connector implements so that `workers rewind` can move a mapping's
consumer group back (or forward) on its source, to replay records from there.

Only sources that keep records after delivering them and remember a group's position can do
it (a Kafka topic, a Redis stream); a queue deletes what was acked, so its connector offers no
rewinder. The command decides (refuses while the mapping runs, prints, applies); the connector
speaks its broker's protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

# Where to move the group: the oldest record the source still holds, the end (skip everything
# not yet read), or the first record at or after a time (epoch milliseconds).
RewindTarget = Literal["earliest", "latest"] | int


class RewindRefused(Exception):
    """The rewind cannot be done as asked (a consumer of the group is running, no such unit):
    nothing was changed. The message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Move:
    """One source unit (partition, stream) of a rewind: its position now and after.

    `current` and `new` are positions as the broker names them (an offset, an entry id), or
    "none" where the group has none yet; `note` is what the user should know about this unit
    (an approximate lookup, pending entries).
    """

    unit: str
    current: str
    new: str
    note: str = ""

    @property
    def changes(self) -> bool:
        return self.current != self.new


class Rewinder(Protocol):
    """A mapping's consumer group on its source, opened for `workers rewind` (not by a poller).

    Every method may raise the broker client's errors when it cannot be reached.
    """

    # What the group is called where the broker keeps it ("consumer group orders"), for messages.
    group_label: str
    # How this connector tells a running mapping from a stopped one (for the refusal message).
    running_rule: str

    def running_consumers(self) -> list[str]:
        """Consumers of the group that count as running now, each described in a few words;
        empty when the mapping is stopped."""
        ...

    def plan(self, to: RewindTarget) -> list[Move]:
        """Where each unit of the mapping is and where the rewind would put it; changes nothing.
        Raises `RewindRefused` when it cannot be planned."""
        ...

    def apply(self, moves: Sequence[Move]) -> None:
        """Move each unit to `move.new`, as `plan` planned it; raises if the broker refused."""
        ...

    def close(self) -> None: ...
