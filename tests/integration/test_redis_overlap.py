"""The Redis source's overlapped round trips, on a real Redis server: the next XREADGROUP sent
before the records of the last one are made, and XACKs whose replies are read later. Whatever the
budget, pauses, a close or a cut connection do meanwhile, every entry is handed out once, in
order, and acked."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from connectors.redis.source import RedisSource
from tests import brokers
from tests.contract import poll_n
from tests.faults.proxy import TcpProxy
from tests.integration.test_redis import opened, pending_count, produce, wait_for
from workers.engine.records import Record

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.fixture
def stream(names: Callable[[str], str]) -> str:
    return names("ahead")


@pytest.fixture
def group() -> str:
    return brokers.unique_name("redis-ahead")


def delivered(client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    """Entry id -> times delivered, of every pending entry of the group."""
    rows: Any = client.xpending_range(stream, group, "-", "+", 10_000)
    return {row["message_id"].decode(): row["times_delivered"] for row in rows}


def ids_of(records: list[Record]) -> list[str]:
    return [r.meta.entry_id for r in records]


def ack_all(
    source: RedisSource, records: list[Record], client: redis.Redis, stream: str, group: str
) -> None:
    """Ack `records`, poll until the source says it is caught up (which reads every XACK's
    reply), and see that nothing is pending any more."""
    source.ack(records)
    for _ in range(50):
        if source.caught_up():
            break
        source.poll(100, 0.05)
    assert source.caught_up(), "the source never caught up"
    assert pending_count(client, stream, group) == 0


def test_reads_ahead_and_hands_out_every_entry_once_in_order(
    redis_url: str, client: redis.Redis, stream: str, group: str
) -> None:
    ids = produce(client, stream, [{"n": i} for i in range(1000)])
    with closing(opened(redis_url, group, [stream])) as source:
        got = source.poll(100, 1.0)
        assert ids_of(got) == ids[:100]
        # A full reply sent the next read before returning: 100 more are delivered to us.
        assert len(delivered(client, stream, group)) == 200
        source.ack(got)
        budgets = itertools.cycle([100, 30, 250, 70, 100, 1])
        polls = 0
        while len(got) < len(ids) and polls < 500:
            polls += 1
            if polls == 5:
                # A paused stream gets nothing, the read ahead included, until resumed.
                source.pause([stream])
                assert source.poll(100, 0.05) == []
                source.resume([stream])
            batch = source.poll(next(budgets), 0.5)
            source.ack(batch)
            got += batch
        assert ids_of(got) == ids
        ack_all(source, [], client, stream, group)


def test_entries_read_ahead_and_never_handed_out_go_back_as_first_deliveries(
    redis_url: str, client: redis.Redis, stream: str, group: str
) -> None:
    ids = produce(client, stream, [{"n": i} for i in range(300)])
    source = opened(redis_url, group, [stream], consumer_name="c")
    first = source.poll(100, 1.0)  # sends the read of the next 100
    second = source.poll(40, 1.0)  # 40 of them; 60 wait in the source
    assert ids_of(first + second) == ids[:140]
    source.ack(first + second)
    source.close()
    # The 60 never handed out stay pending, uncounted: their next delivery is their first.
    assert delivered(client, stream, group) == dict.fromkeys(ids[140:200], 0)

    with closing(opened(redis_url, group, [stream], consumer_name="c")) as source:
        rest = poll_n(source, 160, 10)
        assert ids_of(rest) == ids[140:]
        assert all(r.attempts == 0 and not r.redelivered for r in rest)
        ack_all(source, rest, client, stream, group)


def test_acks_and_a_read_ahead_cut_off_are_recovered_without_duplicates(
    redis_url: str, client: redis.Redis, stream: str, group: str
) -> None:
    ids = produce(client, stream, [{"n": i} for i in range(40)])
    upstream = client.connection_pool.connection_kwargs
    proxy = TcpProxy((upstream["host"], upstream["port"]))
    through_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    with closing(proxy), closing(opened(through_proxy, group, [stream])) as source:
        first = source.poll(10, 1.0)  # and the next 10 read ahead
        assert ids_of(first) == ids[:10]
        wait_for(lambda: len(delivered(client, stream, group)) == 20, 10, "the read ahead")
        source.ack(first[:5])
        wait_for(lambda: len(delivered(client, stream, group)) == 15, 10, "the first XACK")
        time.sleep(0.1)  # the XACK's reply on its way back through the proxy
        proxy.freeze()
        source.ack(first[5:])  # written, not waited for: it never reaches the server
        second = source.poll(10, 1.0)  # the 10 read ahead; the next read never reaches it
        assert ids_of(second) == ids[10:20]
        proxy.cut()
        proxy.thaw()
        assert set(delivered(client, stream, group)) == set(ids[5:20])
        with pytest.raises(RedisConnectionError):
            source.poll(10, 1.0)  # the reply of the read sent ahead is lost with its connection
        rest = poll_n(source, 20, 10)
        # After reconnecting, the lost XACK is sent again, and nothing handed out before comes
        # back: the entries being processed are in flight, the others were never read.
        assert ids_of(rest) == ids[20:]
        assert set(delivered(client, stream, group)) == set(ids[10:])
        ack_all(source, second + rest, client, stream, group)


def test_a_full_reply_of_one_stream_reads_ahead_without_starving_another(
    redis_url: str, client: redis.Redis, names: Callable[[str], str], group: str
) -> None:
    busy, quiet = names("busy"), names("quiet")
    many = produce(client, busy, [{"n": i} for i in range(400)])
    with closing(opened(redis_url, group, [busy, quiet])) as source:
        got = source.poll(200, 1.0)
        one = produce(client, quiet, [{"n": "late"}])
        while len(got) < 401:
            batch = source.poll(200, 1.0)
            assert batch, "a poll came back empty with entries waiting"
            got += batch
        assert [r.meta.entry_id for r in got if r.source == busy] == many
        assert [r.meta.entry_id for r in got if r.source == quiet] == one
        ack_all(source, got, client, busy, group)
        assert pending_count(client, quiet, group) == 0
