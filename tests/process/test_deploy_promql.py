"""deploy/kubernetes: the KEDA ScaledObject's query, evaluated by Prometheus' own promtool on
series shaped like the ones `workers run` exports (`esm_offset_lag{mapping, partition}`,
`esm_stalled_units{mapping}`, each with the labels of the pod it was scraped from): lag is
summed per mapping, each partition or queue once, and a mapping with stalled units gives no
answer (KEDA then keeps the replicas as they are)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.brokers import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
SCALED_OBJECT = REPO / "deploy" / "kubernetes" / "keda-scaledobject.yaml"


def promtool() -> str:
    found = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent)
    )
    if found is None:
        skip_or_fail("no promtool: `make test` installs it (scripts/promtool.sh .venv/bin)")
    return found


def lag(mapping: str, partition: str, value: int, pod: str = "a") -> dict[str, str]:
    # Prometheus adds the pod's labels to every series it scrapes.
    return {
        "series": f'esm_offset_lag{{mapping="{mapping}", partition="{partition}", pod="{pod}"}}',
        "values": str(value),
    }


def stalled(mapping: str, value: int, pod: str = "a") -> dict[str, str]:
    return {
        "series": f'esm_stalled_units{{mapping="{mapping}", pod="{pod}"}}',
        "values": str(value),
    }


def case(query: str, series: list[dict[str, str]], expected: int | None) -> dict[str, Any]:
    samples = [] if expected is None else [{"labels": '{mapping="orders"}', "value": expected}]
    return {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [{"expr": query, "eval_time": "0m", "exp_samples": samples}],
    }


def evaluate(query: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    partitions = [lag("orders", "orders-0", 100), lag("orders", "orders-1", 50)]
    tests = [
        # Nothing stalled: the lag of every partition, for this mapping only.
        case(query, [*partitions, stalled("orders", 0), lag("payments", "p-0", 7)], 150),
        # A stalled partition: no answer at all.
        case(query, [*partitions, stalled("orders", 1)], None),
        # Another mapping's stalled units change nothing here.
        case(query, [*partitions, stalled("orders", 0), stalled("payments", 2)], 150),
        # Before the first stall is reported the gauge may be absent: the lag still counts.
        case(query, partitions, 150),
        # Partitions owned by two replicas, one of them moving (reported by both for a moment),
        # the other replica with nothing stalled: each partition counted once.
        case(
            query,
            [
                lag("orders", "orders-0", 100, pod="a"),
                lag("orders", "orders-1", 50, pod="b"),
                lag("orders", "orders-1", 50, pod="a"),
                stalled("orders", 0, pod="a"),
                stalled("orders", 0, pod="b"),
            ],
            150,
        ),
        # A queue: every replica reports its depth. A stall on one replica is the mapping's.
        case(query, [lag("orders", "q", 150, pod="a"), lag("orders", "q", 150, pod="b")], 150),
        case(
            query,
            [
                lag("orders", "q", 150, pod="a"),
                lag("orders", "q", 150, pod="b"),
                stalled("orders", 0, pod="a"),
                stalled("orders", 1, pod="b"),
            ],
            None,
        ),
    ]
    path = tmp_path / "keda-query-test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [], "tests": tests}))
    return subprocess.run(
        [promtool(), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_scaled_object_query_sums_lag_and_leaves_out_stalled_mappings(
    tmp_path: Path,
) -> None:
    scaled = yaml.safe_load(SCALED_OBJECT.read_text())
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    done = evaluate(metadata["query"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # No answer must hold the replicas, not read as zero lag (KEDA's default).
    assert metadata["ignoreNullValues"] == "false"


@pytest.mark.parametrize(
    ("query", "caught"),
    [
        # esm_stalled_units has no partition label: matching on it never leaves anything out.
        (
            'sum by (mapping) (max by (mapping, partition) (esm_offset_lag{mapping="orders"})'
            ' unless on(mapping, partition) (esm_stalled_units{mapping="orders"} > 0))',
            'exp: nil\n        got: {mapping="orders"} 1.5E+02',
        ),
        # Summing every series counts a queue once per replica.
        (
            'sum by (mapping) (esm_offset_lag{mapping="orders"})'
            ' unless on(mapping) (max by (mapping) (esm_stalled_units{mapping="orders"}) > 0)',
            'exp: {mapping="orders"} 1.5E+02\n        got: {mapping="orders"} 3E+02',
        ),
    ],
)
def test_the_cases_catch_a_wrong_query(tmp_path: Path, query: str, caught: str) -> None:
    done = evaluate(query, tmp_path)
    assert done.returncode != 0
    assert caught in done.stderr, done.stderr
