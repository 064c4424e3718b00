"""A poison record on a Kafka partition, retried forever: during the run, `workers run` reports
that partition (and only it) as stalled in its log, `/status` and `esm_stalled_units`, and the
status page, rendered in headless Chromium, shows the mapping, its numbers, its charts and the
stalled partition, with the record's error as text."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import brokers, browser
from tests.brokers import KafkaRecord, Tansu

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

REPO = Path(__file__).resolve().parents[2]
# A short session: Tansu joins a member after half of it (tests/brokers.py).
CLIENT_CONFIG = dict(brokers.KAFKA_TEST_SESSION)
# Markup in the poison record: the handler's error quotes it, and the page must show it as text.
POISON = '</script><b id="injected">poison</b>'
GOOD = 20  # records on partition 1, all handled
BEFORE = 3  # records before the poison record on partition 0 (so it is offset 3)
STALLED_AFTER_S = 2


@dataclass
class Run:
    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            body: bytes = r.read()
            return body.decode()

    def status(self, query: str = "") -> dict[str, Any]:
        status: dict[str, Any] = orjson.loads(self.get("/status" + query))
        return status

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                got = check()
            except OSError:  # the endpoint is not up yet
                got = None
            if got:
                return got
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def stalled(self) -> dict[str, Any]:
        status = self.status("?history=1")
        history = status["history"]["mappings"].get(self.name, {})
        # Charts need a few samples: wait for them as well as for the stall.
        if len([r for r in history.get("records_per_s", []) if r is not None]) < 2:
            return {}
        stalled: dict[str, Any] = status["pollers"][0]["stalled"]
        return stalled


@pytest.fixture(scope="module")
def run(kafka_broker: Tansu, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    bootstrap = kafka_broker.bootstrap
    name = brokers.unique_name("stall")
    brokers.create_topic(bootstrap, name, 2)
    records = [KafkaRecord(f"ok{i}", partition=0) for i in range(BEFORE)]
    records += [KafkaRecord(POISON, partition=0), KafkaRecord("after", partition=0)]
    records += [KafkaRecord(f"good{i}", partition=1) for i in range(GOOD)]
    brokers.produce(bootstrap, name, records)
    tmp = tmp_path_factory.mktemp("status-page")
    config = {
        "functions": {
            "f": {
                "handler": "tests.handlers.kafka_handlers:record_lines",
                "isolation": "thread",
                "environment": {"KAFKA_OUT": str(tmp / "handled.txt"), "KAFKA_POISON": POISON},
            }
        },
        "event_source_mappings": [
            {
                "name": name,
                "function": "f",
                "source": {
                    "type": "kafka",
                    "bootstrap_servers": bootstrap,
                    "topics": [name],
                    "client_config": CLIENT_CONFIG,
                },
                "batch_size": 10,
                "maximum_batching_window_s": 0.05,
                "bisect_batch_on_function_error": True,
                "maximum_retry_attempts": -1,
                "stalled_after_s": STALLED_AFTER_S,
            }
        ],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = brokers.free_port()
    log = tmp / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", str(path), "--metrics-port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Run(name, port, log, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 0, log.read_text()[-3000:]


def test_a_poison_record_retried_forever_stalls_its_partition(run: Run) -> None:
    stalled = run.wait_for("stalled partition in /status", run.stalled)
    p0, p1 = f"{run.name}-0", f"{run.name}-1"
    assert set(stalled) == {p0}
    entry = stalled[p0]
    assert entry["reason"] == "retrying"
    assert entry["record"] == {"partition": p0, "offset": BEFORE}
    assert entry["records"] == 1 and entry["attempt"] >= 1
    assert entry["errorType"] == "ValueError" and POISON in entry["errorMessage"]
    assert entry["for_s"] >= STALLED_AFTER_S and entry["unsettled"] >= 2
    status = run.status()
    assert status["summary"][run.name]["succeeded"] == BEFORE + GOOD
    assert status["summary"][run.name]["checkpoints"] == {p0: BEFORE, p1: GOOD}
    (mapping,) = status["mappings"]
    assert mapping["name"] == run.name and mapping["stalled_units"] == [p0]
    assert "history" not in status  # only with ?history=1
    metrics = {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(run.get("/metrics"))
        for sample in family.samples
    }
    assert metrics[("esm_stalled_units", (("mapping", run.name),))] == 1.0
    stalled_for = [k[1] for k in metrics if k[0] == "esm_stalled_seconds"]
    assert stalled_for == [(("mapping", run.name), ("partition", p0))]
    text = run.log.read_text()
    warning = f"mapping {run.name}: {p0} has not moved for"
    assert text.count(warning) == 1, text[-3000:]  # once per stall
    line = next(line for line in text.splitlines() if warning in line)
    assert f"partition {p0}, offset {BEFORE} (1 record(s)) failed attempt" in line
    assert "ValueError: poison:" in line


def test_the_status_page_shows_the_mapping_its_charts_and_the_stalled_partition(
    run: Run, tmp_path: Path
) -> None:
    run.wait_for("stalled partition in /status", run.stalled)
    dom = browser.render(f"http://127.0.0.1:{run.port}/", tmp_path)
    mapping = dom.rows("mappings", "data-mapping")[run.name]
    name, state, rate, lag, in_flight, succeeded, letters, error = mapping.cells
    assert name == run.name
    assert "Enabled" in state and "1 stalled" in state
    assert mapping.attrs["class"] == "stalled"
    assert mapping.polylines == 2  # throughput and lag, each a line of samples
    assert float(rate.replace(",", "")) >= 0 and int(lag) >= 0
    assert int(in_flight) == 1  # the poison record's batch, retrying
    assert int(succeeded) == BEFORE + GOOD
    assert int(letters) == 0
    assert error.startswith("ValueError: poison:") and POISON in error
    units = dom.rows("units", "data-unit")
    p0, p1 = units[f"{run.name}-0"], units[f"{run.name}-1"]
    assert p0.attrs.get("data-stalled") == "true"
    assert p0.cells[4] == str(BEFORE)  # its checkpoint: the poison record's offset
    assert p0.cells[5].startswith("stalled for ")
    assert f"offset {BEFORE} failed attempt" in p0.cells[5] and POISON in p0.cells[5]
    assert "data-stalled" not in p1.attrs and p1.cells[5] == "moving"
    assert p1.cells[4] == str(GOOD)
    # The error's markup stayed text: no element of it made it into the page.
    assert "injected" not in dom.ids
    # It refreshed itself from /status in the browser (fetch, allowed by its own policy).
    assert int(dom.root["data-updates"]) >= 1
