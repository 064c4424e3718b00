"""Private brokers for fault scenarios, on free ports and temporary directories, so a scenario can
kill and restart them without touching the shared Redis and RabbitMQ that other tests use.

- `PrivateRedis`: redis-server with an fsync-always append-only file; `kill()` is SIGKILL and
  `start()` brings it back on the same port with the same data.
- `PrivateRabbit`: a RabbitMQ node of its own (own node name, ports, Mnesia and log dirs, no
  plugins); durable queues and persistent, confirmed messages survive `kill()` + `start()`.
- `ProxiedTansu`: a Tansu broker that advertises a `TcpProxy`'s address, so every Kafka
  connection (bootstrap and the broker connections clients open from metadata) goes through it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import brokers
from tests.brokers import BrokerError, Tansu, free_port
from tests.faults.proxy import TcpProxy
from workers.embedded import can_die_with_parent, die_with_parent

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def _popen(command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> Any:
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # Its own process group, so a kill reaches every process the server forks.
            start_new_session=True,
            preexec_fn=die_with_parent if can_die_with_parent() else None,
        )


def _kill_group(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _wait(condition: Any, timeout_s: float, what: str, process: Any, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BrokerError(f"{what} exited with {process.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise BrokerError(f"{what} not ready after {timeout_s}s")
        time.sleep(0.1)


class PrivateRedis:
    """redis-server on a free port with `--appendonly yes --appendfsync always`."""

    def __init__(self, directory: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        brokers.require("redis-server (the binary)", binary is not None, "install redis-server")
        assert binary is not None
        self.binary = binary
        self.directory = directory or Path(tempfile.mkdtemp(prefix="esm-faults-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = self.directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        command = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
            *("--daemonize", "no"),
        ]
        self.process = _popen(command, self.log, self.directory)
        _wait(
            lambda: brokers.redis_reachable(self.url, 0.5),
            timeout_s,
            f"private redis on {self.port}",
            self.process,
            self.log,
        )

    def kill(self) -> None:
        """SIGKILL, as a crash: what was acknowledged is in the fsynced append-only file."""
        process, self.process = self.process, None
        _kill_group(process)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of its own: `esm-faults-<port>@localhost`, AMQP on a free port."""

    def __init__(self) -> None:
        server = RABBIT_BIN / "rabbitmq-server"
        brokers.require("rabbitmq-server (the binary)", server.exists(), "install rabbitmq-server")
        self.directory = Path(tempfile.mkdtemp(prefix="esm-faults-rabbit-"))
        self.port = free_port()
        self.node = f"esm-faults-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.log = self.directory / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        dist_port = free_port()
        self.env = {
            **os.environ,
            # The cookie lives in $HOME: a fresh one, so this node shares nothing with the
            # system node; the system's rabbitmq-env.conf and rabbitmq.conf are not read.
            "HOME": str(self.directory),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout_s: float = 90.0) -> float:
        """Start the node and return the seconds it took to accept a login (about 4-10 s)."""
        started = time.monotonic()
        self.process = _popen(
            [str(RABBIT_BIN / "rabbitmq-server")], self.log, self.directory, self.env
        )
        _wait(
            lambda: brokers.rabbitmq_reachable(self.url, 1.0),
            timeout_s,
            f"private RabbitMQ node {self.node}",
            self.process,
            self.log,
        )
        return time.monotonic() - started

    def ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "-q", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)}: {(done.stderr or done.stdout)[-500:]}"
            )
        return done.stdout

    def stop(self) -> None:
        """`rabbitmqctl stop`, as an operator would: clients are told the connection is closing."""
        self.ctl("stop")
        process, self.process = self.process, None
        if process is not None:
            process.wait(60)
            _kill_group(process)  # anything the node left behind (epmd is not in its group)

    def kill(self) -> None:
        """SIGKILL the whole node, as a crash: confirmed persistent messages survive."""
        process, self.process = self.process, None
        _kill_group(process)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class ProxiedTansu(Tansu):
    """Tansu listening on a port of its own and advertising `proxy`'s address."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proxy = TcpProxy(("127.0.0.1", self.port))

    @property
    def bootstrap(self) -> str:
        return self.proxy.address

    def start(self, *, recreate_topics: bool = True) -> None:
        if self.running:
            return
        listen = f"tcp://{self.host}:{self.port}"
        command = [
            self.binary(),
            "broker",
            *("--cluster-id", self.cluster_id, "--listener-url", listen),
            *("--advertised-listener-url", f"tcp://{self.proxy.address}"),
            *("--storage-engine", self.storage_url),
        ]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                start_new_session=True,
                preexec_fn=die_with_parent if can_die_with_parent() else None,
            )
        try:
            self._wait_ready(started + self.startup_timeout_s)
        except BaseException:
            self.kill()
            raise
        self.startup_s = time.monotonic() - started
        if recreate_topics:
            for name, partitions in self.topics.items():
                brokers.create_topic(self.bootstrap, name, partitions)

    def close(self) -> None:
        super().close()
        self.proxy.close()
