"""Wires one mapping from its configuration: source, destination, invoker, policy, poller."""

from __future__ import annotations

import logging
from pathlib import Path

from workers.app.config import Config, EventSourceMapping
from workers.app.registry import open_destination, open_source
from workers.engine.batcher import BatchLimits
from workers.engine.clock import SYSTEM_CLOCK, Clock
from workers.engine.filters import compile_filters
from workers.engine.flight import SuspectList
from workers.engine.invoker import Invoker
from workers.engine.policy import Policy
from workers.engine.poller import Poller, PollerSettings
from workers.engine.probing import SourceFacts
from workers.invoke import create_invoker

log = logging.getLogger("workers.runtime")

# Extra time a drain allows beyond the function timeout, for settling and committing.
DRAIN_MARGIN_S = 5.0


# Lambda stops retrying at this many attempts when retries are unlimited (-1) but an on-failure
# destination is configured, so records reach the destination instead of retrying forever.
RETRY_CAP_WITH_DESTINATION = 10


def policy_of(mapping: EventSourceMapping) -> Policy:
    retries = mapping.maximum_retry_attempts
    if retries == -1 and mapping.destination_config is not None:
        retries = RETRY_CAP_WITH_DESTINATION
    return Policy(
        maximum_retry_attempts=retries,
        bisect_batch_on_function_error=mapping.bisect_batch_on_function_error,
        maximum_record_age_s=mapping.maximum_record_age_s,
        report_batch_item_failures="ReportBatchItemFailures" in mapping.function_response_types,
        maximum_batch_bytes=mapping.maximum_batch_bytes,
    )


def probe_warnings(mapping: EventSourceMapping, facts: SourceFacts) -> list[str]:
    """What `validate --connect` found that disagrees with the mapping's retries. On a source
    whose retries are deliveries (`broker_retries`, SQS), a broker that takes a record away
    after fewer deliveries than the mapping's attempts cuts its last retries short, and the
    record never reaches the mapping's on-failure destination."""
    if facts.max_deliveries is None or not mapping.source.broker_retries:
        return []
    retries = policy_of(mapping).maximum_retry_attempts
    attempts = retries + 1
    # With unlimited retries the broker's limit is the one meant to apply.
    if retries < 0 or facts.max_deliveries >= attempts:
        return []
    lost = (
        " and before it can reach the on-failure destination" if mapping.destination_config else ""
    )
    n = facts.max_deliveries
    return [
        f"mapping {mapping.name!r}: {facts.max_deliveries_set_by} is {n}, but the mapping tries a"
        f" failing record up to {attempts} times (maximum_retry_attempts {retries}), one delivery"
        f" each: the broker takes the record away after {n}, before the mapping's last"
        f" retries{lost}; raise it to at least {attempts} or lower maximum_retry_attempts"
    ]


def build_poller(
    config: Config,
    mapping: EventSourceMapping,
    *,
    instance: int = 0,
    invoker: Invoker | None = None,
    clock: Clock = SYSTEM_CLOCK,
    in_flight_path: Path | None = None,
    suspects: SuspectList | None = None,
    enabled: bool | None = None,
) -> tuple[Poller, Invoker]:
    """A ready-to-run poller for `mapping` and the invoker it owns (close it after the run).

    `enabled` overrides the mapping's own `enabled` (a mapping enabled since the run began)."""
    spec = config.function_spec(mapping.function)
    criteria = mapping.filter_criteria
    patterns = [f.pattern for f in criteria.filters] if criteria else []
    invoker = invoker or create_invoker(spec)
    settings = PollerSettings(
        mapping=mapping.name,
        function=mapping.function,
        limits=BatchLimits(
            batch_size=mapping.batch_size,
            maximum_batch_bytes=mapping.maximum_batch_bytes,
            maximum_batching_window_s=mapping.maximum_batching_window_s,
        ),
        parallelization_factor=mapping.parallelization_factor,
        maximum_concurrency=mapping.batches_at_once(instance),
        drain_timeout_s=spec.timeout_s + DRAIN_MARGIN_S,
        stalled_after_s=mapping.stalled_after_s,
        enabled=mapping.enabled if enabled is None else enabled,
    )
    poller = Poller(
        settings,
        source=open_source(mapping, instance),
        invoker=invoker,
        policy=policy_of(mapping),
        destination=open_destination(mapping),
        record_filter=compile_filters(patterns),
        clock=clock,
        in_flight_path=in_flight_path,
        suspects=suspects,
    )
    return poller, invoker
