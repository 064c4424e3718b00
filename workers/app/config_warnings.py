"""Legal but probably unintended settings of a mapping, shown at start-up and by `validate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping


def mapping_warnings(m: EventSourceMapping) -> list[str]:
    """What may not be meant in a mapping's settings (disabled ones too: `workers mappings
    enable` can start them at any time)."""
    found: list[str] = []
    queue_decides = m.source.broker_retries
    if m.destination_config is None:
        found.append(
            f"mapping {m.name!r} has no on-failure destination:"
            + (
                " records that exhaust their retries are left to the queue, for its"
                " redrive policy to move (without one they are retried forever)"
                if queue_decides
                else " records that exhaust their retries will be dropped"
            )
        )
    if m.destination_config is not None:
        found.extend(m.destination_config.on_failure.warnings(m.name))
    lanes = m.pollers * m.parallelization_factor
    if (
        m.scaling_config is not None
        and m.source.single_unit
        and m.scaling_config.maximum_concurrency > lanes
    ):
        found.append(
            f"mapping {m.name!r}: scaling_config.maximum_concurrency is"
            f" {m.scaling_config.maximum_concurrency}, but a queue is read by pollers x"
            f" parallelization_factor = {lanes} lane(s), one batch each at a time: raise"
            " parallelization_factor (or pollers) to run more batches at once"
        )
    if (
        m.maximum_retry_attempts == -1
        and m.maximum_record_age_s == -1
        and m.destination_config is None
        and not queue_decides
    ):
        found.append(
            f"mapping {m.name!r} retries a failing record forever"
            " (maximum_retry_attempts and maximum_record_age_s are both -1)"
            + (", holding up the records after it" if m.source.ordered else "")
        )
    return found
