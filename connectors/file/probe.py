"""`workers validate --connect` for a file destination's directory: it exists and can be written, so
a mapping never starts with letters that nothing can store (they would stall their partition
until it is fixed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from workers.engine.probing import DestinationUnusable


def probe_destination(dst: Any) -> str:
    return _probe_directory(Path(dst.path))


def _probe_directory(directory: Path) -> str:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: a read-only mount or a full disk answers only to that.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".esm-probe-") as probe:
            probe.write(b"{}\n")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise DestinationUnusable(
            f"directory {str(directory)!r} cannot take letters: {exc.strerror or exc}"
        ) from None
    return f"directory {str(directory)!r} is writable"
