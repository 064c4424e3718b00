"""The dead-letter store contract: what every on-failure destination must pass.

`DestinationContract`, `DeadLetterStoreContract` and `PublisherContract` test the ports of
workers/engine/ports.py (Destination, DeadLetterStore, SourcePublisher) as opened through the
registry; `ReplayFlowContract` and `ReplayToSourceContract` run `workers dlq list/show/replay`
through the command line. tests/contract/test_store_<type>.py subclass the capabilities their
destination has and provide the hooks; what only one broker does stays in its own file.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.cli import REPO, interrupted_replay
from workers.app import config as cfg
from workers.app import registry
from workers.engine.letters import REPLAY_HEADER
from workers.engine.ports import Source, StoredLetter
from workers.engine.records import Record


def letter(mapping: str, n: int) -> dict[str, Any]:
    """A dead letter of `mapping` as the engine writes one (fields a store reads back)."""
    return {
        "version": "1.0",
        "mapping": mapping,
        "timestamp": f"2026-01-01T00:00:{n:02d}.000Z",
        "requestContext": {
            "requestId": f"{uuid.uuid4()}-{n}",
            "condition": "RetryAttemptsExhausted",
            "approximateInvokeCount": 1,
        },
        "error": {"errorType": "ValueError", "errorMessage": f"cannot handle {n}"},
        "payload": {"eventSource": "test", "records": {}, "n": n, "text": "é\u2028\x00"},
    }


class StoreBase:
    """The hook every store capability needs."""

    def fresh_mapping(self) -> cfg.EventSourceMapping:
        """A mapping whose source and on-failure destination are new (and empty)."""
        raise NotImplementedError

    def deliver(self, mapping: cfg.EventSourceMapping, ns: Sequence[int]) -> list[dict[str, Any]]:
        destination = registry.open_destination(mapping)
        assert destination is not None
        letters = [letter(mapping.name, n) for n in ns]
        try:
            for one in letters:
                destination.deliver(one, [])
        finally:
            destination.close()
        return letters

    def read_back(self, mapping: cfg.EventSourceMapping) -> list[StoredLetter]:
        """Everything pending, read by a store of its own (closed again, nothing done)."""
        store = registry.open_dead_letter_store(mapping)
        try:
            return list(store.pending())
        finally:
            store.close()


class DestinationContract(StoreBase):
    """`deliver` returns once a letter is durable, and a store reads it back intact."""

    def test_delivered_letters_read_back_intact(self) -> None:
        mapping = self.fresh_mapping()
        assert self.read_back(mapping) == []
        letters = self.deliver(mapping, range(3))
        # Read through new connections: what deliver confirmed is stored, not buffered.
        stored = self.read_back(mapping)
        assert [s.id for s in stored] == [one["requestContext"]["requestId"] for one in letters]
        assert [s.letter for s in stored] == letters


class DeadLetterStoreContract(StoreBase):
    """`pending()` offers letters oldest first as the store stood when called; `done()` is
    durable; `close()` keeps what was not done."""

    def test_pending_is_oldest_first_and_reading_changes_nothing(self) -> None:
        mapping = self.fresh_mapping()
        letters = self.deliver(mapping, range(5))
        ids = [one["requestContext"]["requestId"] for one in letters]
        assert [s.id for s in self.read_back(mapping)] == ids
        assert [s.id for s in self.read_back(mapping)] == ids

    def test_done_is_durable(self) -> None:
        mapping = self.fresh_mapping()
        ids = [one["requestContext"]["requestId"] for one in self.deliver(mapping, range(4))]
        store = registry.open_dead_letter_store(mapping)
        try:
            for stored in store.pending():
                if stored.id in (ids[0], ids[2]):
                    store.done(stored)
        finally:
            store.close()
        assert [s.id for s in self.read_back(mapping)] == [ids[1], ids[3]]

    def test_letters_added_while_iterating_are_not_offered(self) -> None:
        mapping = self.fresh_mapping()
        ids = [one["requestContext"]["requestId"] for one in self.deliver(mapping, range(2))]
        store = registry.open_dead_letter_store(mapping)
        seen = []
        try:
            for stored in store.pending():
                seen.append(stored.id)
                if len(seen) == 1:
                    [late] = self.deliver(mapping, [9])  # a replay failing again writes one
                store.done(stored)
        finally:
            store.close()
        assert seen == ids
        assert [s.id for s in self.read_back(mapping)] == [late["requestContext"]["requestId"]]

    def test_close_keeps_the_letters_not_done(self) -> None:
        mapping = self.fresh_mapping()
        letters = self.deliver(mapping, range(3))
        store = registry.open_dead_letter_store(mapping)
        try:
            offered = list(store.pending())
            store.done(offered[1])
        finally:
            store.close()
        again = self.read_back(mapping)
        assert [s.letter for s in again] == [letters[0], letters[2]]


def poll_n(source: Source, n: int, timeout_s: float = 30.0) -> list[Record]:
    """Poll until `n` records arrived (or the timeout passed)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(source.poll(n - len(out), 0.5))
    return out


