"""A TCP proxy in the test process, to cut or freeze the connections between clients and a broker
that keeps nothing across a restart (Tansu): `cut()` closes every connection as a broker crash or
a reset would; `freeze()` stops forwarding while the sockets stay open, as a network partition
does (the peers notice only through their own timeouts); `thaw()` resumes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

from tests.brokers import free_port

_CHUNK = 65536


class TcpProxy:
    """Listens on 127.0.0.1:`port` and forwards each connection to `upstream`."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=64)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._refuse_until = 0.0
        self._closed = False
        # Bytes forwarded in each direction: the proof that clients really go through the proxy.
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()

    def cut(self, refuse_s: float = 0.0) -> int:
        """Close every open connection (both sides); for `refuse_s` seconds afterwards, close new
        connections as soon as they arrive. Returns how many connections were cut."""
        with self._lock:
            self._refuse_until = time.monotonic() + refuse_s
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _close(sock)
        return len(doomed) // 2

    def freeze(self) -> None:
        """Stop forwarding in both directions; sockets stay open and unread."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        _close(self._listener)
        self.cut()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                _close(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        # A frozen link also holds new connections: nothing reaches the broker until the thaw.
        self._flowing.wait()
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _close(client)
            return
        server.settimeout(None)
        with self._lock:
            if self._closed:
                _close(client)
                _close(server)
                return
            self._sockets |= {client, server}
            self.connections += 1
        for src, dst, up in ((client, server, True), (server, client, False)):
            threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                self._flowing.wait()
                # Wake up now and then so a freeze takes effect between reads.
                readable, _, _ = select.select([src], [], [], 0.2)
                if not readable:
                    if src.fileno() < 0:
                        return
                    continue
                if not self._flowing.is_set():
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except (OSError, ValueError):
            pass
        with self._lock:
            self._sockets -= {src, dst}
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
