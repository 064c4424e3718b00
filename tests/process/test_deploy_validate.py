"""deploy/kubernetes: the ConfigMap's mappings through `workers validate`, with the Secret's
variables, as the Deployment runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return document


def test_configmap_mappings_validate(tmp_path: Path) -> None:
    config = tmp_path / "mappings.yaml"
    config.write_text(load("configmap.yaml")["data"]["mappings.yaml"])
    # The handler of the example, as a user's image would hold it under the working directory.
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "handlers.py").write_text("def handle_orders(event, context):\n    pass\n")
    secret = {**load("secret.yaml")["stringData"], "KAFKA_SASL_PASSWORD": "pw-7f3a9c"}
    done = subprocess.run(
        [sys.executable, "-m", "workers", "validate", str(config)],
        cwd=tmp_path,
        env={**os.environ, **secret, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok (1 function(s), 1 mapping(s))" in done.stdout
    assert "pw-7f3a9c" not in done.stdout + done.stderr
