"""The Redis Streams connector against real Redis servers: the shared contract, `workers run` end
to end (poison entries, a worker killed mid-batch, a server restarted mid-run), key-ordered
parallelism, and pending-entry recovery in its corner cases."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from connectors.redis import config as redis_cfg
from connectors.redis.client import server_of
from connectors.redis.destination import RedisDestination
from connectors.redis.probe import probe_redis
from connectors.redis.source import RedisSource
from tests import brokers
from tests.cli import run_workers, workers_run
from tests.contract import AckContract, PauseContract, RecordingListener, SourceContract, poll_n
from tests.engine import DirectInvoker
from workers.app import config as cfg
from workers.app import registry
from workers.engine.batcher import BatchLimits
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.ports import Destination, Source
from workers.engine.records import Record

pytestmark = [pytest.mark.integration, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
HANDLER = "tests.handlers.redis_handlers:log_ids"


# --- helpers --------------------------------------------------------------------------------------


def redis_mapping(
    url: str,
    name: str,
    streams: Sequence[str],
    destination: dict[str, Any] | None = None,
    **source: Any,
) -> cfg.EventSourceMapping:
    data: dict[str, Any] = {
        "name": name,
        "function": "f",
        "source": {"type": "redis", "url": url, "streams": list(streams), **source},
    }
    if destination is not None:
        data["destination_config"] = destination
    return cfg.EventSourceMapping.model_validate(data)


def redis_source(url: str, streams: Sequence[str], **source: Any) -> redis_cfg.RedisSource:
    src = redis_mapping(url, "probe", streams, **source).source
    assert isinstance(src, redis_cfg.RedisSource)
    return src


def event_items(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for items in event["records"].values() for item in items]


def field_of(item: dict[str, Any], name: str) -> bytes:
    return base64.b64decode(item["fields"][name])


def produce(client: redis.Redis, stream: str, entries: Sequence[dict[Any, Any]]) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)
    return [entry_id.decode() for entry_id in pipe.execute()]


def pending_count(client: redis.Redis, stream: str, group: str) -> int:
    summary: Any = client.xpending(stream, group)
    return int(summary["pending"])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def write_config(
    path: Path,
    url: str,
    *,
    name: str,
    streams: Sequence[str],
    log: Path,
    environment: dict[str, str] | None = None,
    source: dict[str, Any] | None = None,
    isolation: str = "process",
    handler: str = HANDLER,
    **mapping: Any,
) -> Path:
    config = {
        "functions": {
            "f": {
                "handler": handler,
                "timeout_s": 20,
                "isolation": isolation,
                "environment": {"REDIS_TEST_LOG": str(log), **(environment or {})},
            }
        },
        "event_source_mappings": [
            {
                "name": name,
                "function": "f",
                "source": {"type": "redis", "url": url, "streams": list(streams), **(source or {})},
                **mapping,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def handled(log: Path) -> list[tuple[str, str, str]]:
    """(tag, stream, id) per handled entry, in the order the handler saw them."""
    if not log.exists():
        return []
    out: list[tuple[str, str, str]] = []
    for line in log.read_text().splitlines():
        tag, stream, entry_id = line.split()
        out.append((tag, stream, entry_id))
    return out


class RedisServer:
    """A redis-server process of our own on a free port, to restart or reconfigure freely."""

    def __init__(self, directory: Path, *options: str, tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        brokers.require("redis-server (the binary)", binary is not None, "install redis-server")
        assert binary is not None
        self.port = brokers.free_port()
        self.directory = directory
        self.ca: Path | None = None
        listen = ["--port", str(self.port)]
        if tls:
            self.ca = self._certificate()
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            listen += [
                "--tls-cert-file",
                str(self.ca),
                "--tls-key-file",
                str(directory / "key.pem"),
            ]
        self.command = [
            binary,
            *listen,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--daemonize",
            "no",
            *options,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def _certificate(self) -> Path:
        """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
        openssl = shutil.which("openssl")
        brokers.require("openssl (the binary)", openssl is not None, "install openssl")
        assert openssl is not None
        cert = self.directory / "cert.pem"
        key = self.directory / "key.pem"
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(
            [openssl, *request, "-keyout", str(key), "-out", str(cert), *subject],
            check=True,
            capture_output=True,
        )
        return cert

    @property
    def url(self) -> str:
        if self.ca is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with (self.directory / "redis.log").open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory
            )
        wait_for(lambda: brokers.redis_reachable(self.url, 0.2), 10, f"redis on {self.port}")

    def shutdown(self) -> None:
        """SHUTDOWN, as an operator restarting the server does (the AOF is fsynced)."""
        c = redis.Redis.from_url(self.url)
        c.shutdown()
        c.close()
        assert self.process is not None
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Our own redis-server with an fsync-always append-only file."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.close()


