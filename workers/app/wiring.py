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
