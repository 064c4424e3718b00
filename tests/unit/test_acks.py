"""The engine's AckCoalescer: settled delivery tags acked in as few frames as AMQP allows, never
an unsettled one, each exactly once, and never a multiple-ack naming a tag already acked."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.acks import AckCoalescer, settled_tags


class Channel:
    """A broker's view of the channel's outstanding tags, failing as RabbitMQ does."""

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self.settled: set[int] = set()
        self.frames: list[tuple[int, bool]] = []

    def deliver(self, tag: int) -> None:
        self.outstanding.add(tag)

    def basic_ack(self, tag: int, multiple: bool) -> None:
        # Naming a tag that is not outstanding closes the channel (PRECONDITION_FAILED).
        assert tag in self.outstanding, f"ack of {tag}, not outstanding"
        acked = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        assert acked <= self.settled, f"acked before settled: {sorted(acked - self.settled)}"
        self.outstanding -= acked
        self.frames.append((tag, multiple))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(tags: int, window: int = 100) -> tuple[AckCoalescer, Channel, Clock]:
    clock = Clock()
    acks = AckCoalescer(window, clock=clock)
    channel = Channel()
    for tag in range(1, tags + 1):
        acks.delivered(tag)
        channel.deliver(tag)
    return acks, channel, clock


def settle(acks: AckCoalescer, channel: Channel, *tags: int) -> None:
    channel.settled.update(tags)
    acks.settled(list(tags))
    acks.flush(channel.basic_ack)


def test_a_contiguous_run_is_one_multiple_ack() -> None:
    acks, channel, _ = setup(500)
    settle(acks, channel, *range(1, 501))
    assert channel.frames == [(500, True)]
    assert not channel.outstanding


def test_tags_above_a_gap_wait_for_the_run_to_reach_them() -> None:
    acks, channel, _ = setup(6)
    settle(acks, channel, 1, 2, 4, 5)
    assert channel.frames == [(2, True)]
    settle(acks, channel, 3)
    assert channel.frames == [(2, True), (5, True)]
    assert channel.outstanding == {6}


def test_held_tags_are_acked_alone_once_held_long_enough() -> None:
    acks, channel, clock = setup(6)
    settle(acks, channel, 2, 3)
    assert channel.frames == []
    clock.now = 0.6
    acks.flush(channel.basic_ack)
    assert channel.frames == [(2, False), (3, False)]
    # The run passes them later; the multiple-ack names a tag that is still outstanding.
    settle(acks, channel, 1, 4)
    assert channel.frames[-1] == (4, True)
    assert channel.outstanding == {5, 6}


def test_half_the_window_held_is_acked_at_once() -> None:
    acks, channel, _ = setup(10, window=4)
    settle(acks, channel, 3)
    assert channel.frames == []
    settle(acks, channel, 4)
    assert channel.frames == [(3, False), (4, False)]


def test_final_acks_everything_settled() -> None:
    acks, channel, _ = setup(5)
    settle(acks, channel, 1, 3, 5)
    acks.flush(channel.basic_ack, final=True)
    assert channel.frames == [(1, True), (3, False), (5, False)]
    assert channel.outstanding == {2, 4}


def test_a_new_channel_starts_again() -> None:
    acks, channel, _ = setup(3)
    settle(acks, channel, 2)
    acks.reset()
    channel = Channel()
    for tag in (1, 2):
        acks.delivered(tag)
        channel.deliver(tag)
    settle(acks, channel, 1, 2)
    assert channel.frames == [(2, True)]


def test_settled_tags_by_position() -> None:
    live = {10: 1, 11: 2, 12: 3}
    assert settled_tags(live, [10, 12, 13]) == ([1, 3], 1)
    assert live == {11: 2}


@settings(max_examples=300, deadline=None)
@given(
    order=st.permutations(list(range(1, 41))),
    cuts=st.lists(st.integers(1, 40), max_size=8),
    ticks=st.lists(st.booleans(), min_size=10, max_size=10),
    window=st.integers(2, 60),
)
def test_any_settling_order_acks_each_tag_once(
    order: list[int], cuts: list[int], ticks: list[bool], window: int
) -> None:
    acks, channel, clock = setup(40, window)
    bounds = sorted({0, 40, *cuts})
    for i, (a, b) in enumerate(pairwise(bounds)):
        if ticks[i % len(ticks)]:
            clock.now += 0.3
        settle(acks, channel, *order[a:b])
    acks.flush(channel.basic_ack, final=True)
    assert not channel.outstanding
    singles = [tag for tag, multiple in channel.frames if not multiple]
    assert len(singles) == len(set(singles))
