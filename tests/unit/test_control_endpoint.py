"""The control endpoints on the metrics port and `workers mappings`, against a supervisor that
runs no pollers: routing, the bearer token, and what the command prints and exits with."""

from __future__ import annotations

import logging
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import orjson
import pytest

from workers.app import control, metrics
from workers.app.cli import main
from workers.app.supervisor import Supervisor

TOKEN = "s3cret-token-value"


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sup = Supervisor(
        tmp_path / "mappings.yaml",
        [("orders", 0), ("orders", 1), ("audit", 0)],
        enabled={"orders": True, "audit": False},
    )
    yield sup
    shutil.rmtree(sup._run_dir, ignore_errors=True)


def serve(supervisor: Supervisor) -> tuple[str, object]:
    server = metrics.serve(supervisor, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.server_address[1]}", server


def report(supervisor: Supervisor, mapping: str, state: str) -> None:
    """What the mapping's pollers would report."""
    for child in supervisor.children:
        if child.mapping == mapping:
            child.snapshot = {"state": state}


def request(
    url: str, method: str = "GET", token: str | None = None
) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_states_follow_what_the_pollers_report(supervisor: Supervisor) -> None:
    url, server = serve(supervisor)
    try:
        # No poller has reported yet: each mapping is on its way to the state it should have.
        assert request(url + "/mappings") == (
            200,
            {
                "mappings": [
                    {"name": "orders", "state": "Enabling"},
                    {"name": "audit", "state": "Disabling"},
                ]
            },
        )
        report(supervisor, "orders", "Enabled")
        report(supervisor, "audit", "Disabled")
        assert request(url + "/mappings")[1]["mappings"] == [
            {"name": "orders", "state": "Enabled"},
            {"name": "audit", "state": "Disabled"},
        ]
        assert request(url + "/mappings/orders/disable", "POST") == (
            200,
            {"name": "orders", "state": "Disabling"},
        )
        assert supervisor.enabled == {"orders": False, "audit": False}
        supervisor.children[0].snapshot = {"state": "Disabled"}
        assert supervisor.states()["orders"] == "Disabling"  # until every poller is
        supervisor.children[1].snapshot = {"state": "Disabled"}
        assert supervisor.states()["orders"] == "Disabled"
        assert request(url + "/mappings/audit/enable", "POST")[1] == {
            "name": "audit",
            "state": "Enabling",
        }
        mappings = cast("list[dict[str, object]]", request(url + "/status")[1]["mappings"])
        assert [{k: m[k] for k in ("name", "state")} for m in mappings] == [
            {"name": "orders", "state": "Disabled"},
            {"name": "audit", "state": "Enabling"},
        ]
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_wrong_methods_and_unknown_mappings(supervisor: Supervisor) -> None:
    url, server = serve(supervisor)
    try:
        code, body = request(url + "/mappings/nope/enable", "POST")
        assert code == 404
        assert body == {
            "error": "no mapping named 'nope'",
            "mapping": "nope",
            "known": ["audit", "orders"],
        }
        assert request(url + "/mappings/orders/enable")[0] == 405
        assert request(url + "/mappings", "POST")[0] == 405
        assert request(url + "/mappings/orders/pause", "POST")[0] == 404
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_with_a_token_every_control_request_needs_it(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(control.TOKEN_ENV, TOKEN)
    url, server = serve(supervisor)
    try:
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
            code, body = request(url + "/mappings", token=token)
            assert code == 401 and TOKEN not in str(body)
            assert request(url + "/mappings/orders/disable", "POST", token)[0] == 401
        assert supervisor.enabled["orders"] is True
        assert request(url + "/mappings", token=TOKEN)[0] == 200
        assert request(url + "/mappings/orders/disable", "POST", TOKEN)[0] == 200
        assert supervisor.enabled["orders"] is False
        # Basic or another scheme with the right secret is not a bearer token.
        req = urllib.request.Request(url + "/mappings", headers={"Authorization": f"Basic {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401
        # Metrics, health and status stay open to scrapers and probes.
        with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
            assert answer.status == 200
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text


def test_a_public_address_without_a_token_is_warned_about(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    server = metrics.serve(supervisor, "0.0.0.0", 0)
    server.shutdown()
    assert "set ESM_CONTROL_TOKEN" in caplog.text


# --- workers mappings ----------------------------------------------------------------------------


def test_cli_lists_enables_and_disables(
    supervisor: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    url, server = serve(supervisor)
    report(supervisor, "orders", "Enabled")
    report(supervisor, "audit", "Disabled")
    try:
        assert main(["mappings", "list", "--url", url]) == 0
        assert capsys.readouterr().out == "orders  Enabled\naudit   Disabled\n"
        assert main(["mappings", "enable", "audit", "--url", url + "/"]) == 0
        assert capsys.readouterr().out == "audit  Enabling\n"
        assert supervisor.enabled["audit"] is True
        # --wait: until every poller reports the new state, else exit 1.
        assert main(["mappings", "disable", "orders", "--url", url, "--wait", "0.3"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "orders  Disabling\n"
        assert "orders is not Disabled after 0.3s" in captured.err
        report(supervisor, "orders", "Disabled")
        assert main(["mappings", "disable", "orders", "--url", url, "--wait", "5"]) == 0
        assert capsys.readouterr().out == "orders  Disabled\n"
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_cli_errors(
    supervisor: Supervisor, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(control.TOKEN_ENV, TOKEN)
    url, server = serve(supervisor)
    try:
        assert main(["mappings", "enable", "nope", "--url", url]) == 2
        assert capsys.readouterr().err == (
            f"error: no mapping named 'nope' at {url} (known: audit, orders)\n"
        )
        monkeypatch.setenv(control.TOKEN_ENV, "wrong")
        assert main(["mappings", "list", "--url", url]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {url} refused the request: unauthorized (wrong token)\n"
        monkeypatch.delenv(control.TOKEN_ENV)
        assert main(["mappings", "list", "--url", url]) == 1
        assert "set ESM_CONTROL_TOKEN to the instance's token" in capsys.readouterr().err
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["mappings", "list", "--url", closed]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {closed}: ") and "refused" in err
    assert main(["mappings", "list", "--url", "127.0.0.1:9"]) == 2
    assert "expected http://HOST:PORT" in capsys.readouterr().err
