"""The status page in headless Chromium, served as `workers run` serves it (same headers), from
a hand-made `/status` full of markup: everything shows as text, the page's own script runs under
its Content-Security-Policy, and a refresh brings what `/status` says now, a mapping's `state`
from the live control included."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import browser
from workers.app import page

HOSTILE = '<img src=x onerror="document.title=1" id="injected">'
UNIT = f"orders{HOSTILE}"  # a Redis stream may be named anything


def status(*, state: str | None) -> dict[str, Any]:
    """A mapping with one stalled stream; `state` as the live control reports it, if at all."""
    error = {"errorType": "KeyError", "errorMessage": HOSTILE, "at": "2026-01-01T00:00:00.000Z"}
    mapping: dict[str, Any] = {
        "name": "orders",
        "lag": 42,
        "in_flight": 3,
        "stalled_units": [UNIT],
        "last_error": error,
        "destination": "refusing",
    }
    if state is not None:
        mapping["state"] = state
    stalled = {
        "reason": "destination_refusing",
        "destination": f"no queue {HOSTILE}",
        "for_s": 301.5,
        "lag": 0,
        "unsettled": 7,
    }
    return {
        "mappings": [mapping],
        "pollers": [
            {
                "mapping": "orders",
                "instance": 0,
                "alive": True,
                "assigned": [UNIT, "other"],
                "lag": {UNIT: 40, "other": 2},
                "checkpoints": {UNIT: {"stream": UNIT, "id": "1-0"}, "other": {"id": "9-0"}},
                "stalled": {UNIT: stalled},
                "throttle": {"state": "open"} if state is not None else {},
            }
        ],
        "summary": {"orders": {"succeeded": 1234, "dead_lettered": 5, "dropped": 1}},
        "history": {
            "every_s": 2.0,
            "mappings": {
                "orders": {
                    "at": [1000, 3000, 5000, 7000],
                    "records_per_s": [None, 10.0, 25.5, 12.0],
                    "lag": [90, 70, 50, 42],
                    "in_flight": [1, 3, 3, 3],
                }
            },
        },
    }


@pytest.fixture
def served() -> Iterator[str]:
    """`/` with the first status embedded, `/status?history=1` with the live control's state."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, headers = 200, {}
            if self.path == "/":
                body, kind = page.render(status(state=None)), "text/html; charset=utf-8"
                headers = page.headers()
            elif self.path == "/status?history=1":
                body, kind = orjson.dumps(status(state="Disabled")), "application/json"
            else:
                code, body, kind = 404, b"not found", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_shows_untrusted_text_as_text_and_refreshes_with_the_state(
    served: str, tmp_path: Path
) -> None:
    dom = browser.render(served, tmp_path, budget_ms=3000)
    assert int(dom.root["data-updates"]) >= 1  # its script ran, under its policy, and fetched
    row = dom.rows("mappings", "data-mapping")["orders"]
    _name, state, rate, lag, in_flight, succeeded, letters, error = row.cells
    assert "Disabled" in state and "throttled" in state and "1 stalled" in state
    assert row.polylines == 2
    assert (rate, lag, in_flight, succeeded) == ("12", "42", "3", "1,234")
    assert letters.startswith("6") and "1 dropped" in letters and "destination refusing" in letters
    assert error.startswith(f"KeyError: {HOSTILE}")
    units = dom.rows("units", "data-unit")
    assert set(units) == {UNIT, "other"}
    stalled = units[UNIT]
    assert stalled.cells[1] == UNIT
    assert stalled.cells[3] == "40" and stalled.cells[4] == "id 1-0"
    assert stalled.cells[5] == (
        f"stalled for 302 s: dead letters wait for the on-failure destination: no queue {HOSTILE}"
    )
    assert units["other"].cells[5] == "moving"
    assert "injected" not in dom.ids  # no markup from the data became an element
