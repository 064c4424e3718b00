"""What `/status`, the status page and `esm_stalled_units` make of the pollers' reports."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson

from tests.unit.test_metrics import exposition
from workers.app import page
from workers.app.history import History, Snapshot, mappings_of

STALLED = {"t-0": {"reason": "retrying", "record": {"partition": "t-0", "offset": 3}}}


def test_mappings_put_their_pollers_reports_together() -> None:
    old_error = {"errorType": "A", "errorMessage": "old", "at": "2026-01-01T00:00:00.000Z"}
    new_error = {"errorType": "B", "errorMessage": "new", "at": "2026-01-01T00:00:05.000Z"}
    snaps: list[Snapshot] = [
        ("k", 0, True, {"lag": {"t-0": 5, "q": 7}, "in_flight": 2, "stalled": STALLED,
                        "last_error": new_error, "succeeded": 10, "destination": {"state": "ok"}}),
        ("k", 1, True, {"lag": {"q": 9}, "in_flight": 1, "last_error": old_error,
                        "dead_lettered": 2, "destination": {"state": "refusing"}}),
        # A dead poller: its counters count, its stall and batches are not of now.
        ("k", 2, False, {"stalled": {"t-9": {}}, "in_flight": 4, "succeeded": 1}),
        ("r", 0, True, {}),
    ]  # fmt: skip
    k, r = mappings_of(snaps)["k"], mappings_of(snaps)["r"]
    assert k["lag"] == 5 + 9  # a queue every consumer reports is counted once
    assert (k["pollers"], k["alive"], k["in_flight"]) == (3, 2, 3)
    assert k["stalled_units"] == ["t-0"]
    assert k["last_error"] == new_error
    assert (k["succeeded"], k["dead_lettered"]) == (11, 2)
    assert k["destination"] == "refusing"
    assert r == {**r, "lag": 0, "stalled_units": [], "last_error": None, "destination": "none"}


def test_history_keeps_rates_and_lag_of_the_last_minutes() -> None:
    reports: list[Snapshot] = []
    history = History(lambda: reports, every_s=2.0, keep_s=6.0)
    for at_ms, done, lag in ((0, 0, 50), (2000, 100, 30), (4000, 300, 10), (6000, 20, 0)):
        # The last report comes from a restarted poller, counting from zero again.
        reports[:] = [("m", 0, True, {"succeeded": done, "lag": {"p": lag}, "in_flight": 1})]
        history.sample(at_ms)
    series = history.as_json()["mappings"]["m"]
    assert series["at"] == [2000, 4000, 6000]  # three samples kept
    assert series["records_per_s"] == [50.0, 100.0, 0.0]
    assert series["lag"] == [30, 10, 0]
    assert series["in_flight"] == [1, 1, 1]
    assert history.as_json()["every_s"] == 2.0


def test_the_first_sample_has_no_rate_yet() -> None:
    history = History(lambda: [("m", 0, True, {"succeeded": 5})])
    history.sample(1000)
    assert history.as_json()["mappings"]["m"]["records_per_s"] == [None]


def test_stalled_units_gauge_counts_units_of_live_pollers() -> None:
    text = exposition(
        [
            ("k", 0, True, {"stalled": STALLED}),
            ("k", 1, True, {"stalled": {"t-1": {}}}),
            ("k", 2, False, {"stalled": {"t-2": {}}}),
            ("quiet", 0, True, {}),
        ]
    )
    assert 'esm_stalled_units{mapping="k"} 2.0' in text
    assert 'esm_stalled_units{mapping="quiet"} 0.0' in text


def test_each_stalled_unit_has_a_series_of_how_long() -> None:
    text = exposition(
        [
            # Two consumers of one queue both see it stalled: one series, the longer.
            ("r", 0, True, {"stalled": {"q": {"for_s": 75.5}}}),
            ("r", 1, True, {"stalled": {"q": {"for_s": 80.0}}}),
            ("r", 2, False, {"stalled": {"old": {"for_s": 9.0}}}),
            ("k", 0, True, {"lag": {"t-0": 4}}),
        ]
    )
    series = [line for line in text.splitlines() if line.startswith("esm_stalled_seconds{")]
    assert series == ['esm_stalled_seconds{mapping="r",partition="q"} 80.0']


HOSTILE = "</script><script>alert(1)</script><!-- & <b id=injected>"


def embedded_status(html: str) -> Any:
    found = re.search(
        r'<script id="status-data" type="application/json">(.*?)</script>', html, re.S
    )
    assert found is not None
    return orjson.loads(found.group(1))


def test_the_page_embeds_the_status_as_inert_json() -> None:
    status = {"pollers": [], "mappings": [{"name": "m", "last_error": {"errorMessage": HOSTILE}}]}
    html = page.render(status).decode()
    # Nothing from the data can end the script element or start markup of its own.
    assert HOSTILE not in html and "<b id=injected>" not in html
    assert html.count("</script>") == 2  # the data's element and the page's script
    assert embedded_status(html) == status


def test_only_the_pages_own_script_may_run() -> None:
    html = page.render({}).decode()
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    policy = page.headers()["Content-Security-Policy"]
    assert f"script-src 'sha256-{digest}';" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # Everything the page shows goes in as text: no markup is ever built from data.
    assert "innerHTML" not in scripts[0] and "insertAdjacentHTML" not in scripts[0]
