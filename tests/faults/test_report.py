"""The reliability table renders the latest result of each scenario on each broker."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.faults.report import latest, main, read_results, table

pytestmark = pytest.mark.faults


def test_latest_result_per_scenario_and_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    rows = [
        {"scenario": "b", "broker": "redis", "produced": 1, "recovery_s": None},
        {"scenario": "a", "broker": "rabbitmq", "produced": 2, "recovery_s": 1.234},
        {"scenario": "a", "broker": "kafka", "produced": 3, "lost": 0, "recovery_s": 2},
        {"scenario": "a", "broker": "kafka", "produced": 4, "lost": 0, "recovery_s": 3},
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows) + b"{torn")
    results = latest(read_results(path))
    assert [(r["scenario"], r["broker"], r["produced"]) for r in results] == [
        ("a", "kafka", 4),
        ("a", "rabbitmq", 2),
        ("b", "redis", 1),
    ]
    lines = table(results).splitlines()
    assert lines[0].startswith("| scenario | broker | produced |")
    assert lines[2] == "| a | Kafka (Tansu) | 4 | - | - | 0 | - | 3.0 s |"
    assert lines[3].endswith("| 1.2 s |")
    assert main([str(path)]) == 0
    assert "| b | Redis | 1 |" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.jsonl")]) == 1
