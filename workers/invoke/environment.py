"""The worker's end of one execution environment: its child process and the pipe to it."""

from __future__ import annotations

import math
import os
import select
import struct
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import orjson

# After SIGKILL a process is gone within milliseconds unless stuck in the kernel (D state).
_REAP_TIMEOUT_S = 5.0

# multiprocessing.Connection's frame header: a 4-byte length, or -1 and an 8-byte one.
LENGTH = struct.Struct("!i")
LONG_LENGTH = struct.Struct("!Q")
# Replies are small (a response, a log line): one read takes most of them whole.
_READ_SIZE = 256 * 1024


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class Environment:
    """One child process and the worker's end of its pipe.

    The thread that checked it out (or is starting it) owns it; `close()` of the invoker may
    kill and reap it from another thread, but only the owner releases its descriptors.

    The pipe is non-blocking on this side and read in chunks into `_inbox`: a write goes on
    reading what the environment sends meanwhile (its output, the reply to the invocation
    before), so that neither side can wait on the other with both pipes full. Fewer, larger
    reads also mean fewer hand-overs of the GIL to the poller's loop thread.
    """

    __slots__ = (
        "_inbox",
        "_lock",
        "_poller",
        "_released",
        "_writer",
        "conn",
        "conn_fd",
        "exitcode",
        "pid",
        "process",
    )

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.pid = process.pid
        self.conn = conn
        self.conn_fd = conn.fileno()
        os.set_blocking(self.conn_fd, False)
        self.exitcode: int | None = None
        # Poll sets over the pipe and the process sentinel, built once: a reply and a death
        # both wake the waiting thread at once.
        self._poller = select.poll()
        self._poller.register(self.conn_fd, select.POLLIN)
        self._poller.register(process.sentinel, select.POLLIN)
        self._writer = select.poll()
        self._writer.register(self.conn_fd, select.POLLIN | select.POLLOUT)
        self._writer.register(process.sentinel, select.POLLIN)
        self._lock = threading.Lock()
        self._released = False
        self._inbox = bytearray()

    def send(self, data: bytes, deadline: float) -> bool | None:
        """Write `data` whole: True; None if the process died; False once the deadline passed."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.conn_fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for fd, events in self._writer.poll(math.ceil(remaining * 1000)):
                if fd != self.conn_fd:
                    self._read()  # what it sent before it died still counts
                    return None
                if events & (select.POLLIN | select.POLLHUP) and not self._read():
                    return None
        return True

    def receive(self, deadline: float) -> list[Any] | Literal[False] | None:
        """The next message; None if the process died; False once the deadline has passed."""
        while True:
            payload = self._next_frame()
            if payload is not None:
                try:
                    message = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    return None
                return message if isinstance(message, list) and message else None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = self._poller.poll(math.ceil(remaining * 1000))
            if not ready:
                continue
            # The pipe before the sentinel: what the child sent before it died still counts.
            if not any(fd == self.conn_fd for fd, _ in ready) or not self._read():
                return None

    def _read(self) -> bool:
        """Take what the pipe holds into the inbox; False at its end (the process is gone)."""
        try:
            chunk = os.read(self.conn_fd, _READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self._inbox += chunk
        return bool(chunk)

    def _next_frame(self) -> bytes | None:
        """The next whole message read so far, if any."""
        inbox = self._inbox
        if len(inbox) < LENGTH.size:
            return None
        (size,) = LENGTH.unpack_from(inbox)
        start = LENGTH.size
        if size == -1:
            if len(inbox) < start + LONG_LENGTH.size:
                return None
            (size,) = LONG_LENGTH.unpack_from(inbox, start)
            start += LONG_LENGTH.size
        end = start + size
        if len(inbox) < end:
            return None
        payload = bytes(inbox[start:end])
        del inbox[:end]
        return payload

    def alive(self) -> bool:
        return not readable(self.process.sentinel)

    def kill(self) -> None:
        with self._lock:
            if self.exitcode is None and not self._released and self.alive():
                self.process.kill()

    def reap(self) -> int | None:
        """Kill if needed and wait for the process; safe from any thread, any number of times."""
        with self._lock:
            if self.exitcode is None and not self._released:
                if self.alive():
                    self.process.kill()
                self.process.join(_REAP_TIMEOUT_S)
                self.exitcode = self.process.exitcode
            return self.exitcode

    def release(self) -> None:
        """Reap, then close the pipe and the process handle (by the owner only)."""
        self.reap()
        with self._lock:
            if self._released:
                return
            self._released = True
            self.conn.close()
            if self.exitcode is not None:
                self.process.close()
