"""Prometheus metrics (named after Lambda's ESM metrics), health endpoints, `/status` and the
status page for `workers run`.

Served by the supervisor from the counters its poller processes report; binds to 127.0.0.1
unless told otherwise, since the status page names brokers and partitions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from workers.app import control, page
from workers.app.history import History, mappings_of
from workers.app.supervisor import Supervisor
from workers.engine.stats import DURATION_BUCKETS_S

log = logging.getLogger("workers.metrics")

# A mapping's states, as Lambda names them (workers.app.supervisor.Supervisor.states).
MAPPING_STATES = ("Enabled", "Enabling", "Disabling", "Disabled")

# (metric name, counter in the poller's stats, help text)
COUNTER_METRICS = (
    ("esm_polled_events", "polled", "Records read from the source"),
    ("esm_filtered_out_events", "filtered_out", "Records dropped by filter criteria"),
    ("esm_invoked_events", "invoked", "Records handed to the function, retries included"),
    ("esm_failed_invoke_events", "failed_invocations", "Invocations that failed"),
    ("esm_dropped_events", "dropped", "Exhausted records dropped for want of a destination"),
    (
        "esm_released_events",
        "released",
        "Records handed back to the broker to be delivered again (SQS retries, and exhausted"
        " records left to the queue's redrive policy)",
    ),
    (
        "esm_on_failure_destination_delivered_events",
        "dead_lettered",
        "Records delivered to the on-failure destination",
    ),
    (
        "esm_payload_omitted_events",
        "payload_omitted",
        "Records dead-lettered without their payload, too large for the destination",
    ),
    (
        "esm_destination_refusals",
        "destination_refusals",
        "Deliveries of letters the on-failure destination refused (each attempt)",
    ),
    ("esm_throttled", "throttled", "Invocations whose handler raised workers.Throttled"),
)


class SupervisorCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        snaps = self.supervisor.snapshots()
        for name, key, help_text in COUNTER_METRICS:
            family = CounterMetricFamily(name, help_text, labels=["mapping"])
            for mapping, total in _sum_by_mapping(snaps, key).items():
                family.add_metric([mapping], total)
            yield family
        durations = HistogramMetricFamily(
            "esm_invocation_duration_seconds", "Invocation duration", labels=["mapping"]
        )
        by_mapping: dict[str, tuple[list[int], float]] = {}
        for mapping, _instance, _alive, snap in snaps:
            counts, seconds = by_mapping.get(mapping, ([0] * len(DURATION_BUCKETS_S), 0.0))
            for i, n in enumerate(snap.get("duration_counts", [])):
                counts[i] += n
            by_mapping[mapping] = (counts, seconds + snap.get("duration_sum_s", 0.0))
        for mapping, (counts, seconds) in by_mapping.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(DURATION_BUCKETS_S, counts, strict=True):
                cumulative += n
                buckets.append((str(bound), float(cumulative)))
            buckets.append(("+Inf", float(cumulative)))
            durations.add_metric([mapping], buckets, seconds)
        yield durations
        lag = GaugeMetricFamily(
            "esm_offset_lag", "Records not yet read", labels=["mapping", "partition"]
        )
        envs = GaugeMetricFamily(
            "esm_execution_environments", "Live execution environments", labels=["mapping"]
        )
        env_totals: dict[str, int] = {}
        # One series per (mapping, unit): every consumer of a queue reports the same depth, and
        # a partition moving between pollers is briefly reported by both.
        lags: dict[tuple[str, str], int] = {}
        for mapping, _instance, _alive, snap in snaps:
            for unit, n in snap.get("lag", {}).items():
                lags[(mapping, unit)] = max(n, lags.get((mapping, unit), 0))
            env_totals[mapping] = env_totals.get(mapping, 0) + snap.get("environments", 0)
        for (mapping, unit), n in lags.items():
            lag.add_metric([mapping, unit], n)
        for mapping, n in env_totals.items():
            envs.add_metric([mapping], n)
        yield lag
        yield envs
        refusing = GaugeMetricFamily(
            "esm_destination_refusing",
            "1 while the on-failure destination keeps refusing letters",
            labels=["mapping"],
        )
        states: dict[str, int] = {}
        for mapping, _instance, _alive, snap in snaps:
            now = int(snap.get("destination", {}).get("state") == "refusing")
            states[mapping] = max(now, states.get(mapping, 0))
        for mapping, n in states.items():
            refusing.add_metric([mapping], n)
        yield refusing
        stalled = GaugeMetricFamily(
            "esm_stalled_units",
            "Partitions, streams or queues whose position has not moved for stalled_after_s"
            " while records wait on them",
            labels=["mapping"],
        )
        for mapping, entry in mappings_of(snaps).items():
            stalled.add_metric([mapping], len(entry["stalled_units"]))
        yield stalled
        # Per unit, only while stalled: lag-based scaling can leave out what more consumers
        # would not move (`esm_offset_lag unless on(mapping, partition) esm_stalled_seconds`).
        stalled_for = GaugeMetricFamily(
            "esm_stalled_seconds",
            "How long each stalled partition, stream or queue has not moved",
            labels=["mapping", "partition"],
        )
        # Consumers of one queue may each report it: one series per (mapping, unit).
        longest: dict[tuple[str, str], float] = {}
        for mapping, _instance, alive, snap in snaps:
            if not alive:
                continue
            for unit, entry in snap.get("stalled", {}).items():
                seconds = float(entry.get("for_s", 0))
                longest[(mapping, unit)] = max(seconds, longest.get((mapping, unit), 0.0))
        for (mapping, unit), seconds in longest.items():
            stalled_for.add_metric([mapping, unit], seconds)
        yield stalled_for
        yield from _control_metrics(self.supervisor, snaps)


def _control_metrics(
    supervisor: Supervisor, snaps: list[tuple[str, int, bool, dict[str, Any]]]
) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "esm_mapping_state",
        "1 for the mapping's state (Enabled, Enabling, Disabling, Disabled), 0 for the others",
        labels=["mapping", "state"],
    )
    for mapping, now in supervisor.states().items():
        for name in MAPPING_STATES:
            state.add_metric([mapping, name], int(name == now))
    yield state
    throttled = GaugeMetricFamily(
        "esm_mapping_throttled",
        "1 while a handler's workers.Throttled keeps the mapping paused",
        labels=["mapping"],
    )
    paused: dict[str, int] = {}
    for mapping, _instance, _alive, snap in snaps:
        pausing = int(snap.get("throttle", {}).get("state", "closed") != "closed")
        paused[mapping] = max(pausing, paused.get(mapping, 0))
    for mapping, n in paused.items():
        throttled.add_metric([mapping], n)
    yield throttled


def _sum_by_mapping(snaps: list[tuple[str, int, bool, dict[str, Any]]], key: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for mapping, _instance, _alive, snap in snaps:
        totals[mapping] = totals.get(mapping, 0) + snap.get(key, 0)
    return totals


def status_of(supervisor: Supervisor, history: History | None = None) -> dict[str, Any]:
    snaps = supervisor.snapshots()
    pollers = [
        {
            "mapping": mapping,
            "instance": instance,
            "alive": alive,
            "assigned": snap.get("assigned", []),
            "lag": snap.get("lag", {}),
            "checkpoints": snap.get("checkpoints", {}),
            # ok, refusing (since when, why, what waits) or none configured.
            "destination": snap.get("destination", {}),
            "in_flight": snap.get("in_flight", 0),
            # Per unit that does not move: since when, what waits, the record and why.
            "stalled": snap.get("stalled", {}),
            "last_error": snap.get("last_error"),
            # Enabled, Disabling or Disabled, and the throttle breaker (closed, open, half-open).
            "state": snap.get("state"),
            "throttle": snap.get("throttle", {}),
            "throttled": snap.get("throttled", 0),
        }
        for mapping, instance, alive, snap in snaps
    ]
    states = supervisor.states()
    entries = mappings_of(snaps)
    mappings = [
        {"name": name, "state": states.get(name), **entries.get(name, {})}
        for name in [*states, *sorted(set(entries) - set(states))]  # in the file's order
    ]
    status: dict[str, Any] = {
        "mappings": mappings,
        "pollers": pollers,
        "summary": supervisor.summary(),
    }
    if history is not None:
        status["history"] = history.as_json()
    return status


def ready(supervisor: Supervisor) -> bool:
    """Every poller is alive and has been assigned something to read, or is disabled."""
    snaps = supervisor.snapshots()
    return bool(snaps) and all(
        alive and (snap.get("assigned") or snap.get("state") == "Disabled")
        for _, _, alive, snap in snaps
    )


def serve(supervisor: Supervisor, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (its port may have been 0)."""
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(supervisor))
    history = History(supervisor.snapshots)
    history.start()
    token = control.control_token()
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "the control endpoints (/mappings) on %s accept requests from anyone who can reach"
            " them: set %s to require a bearer token",
            host,
            control.TOKEN_ENV,
        )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if control.is_control_path(path):
                self._control("GET", path)
            elif path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok = ready(supervisor)
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            elif path == "/status":
                # The charts' samples only when asked: they would bury the rest.
                with_history = parse_qs(query).get("history") == ["1"]
                status = status_of(supervisor, history if with_history else None)
                body = orjson.dumps(status, option=orjson.OPT_INDENT_2)
                self._send(200, body, "application/json")
            elif path == "/":
                body = page.render(status_of(supervisor, history))
                self._send(200, body, "text/html; charset=utf-8", page.headers())
            else:
                self._send(404, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            # A body, if any, means nothing here; read it so the connection stays usable.
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= 65536:
                self.rfile.read(length)
            if control.is_control_path(path):
                self._control("POST", path)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _control(self, method: str, path: str) -> None:
            auth = self.headers.get("Authorization")
            code, body = control.respond(supervisor, method, path, auth, token)
            challenge = {"WWW-Authenticate": 'Bearer realm="esm-workers"'} if code == 401 else None
            self._send(code, orjson.dumps(body), "application/json", challenge)

        def _send(
            self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the worker's log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