# --- 1. the shared contract, on two streams -------------------------------------------------------


class TestRedisContract(SourceContract, AckContract, PauseContract):
    # Nothing to join; poll_n waits this long when asked for more records than exist.
    join_timeout_s = 2.0
    delivery_counts = True  # XPENDING's times_delivered

    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str) -> Iterator[None]:
        self.url = redis_url
        self.client = redis.Redis.from_url(redis_url)
        self.made: list[str] = []
        yield
        keys = [k for name in self.made for k in (f"{name}-a", f"{name}-b", f"{name}-dlq")]
        self.client.delete(*keys)
        self.client.close()

    def fresh(self) -> str:
        name = super().fresh()
        self.made.append(name)
        return name

    def mapping(
        self, name: str, destination: dict[str, Any] | None = None
    ) -> cfg.EventSourceMapping:
        return redis_mapping(
            self.url,
            name,
            [f"{name}-a", f"{name}-b"],
            destination,
            consumer_name="contract",
            partition_key_field="key",
            claim_idle_s=30,
        )

    def make_source(self, name: str) -> Source:
        return registry.open_source(self.mapping(name))

    def produce(self, name: str, values: Sequence[bytes], keys: Sequence[bytes | None]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i, (value, key) in enumerate(zip(values, keys, strict=True)):
            # Keyed entries go to a stream by key hash (as Kafka partitions), the others in turn.
            half = zlib.crc32(key) % 2 if key is not None else i % 2
            fields: dict[Any, Any] = {"value": value}
            if key is not None:
                fields["key"] = key
            pipe.xadd(f"{name}-{'ab'[half]}", fields)
        pipe.execute()

    def make_destination(self, name: str) -> Destination:
        on_failure = {"type": "redis", "url": self.url, "stream": f"{name}-dlq"}
        destination = registry.open_destination(self.mapping(name, {"on_failure": on_failure}))
        assert destination is not None
        return destination

    def dead_letter_values(self, name: str) -> list[bytes]:
        out: list[bytes] = []
        rows: Any = self.client.xrange(f"{name}-dlq")
        for _, fields in rows:
            out += self.event_values(orjson.loads(fields[b"letter"])["payload"])
        return out

    def event_values(self, event: dict[str, Any]) -> list[bytes]:
        return [field_of(item, "value") for item in event_items(event)]

    def test_dead_letters_are_acked_with_their_letter(self) -> None:
        """The destination's MULTI/EXEC acks the source entries together with the XADD."""
        name = self.fresh()
        self.produce(name, [b"x", b"y"], [b"k", b"k"])
        source, _ = self.opened(name)
        try:
            records = poll_n(source, 2, self.join_timeout_s)
            stream = records[0].source
            group = name  # the mapping's name is its default consumer group
            assert pending_count(self.client, stream, group) == 2
            letter = {"requestContext": {"condition": "RetryAttemptsExhausted"}, "payload": {}}
            self.make_destination(name).deliver(letter, records[:1])
            assert pending_count(self.client, stream, group) == 1
            rows: Any = self.client.xrange(f"{name}-dlq")
            assert rows[0][1][b"condition"] == b"RetryAttemptsExhausted"
            source.ack(records)
        finally:
            source.close()


# --- 2. workers run: poison entries to the destination, the rest once and in order ----------------


def test_workers_run_dead_letters_poison_and_handles_the_rest_once_in_order(
    tmp_path: Path, redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream, dlq, name = names("orders"), names("orders-dlq"), brokers.unique_name("redis-run")
    poison = {7, 50, 119}
    entries = [
        {"n": i, "body": f"order {i}", **({"poison": 1} if i in poison else {})} for i in range(120)
    ]
    ids = produce(client, stream, entries)
    log = tmp_path / "handled.log"
    config = write_config(
        tmp_path / "config.yaml",
        redis_url,
        name=name,
        streams=[stream],
        log=log,
        batch_size=10,
        maximum_batching_window_s=0.1,
        bisect_batch_on_function_error=True,
        maximum_retry_attempts=1,
        destination_config={"on_failure": {"type": "redis", "url": redis_url, "stream": dlq}},
    )
    summary = run_workers(config, tmp_path / "summary.json")[name]

    assert summary["dead_lettered"] == 3 and summary["succeeded"] == 117
    assert [entry_id for _, _, entry_id in handled(log)] == [
        entry_id for i, entry_id in enumerate(ids) if i not in poison
    ]
    letters: Any = client.xrange(dlq)
    assert len(letters) == 3
    dead: list[tuple[str, bytes]] = []
    for _, fields in letters:
        assert fields[b"mapping"] == name.encode()
        assert fields[b"condition"] == b"RetryAttemptsExhausted"
        assert fields[b"errorType"] == b"ValueError"
        letter = orjson.loads(fields[b"letter"])
        assert letter["RedisStreamBatchInfo"]["batchSize"] == 1
        dead += [(item["id"], field_of(item, "n")) for item in event_items(letter["payload"])]
    assert sorted(dead) == sorted((ids[i], str(i).encode()) for i in poison)
    assert pending_count(client, stream, name) == 0


# --- 3. a worker killed mid-batch: another consumer claims its pending entries --------------------


def test_killed_worker_pending_entries_are_claimed_by_another_consumer(
    tmp_path: Path, redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream, name = names("claim"), brokers.unique_name("redis-kill")
    ids = produce(client, stream, [{"n": i} for i in range(60)])
    log = tmp_path / "handled.log"

    def config(tag: str, sleep_s: float) -> Path:
        return write_config(
            tmp_path / f"{tag}.yaml",
            redis_url,
            name=name,
            streams=[stream],
            log=log,
            environment={"REDIS_TEST_TAG": tag, "REDIS_TEST_SLEEP_S": str(sleep_s)},
            source={"consumer_name": f"worker-{tag}", "claim_idle_s": 2},
            batch_size=5,
            maximum_batching_window_s=0.05,
        )

    first = subprocess.Popen(
        workers_run(config("a", 0.4), tmp_path / "a.json", until_idle_s=30),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(handled(log)) >= 10, 30, "the first worker to handle 10 entries")
    finally:
        # The whole process group: supervisor, poller and execution environments.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    rows: Any = client.xpending_range(stream, name, "-", "+", 1000, consumername="worker-a")
    orphaned = {row["message_id"].decode() for row in rows}
    assert orphaned, "the killed worker held no pending entries"

    summary = run_workers(config("b", 0.0), tmp_path / "b.json")[name]

    lines = handled(log)
    assert {entry_id for _, _, entry_id in lines} == set(ids)
    assert orphaned <= {entry_id for tag, _, entry_id in lines if tag == "b"}
    assert summary["succeeded"] >= len(orphaned)
    assert pending_count(client, stream, name) == 0


# --- 4. the server restarts mid-run: nothing acknowledged to producers is lost --------------------


def test_server_restart_mid_run_loses_nothing(tmp_path: Path, durable_redis: RedisServer) -> None:
    client = redis.Redis.from_url(durable_redis.url)
    stream, name = "restart-stream", "redis-restart"
    ids = produce(client, stream, [{"n": i, "phase": "before"} for i in range(150)])
    log = tmp_path / "handled.log"
    config = write_config(
        tmp_path / "config.yaml",
        durable_redis.url,
        name=name,
        streams=[stream],
        log=log,
        environment={"REDIS_TEST_SLEEP_S": "0.1"},
        batch_size=10,
        maximum_batching_window_s=0.05,
    )
    worker = subprocess.Popen(
        # Entries are added after the restart, while it runs.
        workers_run(config, tmp_path / "summary.json", until_idle_s=3.0),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(handled(log)) >= 20, 30, "the worker to handle 20 entries")
        client.close()
        durable_redis.shutdown()
        time.sleep(0.5)  # the worker sees the outage: its polls and acks fail meanwhile
        durable_redis.start()
        client = redis.Redis.from_url(durable_redis.url)
        ids += produce(client, stream, [{"n": i, "phase": "after"} for i in range(50)])
        _, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    assert worker.returncode == 0, stderr[-4000:]
    assert "broker error" in stderr  # the worker did lose its connection and came back

    assert client.xlen(stream) == 200
    assert {entry_id for _, _, entry_id in handled(log)} == set(ids)
    assert pending_count(client, stream, name) == 0
    client.close()


# --- 5. key-ordered parallel lanes ----------------------------------------------------------------


def test_partition_key_field_keeps_order_per_key_across_four_lanes(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream, name = names("keys"), brokers.unique_name("redis-keys")
    keys = [f"customer-{k}" for k in range(8)]
    produce(client, stream, [{"customer": keys[i % 8], "n": i} for i in range(400)])
    seen: dict[str, list[int]] = {k: [] for k in keys}
    lock = threading.Lock()
    active = 0
    most_active = 0

    def handler(event: dict[str, Any], request: InvocationRequest) -> None:
        nonlocal active, most_active
        with lock:
            active += 1
            most_active = max(most_active, active)
        time.sleep(0.01)
        with lock:
            active -= 1
            for item in event_items(event):
                seen[field_of(item, "customer").decode()].append(int(field_of(item, "n")))

    mapping = redis_mapping(redis_url, name, [stream], partition_key_field="customer")
    poller = Poller(
        PollerSettings(
            mapping=name,
            function="f",
            limits=BatchLimits(batch_size=10, maximum_batching_window_s=0.02),
            parallelization_factor=4,
        ),
        source=RedisSource(mapping, 0),
        invoker=DirectInvoker(handler),
        policy=Policy(),
        destination=None,
    )
    poller.run(until_idle_s=1.0)

    for k, key in enumerate(keys):
        assert seen[key] == list(range(k, 400, 8))
    assert most_active > 1
    assert pending_count(client, stream, name) == 0


# --- pending-entry recovery and the rest of the source --------------------------------------------


def opened(url: str, name: str, streams: Sequence[str], **source: Any) -> RedisSource:
    s = RedisSource(redis_mapping(url, name, streams, **source), 0)
    s.open(RecordingListener())
    return s


def test_live_consumer_keeps_its_entries_and_a_dead_ones_are_claimed(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream, name = names("touch"), brokers.unique_name("redis-touch")
    produce(client, stream, [{"n": i} for i in range(5)])
    a = opened(redis_url, name, [stream], consumer_name="a", claim_idle_s=0.6)
    b = opened(redis_url, name, [stream], consumer_name="b", claim_idle_s=0.6)
    try:
        held = poll_n(a, 5, 3)
        assert len(held) == 5
        # a stays alive (its loop polls) while holding the entries well past claim_idle_s.
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            a.poll(0, 0.05)
            assert b.poll(10, 0.05) == []
        # a dies: after claim_idle_s its entries go to b, counted as redelivered.
        claimed = poll_n(b, 5, 3)
        assert sorted(r.position for r in claimed) == sorted(r.position for r in held)
        assert all(r.attempts >= 1 and r.redelivered for r in claimed)
        b.ack(claimed)
        a.ack(held)  # a late ack of the same entries is harmless
        assert pending_count(client, stream, name) == 0
    finally:
        a.close()
        b.close()


def test_trimmed_pending_entries_are_acked_without_stalling(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream, name = names("trim"), brokers.unique_name("redis-trim")
    ids = produce(client, stream, [{"n": i} for i in range(6)])
    a = opened(redis_url, name, [stream], consumer_name="a", claim_idle_s=0.2)
    assert len(poll_n(a, 6, 3)) == 6
    a.close()  # without acking: all six stay pending on a
    client.xdel(stream, ids[0], ids[1])

    a = opened(redis_url, name, [stream], consumer_name="a", claim_idle_s=30)
    try:
        again = poll_n(a, 4, 2)
        # a re-reads its own pending entries first; the two trimmed ones are acked, not handed out.
        assert [r.meta.entry_id for r in again] == ids[2:]
        assert all(r.attempts == 1 for r in again)
        assert pending_count(client, stream, name) == 4
    finally:
        a.close()

    client.xdel(stream, ids[2])
    time.sleep(0.3)
    b = opened(redis_url, name, [stream], consumer_name="b", claim_idle_s=0.2)
    try:
        claimed = poll_n(b, 3, 2)
        # XAUTOCLAIM hands over the live ones and drops the trimmed one from the pending list.
        assert [r.meta.entry_id for r in claimed] == ids[3:]
        assert all(r.attempts == 2 for r in claimed)
        assert pending_count(client, stream, name) == 3
        b.ack(claimed)
        deadline = time.monotonic() + 5
        while not b.caught_up() and time.monotonic() < deadline:
            b.poll(10, 0.1)
        assert b.caught_up()
    finally:
        b.close()


def test_a_vanished_group_is_recreated_after_the_last_entry_read(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream, name = names("nogroup"), brokers.unique_name("redis-nogroup")
    produce(client, stream, [{"n": i} for i in range(3)])
    source = opened(redis_url, name, [stream])
    try:
        first = poll_n(source, 3, 3)
        source.ack(first)
        client.xgroup_destroy(stream, name)  # as after a restart without persistence
        later = produce(client, stream, [{"n": i} for i in range(3, 5)])
        # Recreated at the last entry read: the first three are not replayed.
        again = poll_n(source, 2, 5)
        assert [r.meta.entry_id for r in again] == later
        source.ack(again)
    finally:
        source.close()


def test_starting_positions(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream = names("start")
    for ms in (1_700_000_001_000, 1_700_000_002_000, 1_700_000_003_000):
        client.xadd(stream, {"ms": ms}, id=f"{ms}-0")
    at = opened(
        redis_url,
        brokers.unique_name("redis-at"),
        [stream],
        starting_position="AT_TIMESTAMP",
        starting_position_timestamp=1_700_000_002_000,
    )
    latest = opened(
        redis_url, brokers.unique_name("redis-latest"), [stream], starting_position="LATEST"
    )
    try:
        assert [r.timestamp_ms for r in poll_n(at, 3, 1)] == [1_700_000_002_000, 1_700_000_003_000]
        assert latest.poll(10, 0.1) == []
        new: Any = client.xadd(stream, {"ms": "now"})
        assert [r.meta.entry_id for r in poll_n(latest, 1, 2)] == [new.decode()]
    finally:
        at.close()
        latest.close()


def test_paused_streams_are_not_read(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    one, two, name = names("p1"), names("p2"), brokers.unique_name("redis-pause")
    source = opened(redis_url, name, [one, two])
    try:
        source.pause([one])
        produce(client, one, [{"n": 1}])
        produce(client, two, [{"n": 2}])
        got = poll_n(source, 2, 1)
        assert [r.source for r in got] == [two]
        source.resume([one])
        got += poll_n(source, 1, 2)
        assert [r.source for r in got] == [two, one]
        source.ack(got)
    finally:
        source.close()


def test_acl_user_works_and_its_password_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        admin = redis.Redis.from_url(server.url)
        # A least-privilege user: operators create the groups, the worker may not.
        admin.acl_setuser(
            "esm",
            enabled=True,
            passwords=["+s3cret-pw"],
            keys=["*"],
            commands=["+@all", "-xgroup|create"],
        )
        admin.xgroup_create("acl-stream", "acl-mapping", "0", mkstream=True)
        admin.close()
        url = f"redis://esm:s3cret-pw@127.0.0.1:{server.port}/0"
        caplog.set_level(logging.DEBUG)
        source = opened(url, "acl-mapping", ["acl-stream"])
        client = redis.Redis.from_url(url)
        produce(client, "acl-stream", [{"n": 1}])
        got = poll_n(source, 1, 2)
        source.ack(got)
        source.close()
        probe_redis(redis_source(url, ["acl-stream"]))
        client.close()
        assert len(got) == 1
        assert "s3cret-pw" not in caplog.text and "esm:***@" in caplog.text
        with pytest.raises(redis.AuthenticationError):
            probe_redis(redis_source(url.replace("s3cret", "wrong"), ["acl-stream"]))
    finally:
        server.close()


def test_rediss_source_and_destination_over_tls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, tls=True)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        produce(client, "tls-stream", [{"n": 1}, {"n": 2}])
        mapping = redis_mapping(server.url, "tls-mapping", ["tls-stream"])
        source = RedisSource(mapping, 0)
        source.open(RecordingListener())
        got = poll_n(source, 2, 2)
        dst = redis_cfg.RedisDestination(type="redis", url=server.url, stream="tls-dlq")
        destination = RedisDestination(dst, mapping)
        destination.deliver({"requestContext": {"condition": "RecordAgeExceeded"}}, got[:1])
        source.ack(got)
        source.close()
        destination.close()
        assert [r.value for r in got] == [b"1", b"2"]
        assert client.xlen("tls-dlq") == 1
        assert pending_count(client, "tls-stream", "tls-mapping") == 0
        client.close()
    finally:
        server.close()


def test_same_server_is_decided_by_host_port_and_db() -> None:
    assert server_of("redis://localhost/0") == server_of("redis://u:p@127.0.0.1:6379")
    assert server_of("rediss://h:6380/2") == server_of("redis://H:6380?db=2")
    assert server_of("redis://h:6379/1") != server_of("redis://h:6379/0")
    assert server_of("unix:///run/redis.sock?db=1") != server_of("unix:///run/redis.sock")


def test_record_fields_key_and_size(
    redis_url: str, client: redis.Redis, names: Callable[[str], str]
) -> None:
    stream = names("fields")
    produce(client, stream, [{"k": "a", "v": "1"}, {"only": "x"}, {"k": "b", "x": "1", "y": "2"}])
    source = opened(
        redis_url, brokers.unique_name("redis-fields"), [stream], partition_key_field="k"
    )
    try:
        records: list[Record] = poll_n(source, 3, 2)
        assert [(r.key, r.value) for r in records[:2]] == [(b"a", b"1"), (None, b"x")]
        assert orjson.loads(records[2].value) == {"k": "b", "x": "1", "y": "2"}
        assert all(r.size > len(r.value) and r.attempts == 0 for r in records)
        assert records[0].meta.fields == {"k": b"a", "v": b"1"}
        event = source.shape.event(records)
        items = event["records"][stream]
        assert [item["fields"] for item in items] == [
            {"k": "YQ==", "v": "MQ=="},
            {"only": "eA=="},
            {"k": "Yg==", "x": "MQ==", "y": "Mg=="},
        ]
        # A retry gets the same event, whatever the handler did to the first one.
        rebuilt = orjson.loads(orjson.dumps(event))
        items[0]["fields"].clear()
        assert source.shape.event(records) == rebuilt
        source.ack(records)
    finally:
        source.close()
