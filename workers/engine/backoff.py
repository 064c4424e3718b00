"""Exponential backoff with full jitter (the AWS Architecture Blog's recommendation)."""

from __future__ import annotations

import random
from dataclasses import dataclass

# One generator for every Backoff: seeding one from the OS takes 10 µs or more (more under load),
# and every batch makes a Backoff before knowing whether it will fail.
_SHARED_RNG = random.Random()


@dataclass(slots=True)
class Backoff:
    """Delays `uniform(0, min(cap, base * 2**n))` for the n-th consecutive failure."""

    base_s: float = 0.1
    cap_s: float = 30.0
    rng: random.Random = _SHARED_RNG
    failures: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.failures, 62)))
        self.failures += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.failures = 0
