"""bench.budget's arithmetic: CPU per record by role, and the rate the cores allow."""

from __future__ import annotations

from bench.budget import per_record, render


def test_cpu_per_record_by_role() -> None:
    cpu = {
        "window_s": 2.0,
        "supervisor_cpu_s": 0.1,
        "pollers_cpu_s": 1.9,
        "environments_cpu_s": 1.0,
        "helpers_cpu_s": 0.05,  # the forkserver: not a record's cost
        "broker_s": 0.5,
        "machine_s": 3.6,
    }
    got = per_record(cpu, 1_000_000, 2.0)
    assert got["us_per_record"] == {
        "client": 2.0,
        "environments": 1.0,
        "broker": 0.5,
        "total": 3.5,
    }
    assert got["machine_cores"] == 1.8


def test_a_window_shorter_than_the_run_counts_its_share_of_the_records() -> None:
    got = per_record({"window_s": 1.0, "pollers_cpu_s": 1.0}, 1_000_000, 2.0)
    assert got["us_per_record"]["client"] == 2.0  # 500,000 records in the window


def test_the_table_names_the_rate_the_cores_allow() -> None:
    def run(rate: float, client: float, env: float, broker: float) -> dict[str, object]:
        us = {"client": client, "environments": env, "broker": broker}
        return {
            "rate": rate,
            "us_per_record": {**us, "total": client + env + broker},
            "machine_cores": 1.5,
        }

    results = {
        "started": "2026-12-02T00:00:00Z",
        "cpus": 2,
        "python": "3.11",
        "repeats": 1,
        "brokers": {
            "kafka": {
                "median": {
                    "raw": run(800_000, 1.5, 0.0, 0.5),
                    "thread": run(250_000, 4.0, 0.0, 1.0),
                    "process": run(300_000, 3.0, 1.5, 0.5),
                }
            }
        },
    }
    lines = render(results).splitlines()
    raw = next(line for line in lines if "raw client loop" in line)
    process = next(line for line in lines if "(process)" in line)
    assert "| 2.00 | 1,000,000 |" in raw  # 2 cores / 2 µs per record
    assert "| 0.38 | 3.00 | 1.50 | 0.50 | 5.00 | 400,000 |" in process
    thread = next(line for line in lines if "(thread)" in line)
    assert "| — |" in thread  # no environments under thread isolation
