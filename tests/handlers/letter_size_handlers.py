"""Handler for the tests of letters too large for their destination.

LETTERS_OUT: file that gets one line per handled record, "<topic>-<partition> <offset>".
"""

from __future__ import annotations

import base64
import os
from typing import Any


def fail_marked(event: dict[str, Any], context: Any) -> None:
    """Fails the whole batch when a record's value starts with b"fail"; else logs each record."""
    lines: list[str] = []
    for unit, records in event["records"].items():
        for r in records:
            if base64.b64decode(r["value"][:8]).startswith(b"fail"):
                raise ValueError(f"failing record {unit}@{r['offset']}")
            lines.append(f"{unit} {r['offset']}\n")
    fd = os.open(os.environ["LETTERS_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)
