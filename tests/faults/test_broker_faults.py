"""Broker faults under a steady load, on each broker: the broker restarted where it keeps its
data (a private Redis with an fsync-always append-only file, a private RabbitMQ node), and for
Tansu, which keeps nothing across a restart, the connection cut and, separately, frozen through a
TCP proxy; and the on-failure destination (a private Redis) down while poison records need
dead-lettering, with the worker killed during the outage."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import brokers
from tests.faults.conftest import KafkaRig, RabbitRig, RedisRig, Rig, SQSRig
from tests.faults.handlers import SLEEP_ENV
from tests.faults.load import Load, Worker, journals, redis_letter_ids, wait_until, write_config
from tests.faults.private import PrivateRabbit, PrivateRedis, ProxiedTansu
from tests.faults.proxy import TcpProxy
from tests.faults.results import Tally, read_journal

pytestmark = pytest.mark.faults

COUNT = 1200
RATE_PER_S = 150.0
BATCH_SIZE = 20
# How long each broker stays down or frozen: longer than a Kafka session (6 s) for the freeze,
# so the group really loses the member.
DOWN_S = 3.0
FROZEN_S = 8.0
# moto slows down as its queues grow and as the messages held by a consumer do (each
# ChangeMessageVisibility scans the queue): a third of the load keeps its scenarios short.
SQS_COUNT = COUNT // 3
SQS_RATE_PER_S = RATE_PER_S / 3
# Messages an SQS poller holds at most under that load: received, not yet deleted (batches
# running and waiting in its lanes; a poll receives up to 50).
SQS_HELD_AT_MOST = 200


def under_load(
    rig: Rig,
    tmp_path: Path,
    scenario: str,
    fault: Callable[[], None],
    *,
    notes: str,
    max_duplicates: int | None = None,
    allowed: Callable[[], set[str]] = set,
    expect_in_log: str = "",
    extra: dict[str, object] | None = None,
    count: int = COUNT,
    rate_per_s: float = RATE_PER_S,
) -> Tally:
    """Run a worker under load, apply `fault` (which returns once the broker or link is back)
    after 30% of the load was handled, then wait until everything produced is handled once
    at least, and stop the worker with SIGTERM. `allowed()` names ids the source may hold twice
    (sent again by the producer after a lost confirm). Duplicates must be records the broker held
    as taken but not checkpointed just before the fault, and at most `max_duplicates` (default:
    as many as those records)."""
    sender = rig.sender()
    load = Load(sender, rig.name, count, rate_per_s)
    journal = tmp_path / "run.journal"
    config = write_config(
        tmp_path / "run.yaml",
        name=rig.name,
        source=rig.source(),
        journal=journal,
        handler="tests.faults.handlers:slow_recording",
        environment={SLEEP_ENV: "0.05"},
        batch_size=BATCH_SIZE,
        maximum_retry_attempts=10,
        **rig.mapping,
    )
    load.start()
    worker = Worker(config, tmp_path / "run.log")
    try:
        wait_until(
            lambda: len(read_journal(journal)) >= count * 0.3 or not worker.alive(),
            150,
            "30% of the load handled",
        )
        assert worker.alive(), worker.tail()
        # Taken but not yet checkpointed just before the fault: all that may come back twice.
        in_flight = rig.uncheckpointed(sender)
        at_fault = set(load.produced)
        fault()
        back = time.monotonic()
        backlog = set(load.produced)
        settled = wait_until(
            lambda: backlog <= set(read_journal(journal)) or not worker.alive(),
            180,
            "the worker to settle what was produced before the broker came back",
        )
        produced = load.wait()
        wait_until(
            lambda: set(produced) <= set(read_journal(journal)) or not worker.alive(),
            180,
            "the worker to handle the whole load",
        )
        # The worker recovered by itself: the same process, never restarted by the test.
        assert worker.alive(), worker.tail()
        worker.terminate()
        assert worker.wait(60) == 0, worker.tail()
        # ... and it did see the fault.
        assert expect_in_log in worker.tail(10**7), worker.tail()
    finally:
        worker.close()
        sender.close()
    handled = journals(journal)
    twice = allowed() | load.resent
    dups = {i for i, n in Counter(handled).items() if n > 1}
    tally = Tally(
        scenario,
        rig.broker,
        produced,
        handled,
        recovery_s=settled - back,
        notes=notes,
        extra={"resent_by_producer": len(twice), **(extra or {})},
    )
    if in_flight is not None:
        unexpected = dups - in_flight - twice
        assert not unexpected, (
            f"{len(unexpected)} handled twice though checkpointed before the fault:"
            f" {sorted(unexpected, key=lambda i: int(i.rsplit('-', 1)[1]))[:20]}"
            f" ({len(dups)} duplicates, {len(in_flight)} in flight)"
        )
    if max_duplicates is None:
        assert in_flight is not None
        max_duplicates = len(in_flight & at_fault)
    tally.extra["in_flight_at_fault"] = max_duplicates
    tally.check(max_duplicates=max_duplicates + len(twice), key_of=load.key_of)
    assert tally.duplicates - len(dups & twice) <= max_duplicates
    rig.assert_checkpointed()
    tally.record()
    return tally


def test_redis_restarted_mid_run(private_redis: PrivateRedis, tmp_path: Path) -> None:
    rig = RedisRig(brokers.unique_name("faults-redis-restart"), private_redis.url)

    def restart() -> None:
        private_redis.kill()
        time.sleep(DOWN_S)  # the outage itself, not a wait for a condition
        private_redis.start()

    try:
        under_load(
            rig,
            tmp_path,
            "broker restart",
            restart,
            notes=f"private redis-server (appendfsync always) SIGKILLed, back after {DOWN_S}s",
            expect_in_log="broker error",
        )
    finally:
        rig.close()


@pytest.mark.faults_full
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_rabbitmq_node_restarted_mid_run(
    private_rabbit: PrivateRabbit, how: str, tmp_path: Path
) -> None:
    rig = RabbitRig(brokers.unique_name("faults-rmq-restart"), private_rabbit.url)
    measured: dict[str, object] = {}

    def restart() -> None:
        if how == "kill":
            private_rabbit.kill()
        else:
            private_rabbit.stop()
        time.sleep(DOWN_S)
        measured["node_start_s"] = round(private_rabbit.start(), 2)

    try:
        under_load(
            rig,
            tmp_path,
            "broker restart" if how == "kill" else "broker stop and start",
            restart,
            notes=f"private RabbitMQ node {'SIGKILLed' if how == 'kill' else 'stopped'}"
            " and started again",
            # Unacked messages (at most the prefetch window, 100) come back after the restart.
            max_duplicates=100,
            expect_in_log="broker error",
            extra=measured,
        )
    finally:
        rig.close()


def kafka_source_twice(rig: KafkaRig) -> Callable[[], set[str]]:
    """Ids the topic holds more than once (a producer retry the broker did not deduplicate)."""

    def read() -> set[str]:
        from tests.faults.results import ids_of

        values = [m.value() or b"" for m in brokers.read_topic(rig.bootstrap, rig.name)]
        return {i for i, n in Counter(ids_of(values)).items() if n > 1}

    return read


def test_kafka_connection_cut(proxied_kafka: ProxiedTansu, tmp_path: Path) -> None:
    proxy = proxied_kafka.proxy
    rig = KafkaRig(brokers.unique_name("faults-kafka-cut"), proxied_kafka.bootstrap)
    cut: list[int] = []

    def fault() -> None:
        # Every connection, the worker's and the producer's, closed; new ones refused a while.
        before = proxy.connections
        cut.append(proxy.cut(refuse_s=DOWN_S))
        wait_until(lambda: proxy.connections > before, 60, "clients to reconnect")

    under_load(
        rig,
        tmp_path,
        "connection cut",
        fault,
        notes=f"every Kafka connection closed through a proxy, refused for {DOWN_S}s",
        expect_in_log="brokers are down",
        allowed=kafka_source_twice(rig),
    )
    # The clients really went through the proxy: the consumer and producer connections it cut.
    assert cut[0] >= 2 and proxy.bytes_down > 0


@pytest.mark.faults_full
def test_kafka_connection_frozen(proxied_kafka: ProxiedTansu, tmp_path: Path) -> None:
    proxy = proxied_kafka.proxy
    rig = KafkaRig(brokers.unique_name("faults-kafka-freeze"), proxied_kafka.bootstrap)

    def fault() -> None:
        proxy.freeze()
        time.sleep(FROZEN_S)  # the partition itself: longer than the 6 s session
        proxy.thaw()

    under_load(
        rig,
        tmp_path,
        "connection frozen",
        fault,
        notes=f"Kafka traffic held for {FROZEN_S}s (sockets open), then released",
        # Longer than the session: the group dropped the member, which rejoined by itself.
        expect_in_log="session expired",
        allowed=kafka_source_twice(rig),
    )
    assert proxy.bytes_down > 0


@pytest.mark.sqs
@pytest.mark.faults_full
def test_sqs_connection_cut(sqs_server: brokers.MotoServer, tmp_path: Path) -> None:
    """The worker's connections to SQS closed and refused for a while (moto keeps its queues in
    memory, so the server itself is not restarted); the producer goes to the server directly."""
    proxy = TcpProxy(("127.0.0.1", sqs_server.port))
    rig = SQSRig(brokers.unique_name("faults-sqs-cut"), sqs_server, via=proxy.address)
    cut: list[int] = []

    def fault() -> None:
        before = proxy.connections
        cut.append(proxy.cut(refuse_s=DOWN_S))
        wait_until(lambda: proxy.connections > before, 60, "the worker to reconnect")

    try:
        under_load(
            rig,
            tmp_path,
            "connection cut",
            fault,
            notes=f"every SQS connection of the worker closed through a proxy, refused for"
            f" {DOWN_S}s",
            # What the poller held at the cut (received, not yet deleted) may come back once its
            # visibility timeout (5 s) runs out during the outage: a poll's worth at most.
            max_duplicates=SQS_HELD_AT_MOST,
            expect_in_log="broker error",
            count=SQS_COUNT,
            rate_per_s=SQS_RATE_PER_S,
        )
    finally:
        proxy.close()
        rig.close()
    assert cut[0] >= 1 and proxy.bytes_down > 0


# --- the on-failure destination down ------------------------------------------------------------


def full(kind: str) -> object:
    return pytest.param(kind, marks=pytest.mark.faults_full, id=kind)


@pytest.mark.parametrize(
    "rig",
    [full("kafka"), pytest.param("redis", id="redis"), full("rabbitmq"), full("sqs")],
    indirect=True,
)
def test_destination_down_then_back_with_a_kill_in_the_outage(
    rig: Rig, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Poison records need letters while the destination (a private Redis) is down; the worker
    is killed during the outage; once the destination is back a new run writes every letter."""
    dlq = brokers.unique_name("faults-dlq")
    sender = rig.sender()
    # Six seconds of load: the destination goes down at the first letter, well before the end,
    # so that later poison records need letters during the outage.
    count, rate = (900, RATE_PER_S) if rig.broker != "sqs" else (SQS_COUNT, SQS_RATE_PER_S)
    load = Load(sender, rig.name, count, rate, poison_every=25)

    def config(run: str) -> tuple[Path, Path]:
        journal = tmp_path / f"{run}.journal"
        path = write_config(
            tmp_path / f"{run}.yaml",
            name=rig.name,
            source=rig.source(),
            journal=journal,
            handler="tests.faults.handlers:poison_aware",
            batch_size=BATCH_SIZE,
            # No retry: a partial response's reported records go straight to the destination
            # and the rest of the batch is settled, so only the kill can cause a duplicate
            # (a retry would invoke the records after a poison one again, by design).
            maximum_retry_attempts=0,
            function_response_types=["ReportBatchItemFailures"],
            destination_config={
                "on_failure": {"type": "redis", "url": private_redis.url, "stream": dlq}
            },
            **rig.mapping,
        )
        return path, journal

    first_config, first_journal = config("first")
    load.start()
    worker = Worker(first_config, tmp_path / "first.log")
    try:
        wait_until(
            lambda: bool(redis_letter_ids(private_redis.url, dlq)) or not worker.alive(),
            150,
            "the first letter (the destination works)",
        )
        assert worker.alive(), worker.tail()
        private_redis.kill()
        wait_until(
            lambda: "on-failure destination refused" in worker.tail(20_000) or not worker.alive(),
            150,
            "the worker to find the destination down",
        )
        produced = load.wait()
        assert worker.alive(), worker.tail()
        worker.kill9()
    finally:
        worker.close()
        sender.close()
    before = read_journal(first_journal)
    in_flight = rig.uncheckpointed(sender)
    private_redis.start()
    outage_letters = set(redis_letter_ids(private_redis.url, dlq))
    unlettered = set(load.poison) - outage_letters
    assert unlettered, "every poison record had its letter before the outage: nothing tested"
    if in_flight is not None:
        # Nothing past a record whose letter was not written was checkpointed.
        assert unlettered <= in_flight, sorted(unlettered - in_flight)

    second_config, second_journal = config("second")
    restart = Worker(second_config, tmp_path / "second.log", until_idle_s=3)
    try:
        settled = wait_until(
            lambda: (
                set(produced)
                <= set(before)
                | set(read_journal(second_journal))
                | set(redis_letter_ids(private_redis.url, dlq))
            ),
            180,
            "every record handled or dead-lettered after the restart",
        )
        assert restart.wait(180) == 0, restart.tail()
    finally:
        restart.close()
    letters = redis_letter_ids(private_redis.url, dlq)
    handled = journals(first_journal, second_journal)
    tally = Tally(
        "destination down",
        rig.broker,
        produced,
        handled,
        dead_lettered=letters,
        recovery_s=settled - restart.started,
        notes="redis destination SIGKILLed while poison records needed letters; worker"
        " SIGKILLed in the outage; both restarted",
        extra={"poison": len(load.poison), "unlettered_at_kill": len(unlettered)},
    )
    assert set(letters) == set(load.poison), sorted(set(letters) ^ set(load.poison))[:20]
    if in_flight is not None:
        bound = len(in_flight & set(before))
        assert {i for i, n in Counter(handled).items() if n > 1} <= in_flight
    else:
        # RabbitMQ: at most the prefetch window was unacked; SQS: what the poller held.
        bound = 100 if rig.broker == "rabbitmq" else SQS_HELD_AT_MOST
    tally.check(max_duplicates=bound, key_of=load.key_of if rig.ordered else None)
    rig.assert_checkpointed()
    tally.record()
