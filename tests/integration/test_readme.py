"""The README's quickstart, pasted block by block into one shell in a fresh copy of the
repository: every ```sh block runs as written, in order, and must end with the dead letter
replayed. Keeps the first page of the docs from rotting."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_PORT = 9092  # the port the README's blocks use

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def sh_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def fresh_copy(destination: Path) -> Path:
    """The repository's files as a new clone has them (tracked, plus new files not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = sh_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 5, "the README's quickstart blocks are not fenced as ```sh"
    assert port_free(QUICKSTART_PORT), f"the quickstart needs port {QUICKSTART_PORT}, in use"
    clone = fresh_copy(tmp_path / "esm-workers")
    script = "set -euo pipefail\n" + "\n".join(blocks)
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RATES")}
    # The clone's own virtual environment, not the one running the tests.
    environ["PATH"] = ":".join(
        p for p in environ.get("PATH", "").split(":") if not p.startswith(str(REPO))
    )
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=clone,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=420)
    finally:
        # The broker started with `&` must not outlive the test, whatever happened.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, output[-6000:]
    assert "produced 5 orders to 'orders'" in output
    assert "mappings.yaml: ok (1 function(s), 1 mapping(s))" in output
    assert "mapping orders: polled=5 succeeded=4 dead_lettered=1 dropped=0" in output
    assert "order 5: no rate for CHF" in output
    assert "orders: 1 dead letter(s) to replay" in output
    assert '"letters":1,"records":1,"succeeded":1,"failed_again":0' in output
    assert "order 5: 31.50 EUR" in output
    assert output.rstrip().endswith("orders: 0 dead letter(s) to replay"), output[-2000:]