def settle(source: Source, records: Sequence[Record]) -> None:
    if source.capabilities.checkpoint == "offset":
        last: dict[str, int] = {}
        for r in records:
            last[r.source] = max(last.get(r.source, -1), r.position + 1)
        source.commit(last)
    else:
        source.ack(records)


class _NoListener:
    def on_assigned(self, units: Any) -> None:
        pass

    def on_revoked(self, units: Any) -> None:
        pass


class PublisherContract(StoreBase):
    """`publish` puts records back on the source with their keys and headers plus the replay
    header, confirmed before it returns."""

    join_timeout_s = 30.0

    def produce_source(
        self,
        mapping: cfg.EventSourceMapping,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """Write records to the mapping's source; a broker without keys or headers drops them."""
        raise NotImplementedError

    def test_publish_puts_records_back_with_keys_headers_and_the_replay_header(self) -> None:
        mapping = self.fresh_mapping()
        values = [f"v{i}".encode() for i in range(4)]
        keys: list[bytes | None] = [b"apple", b"banana", None, b"apple"]
        self.produce_source(mapping, values, keys, [("tenant", b"acme")])
        source = registry.open_source(mapping)
        source.open(_NoListener())
        try:
            originals = poll_n(source, len(values), self.join_timeout_s)
            assert sorted(r.value for r in originals) == values
            settle(source, originals)
            publisher = registry.open_source_publisher(mapping)
            try:
                publisher.publish(originals, 2)
            finally:
                publisher.close()
            replayed = poll_n(source, len(values), self.join_timeout_s)
            settle(source, replayed)
            assert source.poll(10, 0.5) == []  # each once
        finally:
            source.close()

        def kept(r: Record) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
            # x- headers are the broker's own (delivery counts), not the record's.
            named = [(n, v) for n, v in r.headers if n != REPLAY_HEADER and not n.startswith("x-")]
            return r.value, r.key, named

        assert sorted(map(kept, replayed)) == sorted(map(kept, originals))
        for r in replayed:
            assert [v for n, v in r.headers if n == REPLAY_HEADER] == [b"2"]


# --- the command line --------------------------------------------------------------------------


@dataclass
class Scenario:
    """A mapping whose source holds `records` records numbered 0.., the poison ones failing
    until `fixed` exists; the handler writes what it handled to `out`."""

    config: Path
    mapping: str
    out: Path
    fixed: Path
    source: str = ""
    dlq: str = ""
    # Whatever else a broker needs to check its own side (originals, clients).
    extra: dict[str, Any] = field(default_factory=dict)


def workers(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def summary_of(letters: int, succeeded: int, failed_again: int) -> dict[str, Any]:
    return {
        "letters": letters,
        "records": letters,
        "succeeded": succeeded,
        "failed_again": failed_again,
        "interrupted": False,
        "dry_run": False,
    }


class ReplayFlowContract:
    """`workers dlq list/show/replay --to handler` as a user runs them."""

    records = 20
    # n of the poison records and the error each raises until the handler is fixed.
    poison: dict[int, str] = {3: "ValueError", 7: "KeyError", 10: "ValueError", 15: "KeyError"}
    until_idle_s = 1.0
    # Slow enough that SIGTERM lands between letters.
    interrupt_flags: tuple[str, ...] = ("--rate", "2")
    interrupt_wait_s = 30.0
    # SIGTERM lets the letter in progress finish and be marked done (else it may come twice).
    exactly_once_on_interrupt = False

    # --- hooks -----------------------------------------------------------------------------------

    def scenario(self, tmp_path: Path) -> Scenario:
        """Write the config and the source records (fresh source and destination)."""
        raise NotImplementedError

    def handled(self, s: Scenario) -> list[dict[str, Any]]:
        """What the handler saw, one dict per record with at least `n` (int) and `replay`
        (the replay count, int, or None)."""
        raise NotImplementedError

    def dlq_state(self, s: Scenario) -> Any:
        """Everything a listing could change on the destination."""
        raise NotImplementedError

    def source_prefix(self, s: Scenario) -> str:
        """How the `source` column of a poison record's letter starts."""
        raise NotImplementedError

    def write_raw(self, s: Scenario, bodies: Sequence[bytes]) -> None:
        """Write messages that are no dead letter to the destination, as they are."""
        raise NotImplementedError

    def check_dead_lettered(self, s: Scenario) -> None:
        """Once the poison records are dead-lettered: the broker's own checks."""

    def check_rows(self, s: Scenario, rows: list[dict[str, Any]]) -> None:
        """The first listing of the letters: the broker's own checks."""

    def check_shown(self, s: Scenario, letter: dict[str, Any]) -> None:
        """`dlq show` of a letter: its payload as the broker's shape has it."""
        raise NotImplementedError

    def check_all_replayed(self, s: Scenario) -> None:
        """After everything was replayed: the progress as the broker keeps it."""

    def check_filtered_replay(self, s: Scenario) -> None:
        """After `--error-type ValueError` replayed those letters (failing again) and skipped
        the others: the progress as the broker keeps it."""

    def add_foreign(self, s: Scenario, letter: dict[str, Any]) -> int:
        """Write what a shared or damaged destination may hold besides this mapping's letters
        (`letter` is one of them, to copy); returns how many are no dead letter."""
        self.write_raw(s, [b"{not json", orjson.dumps({"x": 1})])
        return 2

    # --- helpers ---------------------------------------------------------------------------------

    @pytest.fixture
    def s(self, tmp_path: Path) -> Iterator[Scenario]:
        yield self.scenario(tmp_path)

    def handled_ns(self, s: Scenario) -> list[int]:
        return sorted(h["n"] for h in self.handled(s))

    def run(self, s: Scenario) -> None:
        done = workers("run", str(s.config), "--until-idle", str(self.until_idle_s))
        assert done.returncode == 0, done.stderr[-4000:]

    def pending(self, s: Scenario, *flags: str) -> list[dict[str, Any]]:
        result = workers("dlq", "list", str(s.config), s.mapping, "--json", *flags)
        assert result.returncode == 0, result.stderr[-4000:]
        return [orjson.loads(line) for line in result.stdout.splitlines()]

    def replay(self, s: Scenario, *flags: str) -> dict[str, Any]:
        result = workers("dlq", "replay", str(s.config), s.mapping, *flags)
        assert result.returncode == 0, result.stderr[-4000:]
        summary: dict[str, Any] = orjson.loads(result.stdout.strip().splitlines()[-1])
        return summary

    def show(self, s: Scenario, letter_id: str) -> subprocess.CompletedProcess[str]:
        return workers("dlq", "show", str(s.config), s.mapping, letter_id)

    def dead_letter_poison(self, s: Scenario) -> None:
        self.run(s)
        assert self.handled_ns(s) == [n for n in range(self.records) if n not in self.poison]
        s.out.unlink()
        self.check_dead_lettered(s)

    # --- the flows -------------------------------------------------------------------------------

    def test_list_show_and_replay_to_the_fixed_handler(self, s: Scenario) -> None:
        n = len(self.poison)
        self.dead_letter_poison(s)
        before = self.dlq_state(s)

        rows = self.pending(s)
        assert self.pending(s) == rows  # listing twice: same result
        assert self.dlq_state(s) == before  # and nothing changed
        assert sorted(r["error"] for r in rows) == sorted(self.poison.values())
        assert all(r["condition"] == "RetryAttemptsExhausted" for r in rows)
        assert all(r["records"] == 1 and r["replays"] == 0 for r in rows)
        assert all(r["source"].startswith(self.source_prefix(s)) for r in rows)
        assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)  # oldest first
        assert len(self.pending(s, "--limit", "2")) == 2
        self.check_rows(s, rows)

        shown = self.show(s, rows[1]["id"])
        assert shown.returncode == 0, shown.stderr
        letter = orjson.loads(shown.stdout)
        assert letter["requestContext"]["requestId"] == rows[1]["id"]
        assert letter["error"]["errorType"] == rows[1]["error"]
        self.check_shown(s, letter)
        missing = self.show(s, "no-such-letter")
        assert missing.returncode == 1 and "no pending dead letter" in missing.stderr

        table = workers("dlq", "list", str(s.config), s.mapping)
        assert table.returncode == 0, table.stderr
        assert rows[0]["id"] in table.stdout and "RetryAttemptsExhausted" in table.stdout
        assert f"{s.mapping}: {n} dead letter(s) to replay\n" in table.stdout
        # A limit shows fewer letters, never passes them off as all that is pending.
        first = workers("dlq", "list", str(s.config), s.mapping, "--limit", "1")
        assert first.returncode == 0, first.stderr
        assert f"{s.mapping}: {n} dead letter(s) to replay, showing the first 1\n" in first.stdout
        assert rows[0]["id"] in first.stdout and rows[1]["id"] not in first.stdout

        dry = self.replay(s, "--dry-run")
        assert dry["letters"] == n and dry["dry_run"] and dry["succeeded"] == 0
        assert self.handled(s) == [] and self.dlq_state(s) == before

        s.fixed.touch()
        fixed = workers("dlq", "replay", str(s.config), s.mapping, "--to", "handler")
        assert fixed.returncode == 0, fixed.stderr[-4000:]
        assert orjson.loads(fixed.stdout) == summary_of(n, succeeded=n, failed_again=0)
        for row in rows:
            assert f"replayed {row['id']}: 1 record(s) succeeded" in fixed.stderr
        assert "failed again" not in fixed.stderr
        assert self.handled_ns(s) == sorted(self.poison)  # each exactly once
        assert self.pending(s) == []
        assert self.replay(s) == summary_of(0, succeeded=0, failed_again=0)  # nothing left
        assert self.handled_ns(s) == sorted(self.poison)
        self.check_all_replayed(s)

    def test_still_failing_letters_come_back_once_and_skipped_ones_stay(self, s: Scenario) -> None:
        self.dead_letter_poison(s)
        first = self.pending(s)[0]
        no_letters = self.add_foreign(s, orjson.loads(self.show(s, first["id"]).stdout))
        listed = workers("dlq", "list", str(s.config), s.mapping, "--json")
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(self.poison)
        assert listed.stderr.count("not a dead letter") == no_letters
        listed_rows = self.pending(s)
        before = {r["id"] for r in listed_rows}

        # Still failing: each ValueError letter is tried once and written back with replayCount
        # 1 (this run does not pick up the letters it writes); the others are skipped by the
        # filter and stay to be replayed.
        values = sorted(n for n, error in self.poison.items() if error == "ValueError")
        others = sorted(n for n, error in self.poison.items() if error != "ValueError")
        flags = ("--to", "handler", "--error-type", "ValueError")
        again = workers("dlq", "replay", str(s.config), s.mapping, *flags)
        assert again.returncode == 0, again.stderr[-4000:]
        summary = orjson.loads(again.stdout.strip().splitlines()[-1])
        assert summary == summary_of(len(values), succeeded=0, failed_again=len(values))
        # Each letter is said to have failed again, not to have been replayed.
        for row in listed_rows:
            failed = f"{row['id']} failed again: 1 record(s) dead-lettered anew"
            assert (failed in again.stderr) == (row["error"] == "ValueError"), again.stderr
            assert f"replayed {row['id']}" not in again.stderr
        rows = self.pending(s)
        assert sorted((r["error"], r["replays"]) for r in rows) == sorted(
            [(self.poison[n], 0) for n in others] + [("ValueError", 1) for _ in values]
        )
        replayed = {r["id"] for r in rows if r["replays"] == 1}
        assert not replayed & before  # new letters, not the old ones again
        assert len(self.pending(s, "--error-type", "KeyError")) == len(others)
        assert self.handled(s) == []
        self.check_filtered_replay(s)

        s.fixed.touch()
        n = len(self.poison)
        assert self.replay(s, "--to", "handler") == summary_of(n, succeeded=n, failed_again=0)
        assert self.handled_ns(s) == sorted(self.poison)  # none replayed a second time
        assert self.pending(s) == [] and self.replay(s)["letters"] == 0
        self.check_all_replayed(s)

    def test_interrupted_replay_resumes_without_losing_letters(self, s: Scenario) -> None:
        n = len(self.poison)
        self.dead_letter_poison(s)
        s.fixed.touch()
        first = interrupted_replay(
            s.config,
            s.mapping,
            lambda: bool(self.handled(s)),
            *self.interrupt_flags,
            wait_s=self.interrupt_wait_s,
        )
        assert first["interrupted"] and 1 <= first["letters"] < n
        assert len(self.pending(s)) == n - first["letters"]  # what was not done stays

        rest = self.replay(s)
        assert first["letters"] + rest["letters"] == n
        ns = self.handled_ns(s)
        if self.exactly_once_on_interrupt:
            assert ns == sorted(self.poison)
        else:
            # Nothing lost; at most the letter in flight at the signal is handled twice.
            assert set(ns) == set(self.poison) and len(ns) <= n + 1
        assert self.pending(s) == []


class ReplayToSourceContract(ReplayFlowContract):
    """`workers dlq replay --to source`: records go back onto the source with the replay header,
    fail there again counted, and reach the fixed handler with their original properties."""

    def check_republished(self, s: Scenario) -> None:
        """Right after the first `--to source`: what the source holds now."""
        raise NotImplementedError

    def check_replayed_handled(self, s: Scenario, handled: list[dict[str, Any]]) -> None:
        """What the fixed handler saw of the twice-replayed records besides `n` and `replay`."""

    def test_replay_to_the_source(self, s: Scenario) -> None:
        n = len(self.poison)
        self.dead_letter_poison(s)

        # Not fixed yet: the records go back onto the source and fail there again, counted.
        assert self.replay(s, "--to", "source") == summary_of(n, succeeded=n, failed_again=0)
        assert self.pending(s) == []
        self.check_republished(s)
        self.run(s)
        rows = self.pending(s)
        assert len(rows) == n and all(r["replays"] == 1 for r in rows)  # once: no loop
        assert self.handled(s) == []

        s.fixed.touch()
        assert self.replay(s, "--to", "source")["letters"] == n
        self.run(s)
        handled = self.handled(s)
        assert sorted((h["n"], h["replay"]) for h in handled) == [
            (i, 2) for i in sorted(self.poison)
        ]
        self.check_replayed_handled(s, handled)
        assert self.pending(s) == []
