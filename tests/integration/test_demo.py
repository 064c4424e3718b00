"""`workers demo` runs start to finish on the embedded broker, as the README promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import brokers

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.kafka
def test_demo_handles_every_good_order_and_dead_letters_the_bad(tmp_path: Path) -> None:
    brokers.require_tansu()
    result = subprocess.run(
        [sys.executable, "-m", "workers", "demo"],
        cwd=tmp_path,  # the demo must not depend on being run from the repository
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every good order handled, exactly the bad ones dead-lettered" in result.stdout
    assert "dead_lettered: 5" in result.stdout
    letters = next(
        line.split(": ", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith("dead letters:")
    )
    assert len(Path(letters).read_text().splitlines()) == 5
