"""What an invocation can end in. The retry policy switches on these types, never on strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.engine.redact import redact_text


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Lambda's error triple, as it appears in the dead-letter record."""

    error_type: str
    message: str
    stack_trace: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The triple as letters and `workers invoke` show it, passwords masked: a handler's
        error often quotes the URL it could not reach."""
        return {
            "errorType": self.error_type,
            "errorMessage": redact_text(self.message),
            "stackTrace": [redact_text(line) for line in self.stack_trace],
        }


@dataclass(frozen=True, slots=True)
class Success:
    """The handler returned normally; `response` is its (JSON-decoded) return value."""

    response: Any = None


@dataclass(frozen=True, slots=True)
class FunctionError:
    """The handler raised: the whole batch failed."""

    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class RetryLater:
    """The handler raised `workers.RetryableError`: retry the whole batch, do not bisect."""

    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Throttling:
    """The handler raised `workers.Throttled`: pause the whole mapping, then try the batch again;
    no record uses a retry attempt."""

    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Timeout:
    """The invocation ran past the function's `timeout_s` and was killed."""

    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Crash:
    """The execution environment died (exit, signal, out of memory) during the invocation."""

    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class InvalidResponse:
    """The handler returned something the mapping cannot interpret as a batch response."""

    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class PartialFailure:
    """A valid `batchItemFailures` response naming the records (by ident) that failed."""

    failed: frozenset[tuple[str, int]]


# What an execution environment hands back for one invocation.
InvokeResult = Success | FunctionError | RetryLater | Throttling | Timeout | Crash | InvalidResponse
# What the policy acts on once the response has been interpreted.
Outcome = InvokeResult | PartialFailure
BatchFailure = FunctionError | RetryLater | Timeout | Crash | InvalidResponse


class RetryableError(Exception):
    """Raise from a handler to ask for a whole-batch retry without bisecting (transient outage)."""


class Throttled(Exception):
    """Raise from a handler when what it writes to is overloaded or down: the whole mapping
    pauses (1 s, doubling up to 60 s while it keeps being raised) and the batch is tried again
    after the pause, without using a retry attempt of any record."""
