"""A run of records on its way through `workers.engine.policy.BatchRunner`, and how records go
back to a broker that takes them (`Capabilities.broker_retries`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

from workers.engine.backoff import Backoff
from workers.engine.invoker import Staged
from workers.engine.letters import Condition
from workers.engine.outcomes import ErrorInfo
from workers.engine.records import Record

if TYPE_CHECKING:
    from workers.engine.policy import Policy

Release = Callable[[Sequence[Record], float], None]


class Work:
    """A run of records invoked together, with the retries they have used."""

    __slots__ = (
        "doomed",
        "event_error",
        "handed_back",
        "invocations",
        "last_error",
        "records",
        "retries",
        "solo",
        "staged",
        "tried",
    )

    def __init__(
        self,
        records: list[Record],
        retries: int,
        invocations: int,
        tried: bool = False,
        *,
        solo: bool = False,
        doomed: tuple[Condition, ErrorInfo] | None = None,
    ) -> None:
        self.records = records
        self.retries = retries
        self.invocations = invocations
        # Invoked by this process: broker-side delivery counts alone never dead-letter a record,
        # since a redelivery after a lost connection does not mean the handler failed.
        self.tried = tried
        self.last_error: ErrorInfo | None = None
        # A record a poller died on: invoked with no other invocation running beside it.
        self.solo = solo
        # Dead-lettered without invoking: a record that cannot become an event, or one that
        # pollers died on too often.
        self.doomed = doomed
        # Building or encoding the event raised: some record of the batch may be at fault.
        self.event_error: Exception | None = None
        # Keys of records handed back to the broker, and the delay they were given.
        self.handed_back: dict[Hashable, float] = {}
        # The invocation of these records that an environment started on its own.
        self.staged: Staged | None = None


def any_fault(records: Sequence[Record]) -> bool:
    # A loop: a quarter of what any() over a generator costs.
    for r in records:  # noqa: SIM110
        if r.fault is not None:
            return True
    return False


def max_attempts(records: Sequence[Record]) -> int:
    return max([r.attempts for r in records], default=0)


def without(records: Sequence[Record], dropped: Sequence[Record]) -> list[Record]:
    """`records` less `dropped`, in order (records are equal only to themselves)."""
    gone = set(dropped)
    return [r for r in records if r not in gone]


# Checked on the batch's largest and oldest record first: most batches have none to pick out.


def too_large(records: Sequence[Record], maximum_batch_bytes: int) -> list[Record]:
    """The records that alone exceed what one invocation may carry."""
    if max([r.size for r in records], default=0) <= maximum_batch_bytes:
        return []
    return [r for r in records if r.size > maximum_batch_bytes]


def too_old(records: Sequence[Record], maximum_record_age_s: float, now_ms: int) -> list[Record]:
    """The records older than `maximum_record_age_s` (-1: no limit); a timestamp of 0 is
    unknown and never too old."""
    if maximum_record_age_s < 0 or not records:
        return []
    oldest_ok = now_ms - int(maximum_record_age_s * 1000)
    if min([r.timestamp_ms or oldest_ok for r in records]) >= oldest_ok:
        return []
    return [r for r in records if 0 < r.timestamp_ms < oldest_ok]


def broker_delay(policy: Policy, failures: int) -> float:
    """The backoff after `failures` earlier failures, for the broker to wait out."""
    backoff = Backoff(
        base_s=policy.retry_backoff_base_s,
        cap_s=policy.retry_backoff_cap_s,
        failures=max(0, failures),
    )
    return backoff.next_delay()


def hand_back(
    release: Release | None,
    ordered: bool,
    work: Work,
    records: Sequence[Record],
    delay_s: float,
) -> None:
    """Give `records` back to the broker, to be delivered again after `delay_s`.

    On an ordered source, the records of the same keys that `work` still holds go back with
    them (and, through `hand_back_later`, those later in the batch): none may reach the handler
    before the records handed back have.
    """
    assert release is not None
    out = list(records)
    if ordered:
        keys = {r.key for r in out}
        given = {id(r) for r in out}
        out += [r for r in work.records if r.key in keys and id(r) not in given]
        work.records = [r for r in work.records if r.key not in keys]
        work.handed_back.update(dict.fromkeys(keys, delay_s))
    release(out, delay_s)


def hand_back_later(
    release: Release | None, queue: Iterable[Work], keys: dict[Hashable, float]
) -> None:
    """Hand back the records of `keys` that the rest of an ordered batch holds."""
    assert release is not None
    for later in queue:
        held = [r for r in later.records if r.key in keys]
        if not held:
            continue
        later.records = [r for r in later.records if r.key not in keys]
        for delay_s in {keys[r.key] for r in held}:
            release([r for r in held if keys[r.key] == delay_s], delay_s)
