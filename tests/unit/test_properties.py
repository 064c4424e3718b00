"""Property tests over random failure patterns: exactly the always-failing records are
dead-lettered, nothing is checkpointed before it settled, nothing is lost."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.memory.broker import MemoryDestination, MemoryLogSource
from tests.engine import (
    DirectInvoker,
    fake_broker,
    kafka_items,
    letter_values,
    make_log_poller,
    make_queue_poller,
    rmq_items,
    value_of,
)
from workers.engine.invoker import InvocationRequest
from workers.engine.policy import Policy

MAX_RETRIES = 3


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 120))
    poison = draw(st.sets(st.integers(0, n - 1), max_size=max(1, n // 8)))
    transient = draw(
        st.dictionaries(
            st.integers(0, n - 1).filter(lambda i: i not in poison),
            st.integers(1, MAX_RETRIES),
            max_size=max(1, n // 6),
        )
    )
    return {
        "n": n,
        "poison": poison,
        "transient": transient,
        "partitions": draw(st.integers(1, 3)),
        "keys": draw(st.integers(0, 6)),
        "batch_size": draw(st.sampled_from([1, 3, 10, 50, 200])),
        "pf": draw(st.sampled_from([1, 2, 4])),
        # "raise": whole-batch failures with bisect; "partial": batchItemFailures responses.
        "mode": draw(st.sampled_from(["raise", "partial"])),
    }


class Judge:
    """A handler that fails records as the scenario says and remembers what it let through."""

    def __init__(self, scenario: dict[str, Any], unordered: bool) -> None:
        self.poison: set[bytes] = {f"{i}".encode() for i in scenario["poison"]}
        self.transient = {f"{i}".encode(): k for i, k in scenario["transient"].items()}
        self.mode = scenario["mode"]
        self.unordered = unordered
        self.ok: set[bytes] = set()
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any], request: InvocationRequest) -> Any:
        items = rmq_items(event) if self.unordered else kafka_items(event)
        failed = []
        with self.lock:
            for item in items:
                v = value_of(item)
                if v in self.poison:
                    failed.append(item)
                elif self.transient.get(v, 0) > 0:
                    self.transient[v] -= 1
                    failed.append(item)
            if self.mode == "raise":
                if failed:
                    raise ValueError(f"{len(failed)} bad record(s)")
                self.ok.update(value_of(i) for i in items)
                return None
            # A record the handler did not report was handled, even where an ordered source
            # will invoke it again because it follows a reported one.
            bad = {id(i) for i in failed}
            ok = [value_of(i) for i in items if id(i) not in bad]
            self.ok.update(ok)
        if self.unordered:
            ids = [{"queue": "q", "deliveryTag": i["deliveryTag"]} for i in failed]
        else:
            ids = [{"partition": f"t-{i['partition']}", "offset": i["offset"]} for i in failed]
        return {"batchItemFailures": [{"itemIdentifier": ident} for ident in ids]}


def policy_for(mode: str) -> Policy:
    return Policy(
        maximum_retry_attempts=MAX_RETRIES,
        bisect_batch_on_function_error=mode == "raise",
        report_batch_item_failures=mode == "partial",
        retry_backoff_base_s=0.01,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_ordered_log_dead_letters_exactly_the_always_failing(scenario: dict[str, Any]) -> None:
    broker = fake_broker()
    broker.create_topic("t", scenario["partitions"])
    for i in range(scenario["n"]):
        key = f"k{i % scenario['keys']}".encode() if scenario["keys"] else None
        part = None if key else i % scenario["partitions"]
        broker.produce("t", f"{i}".encode(), key, partition=part)
    judge = Judge(scenario, unordered=False)
    dlq = MemoryDestination()
    premature: list[str] = []

    class CheckingSource(MemoryLogSource):
        """Fails the test if an offset is committed past a record that has not settled."""

        def commit(self, positions: Mapping[str, int]) -> None:
            settled = judge.ok | set(letter_values(dlq.letters))
            with broker.lock:
                for unit, pos in positions.items():
                    log = broker.topics["t"][int(unit.rsplit("-", 1)[1])]
                    premature.extend(
                        f"{unit}@{o}" for o in range(pos) if log[o].value not in settled
                    )
            super().commit(positions)

    poller, _ = make_log_poller(
        broker,
        DirectInvoker(judge),
        policy=policy_for(scenario["mode"]),
        destination=dlq,
        batch_size=scenario["batch_size"],
        parallelization_factor=scenario["pf"],
    )
    poller.source = CheckingSource(broker, "t", "g")
    poller.run(until_idle_s=1.0)

    dead = letter_values(dlq.letters)
    assert sorted(dead) == sorted(judge.poison)  # each exactly once
    assert premature == []
    everything = {f"{i}".encode() for i in range(scenario["n"])}
    assert judge.ok | set(dead) == everything  # nothing lost
    assert judge.ok.isdisjoint(judge.poison)
    ends = {unit: end for unit, end in broker.end_offsets("t").items() if end}
    assert broker.committed_offsets("g", "t") == ends


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_unordered_queue_dead_letters_exactly_the_always_failing(scenario: dict[str, Any]) -> None:
    broker = fake_broker()
    for i in range(scenario["n"]):
        broker.publish("q", f"{i}".encode())
    judge = Judge(scenario, unordered=True)
    dlq = MemoryDestination()
    poller, source = make_queue_poller(
        broker,
        DirectInvoker(judge),
        policy=policy_for(scenario["mode"]),
        destination=dlq,
        batch_size=scenario["batch_size"],
        parallelization_factor=scenario["pf"],
    )
    poller.run(until_idle_s=1.0)

    dead = letter_values(dlq.letters)
    assert sorted(dead) == sorted(judge.poison)
    assert judge.ok | set(dead) == {f"{i}".encode() for i in range(scenario["n"])}
    assert sorted(source.acked) == list(range(1, scenario["n"] + 1))  # each acked once
    assert broker.queue_depth("q") == (0, 0)
