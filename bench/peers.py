"""FastStream on the same workload: batch subscribers where FastStream has them (Kafka
`batch=True`, Redis `StreamSub(batch=True)`, both 500 records), RabbitMQ one message at a time
with acks. The handler does nothing but count; FastStream decodes each JSON body on its own.
Per-message logging is off (`logger=None`), as the engine logs nothing per batch either.

Run as `python -m bench.peers SPEC_JSON`; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from bench.common import BATCH, PREFETCH

TIMEOUT_S = 120.0


class Counter:
    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def started(self) -> float:
        now = time.time()
        if not self.first:
            self.first = now
        return now

    def add(self, n: int) -> None:
        self.count += n
        self.last = time.time()
        if self.count >= self.target:
            self.done.set()


async def _wait(counter: Counter) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(counter.done.wait(), TIMEOUT_S)


async def faststream_kafka(spec: dict[str, Any]) -> Counter:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    counter = Counter(spec["records"])
    broker = KafkaBroker(spec["bootstrap"], logger=None)

    @broker.subscriber(
        spec["topic"],
        group_id=spec["group"],
        batch=True,
        max_records=BATCH,
        auto_offset_reset="earliest",
        session_timeout_ms=spec["session_ms"],
        heartbeat_interval_ms=500,
        ack_policy=AckPolicy.ACK,
    )
    async def handle(body: list[Any]) -> None:
        counter.started()
        counter.add(len(body))

    async with broker:
        await broker.start()
        await _wait(counter)
    return counter


async def faststream_redis(spec: dict[str, Any]) -> Counter:
    from faststream import AckPolicy
    from faststream.redis import RedisBroker, StreamSub

    counter = Counter(spec["records"])
    broker = RedisBroker(spec["url"], logger=None)  # type: ignore[arg-type]  # None: no logs
    stream = StreamSub(
        spec["stream"],
        group=spec["group"],
        consumer="faststream",
        batch=True,
        max_records=BATCH,
        last_id="0",
        polling_interval=100,
    )

    @broker.subscriber(stream=stream, ack_policy=AckPolicy.ACK)
    async def handle(body: list[Any]) -> None:
        counter.started()
        counter.add(len(body))

    async with broker:
        await broker.start()
        await _wait(counter)
    return counter


async def faststream_rabbitmq(spec: dict[str, Any]) -> Counter:
    from faststream import AckPolicy
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    counter = Counter(spec["records"])
    broker = RabbitBroker(
        spec["url"], logger=None, default_channel=Channel(prefetch_count=PREFETCH)
    )

    @broker.subscriber(RabbitQueue(spec["queue"], declare=False), ack_policy=AckPolicy.ACK)
    async def handle(body: Any) -> None:
        counter.started()
        counter.add(1)

    async with broker:
        await broker.start()
        await _wait(counter)
    return counter


PEERS = {"kafka": faststream_kafka, "redis": faststream_redis, "rabbitmq": faststream_rabbitmq}


def main() -> None:
    spec = json.loads(sys.argv[1])
    counter = asyncio.run(PEERS[spec["broker"]](spec))
    print(json.dumps({"records": counter.count, "first": counter.first, "last": counter.last}))


if __name__ == "__main__":
    main()
