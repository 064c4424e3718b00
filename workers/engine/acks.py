"""Acks for one AMQP channel's delivery tags in as few frames as the protocol allows.

An ack per message is a frame and a socket write per message; one ack with `multiple` set acks
every outstanding tag up to the one it names. Settled tags that extend the contiguous run from
the lowest unsettled tag go in one multiple-ack; tags settled above a gap (a record waiting for
its retry, a slower lane) are held back, hoping that the run catches up and covers them, and
acked one by one once held `ACK_HOLD_S`, or once they are `ACK_HOLD_SHARE` of the prefetch
window: the broker sends nothing past the window while they stay unacked.

Used by the RabbitMQ connector (pika) and the kombu connector on AMQP transports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from workers.engine.checkpoint import CheckpointTracker

ACK_HOLD_S = 0.5
ACK_HOLD_SHARE = 0.5
# The one unit of the tracker: the channel's delivery tags.
_TAGS = "tags"


class AckCoalescer:
    """One channel's delivery tags, from delivery to ack. Loop thread only; a new channel
    starts with `reset` (its tags start again at 1)."""

    def __init__(
        self,
        window: int,
        *,
        hold_s: float = ACK_HOLD_S,
        hold_share: float = ACK_HOLD_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._most_held = window * hold_share
        self._hold_s = hold_s
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self._tags = CheckpointTracker()
        self._acked_upto = 0  # every tag at or below it is acked
        self._held: set[int] = set()  # settled, above the run, not acked yet
        self._held_since: float | None = None

    def delivered(self, tag: int) -> None:
        """A tag the broker delivered, in delivery order."""
        self._tags.track(_TAGS, tag)

    def settled(self, tags: list[int]) -> None:
        """Tags of records the engine is done with: to be acked."""
        self._tags.settle(_TAGS, tags)
        self._held.update(tags)

    def flush(self, basic_ack: Callable[[int, bool], object], final: bool = False) -> None:
        """Send what is due with the channel's `basic_ack(delivery_tag, multiple)`."""
        if not self._held:
            return
        multiple, alone = self.due(final)
        if multiple is not None:
            basic_ack(multiple, True)
        for tag in alone:
            basic_ack(tag, False)

    def due(self, final: bool = False) -> tuple[int | None, list[int]]:
        """What to ack now: the tag for one multiple-ack (or None), and tags to ack alone, in
        that order. `final`: everything settled, as the channel is about to close."""
        if not self._held:
            return None, []
        multiple: int | None = None
        upto = self._tags.advance().get(_TAGS, 0) - 1  # every tag below the first unsettled one
        if upto > self._acked_upto:
            self._acked_upto = upto
            covered = [tag for tag in self._held if tag <= upto]
            if covered:
                # The highest tag not acked alone before: a multiple-ack naming a tag that is no
                # longer outstanding closes the channel (PRECONDITION_FAILED).
                # https://www.rabbitmq.com/docs/confirms#consumer-acks-multiple-parameter
                multiple = max(covered)
                self._held = {tag for tag in self._held if tag > upto}
        held = self._held
        if not held:
            self._held_since = None
            return multiple, []
        now = self._clock()
        if self._held_since is None:
            self._held_since = now
        if final or now - self._held_since >= self._hold_s or len(held) >= self._most_held:
            # Acked alone; they stay settled in the tracker, so that the run can pass them, and
            # a later multiple-ack names a tag above them (it acks only outstanding tags).
            alone = sorted(held)
            held.clear()
            self._held_since = None
            return multiple, alone
        return multiple, []


def settled_tags(live: dict[int, int], positions: Iterable[int]) -> tuple[list[int], int]:
    """The delivery tags of settled records by their positions, taken out of `live`, and how
    many had none (their channel is gone, so the broker delivers them again, or they were
    acked before)."""
    tags = []
    missing = 0
    for position in positions:
        tag = live.pop(position, None)
        if tag is None:
            missing += 1
        else:
            tags.append(tag)
    return tags, missing
