"""The status page at `/`: one HTML file with its style and script inline (no build step, no
external asset), served with `/status` as it is now embedded, and refreshing itself from
`/status`. Mapping names, error messages and coordinates come from configuration and records:
the page only ever puts them in the document as text, and the embedded JSON cannot end its
script element."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib.resources import files
from typing import Any

import orjson

PLACEHOLDER = "{{status}}"


@functools.cache
def template() -> str:
    return files("workers.app").joinpath("status_page.html").read_text("utf-8")


@functools.cache
def headers() -> dict[str, str]:
    """The page's own inline script runs (allowed by its hash); nothing else can, and nothing
    is loaded from anywhere but `/status`."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", template(), re.S)
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline';"
        " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    }


def embed(data: Any) -> str:
    """`data` as JSON that is inert inside a `<script>` element: `<`, `>` and `&` escaped, so no
    `</script>` or `<!--` in a mapping name or an error message can end or bend it."""
    text = orjson.dumps(data).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(status: dict[str, Any]) -> bytes:
    return template().replace(PLACEHOLDER, embed(status), 1).encode()
