"""The dead-letter store contract on the file destination (needs no broker)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.contract.store import (
    DeadLetterStoreContract,
    DestinationContract,
    ReplayFlowContract,
    Scenario,
)
from workers.app import config as cfg

MAPPING = "orders"


class TestFileStore(DestinationContract, DeadLetterStoreContract):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def fresh_mapping(self) -> cfg.EventSourceMapping:
        return cfg.EventSourceMapping.model_validate(
            {
                "name": MAPPING,
                "function": "f",
                "source": {"type": "memory", "topic": "t"},
                "destination_config": {
                    "on_failure": {"type": "file", "path": str(self.tmp_path / uuid.uuid4().hex)}
                },
            }
        )


class TestFileReplay(ReplayFlowContract):
    records = 30
    poison = {3: "ValueError", 10: "ValueError", 17: "ValueError", 24: "ValueError"}
    until_idle_s = 0.5
    interrupt_wait_s = 60.0
    exactly_once_on_interrupt = True

    def scenario(self, tmp_path: Path) -> Scenario:
        s = Scenario(
            config=tmp_path / "mappings.yaml",
            mapping=MAPPING,
            out=tmp_path / "handled",
            fixed=tmp_path / "fixed",
            source="t",
            dlq=str(tmp_path / "dlq"),
        )
        function = {
            "handler": "tests.handlers.runtime_handlers:picky",
            "isolation": "thread",
            "environment": {
                "HANDLED_FILE": str(s.out),
                "FIXED_FILE": str(s.fixed),
                "POISON_IDS": ",".join(map(str, self.poison)),
            },
        }
        mapping = {
            "name": MAPPING,
            "function": "picky",
            "source": {"type": "memory", "topic": s.source, "generate": self.records},
            "batch_size": 5,
            "bisect_batch_on_function_error": True,
            "maximum_retry_attempts": 1,
            "destination_config": {"on_failure": {"type": "file", "path": s.dlq}},
        }
        config = {"functions": {"picky": function}, "event_source_mappings": [mapping]}
        s.config.write_text(yaml.safe_dump(config, sort_keys=False))
        return s

    def handled(self, s: Scenario) -> list[dict[str, Any]]:
        if not s.out.exists():
            return []
        lines = s.out.read_bytes().splitlines()
        return [{"n": orjson.loads(line)["id"], "replay": None} for line in lines]

    def letters_file(self, s: Scenario) -> Path:
        return Path(s.dlq) / f"{MAPPING}.jsonl"

    def dlq_state(self, s: Scenario) -> Any:
        done = Path(s.dlq) / f"{MAPPING}.replayed"
        return self.letters_file(s).read_bytes(), done.exists() and done.read_bytes()

    def source_prefix(self, s: Scenario) -> str:
        return f"{s.source}-0@"

    def write_raw(self, s: Scenario, bodies: Sequence[bytes]) -> None:
        with self.letters_file(s).open("ab") as f:
            f.writelines(body + b"\n" for body in bodies)

    def check_rows(self, s: Scenario, rows: list[dict[str, Any]]) -> None:
        assert sorted(r["source"] for r in rows) == sorted(f"t-0@{i}" for i in self.poison)

    def check_shown(self, s: Scenario, letter: dict[str, Any]) -> None:
        item = letter["payload"]["records"][f"{s.source}-0"][0]
        assert item["valueDecoded"]["id"] in self.poison
        assert letter["error"]["errorMessage"].startswith("cannot handle")
