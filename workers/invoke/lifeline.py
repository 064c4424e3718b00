"""Child processes that die with their parent: pollers with the supervisor, execution
environments with their poller, however the parent ends (kill -9 included).

A multiprocessing child holds the read end of a pipe whose write end only its parent holds
(`multiprocessing.parent_process().sentinel`): it becomes readable when the parent is gone, and
at once if the parent died before the child looked, so no start-up race is left open. On Linux,
PR_SET_PDEATHSIG adds a kernel-level signal for a child whose Python threads cannot run.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("workers.lifeline")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def on_parent_death(callback: Callable[[int], None]) -> bool:
    """Call `callback(parent_pid)` from a daemon thread once this process's multiprocessing
    parent has gone; False (and nothing watched) when there is no such parent."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return False
    sentinel, pid = parent.sentinel, parent.pid or 0

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        callback(pid)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies: the kernel's signal (Linux) and the parent's
    pipe, which also covers a parent that died before this was called."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    on_parent_death(lambda _pid: os.kill(os.getpid(), signal.SIGKILL))
