"""The seam between the engine and execution environments: one invocation in, one result out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from workers.engine.outcomes import InvokeResult

# The region a function sees when neither the environment nor the function names one; code
# that creates an AWS SDK client at import time fails without any.
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """A function as the configuration describes it (names follow Lambda's parameters)."""

    name: str
    handler: str  # "package.module:function"
    timeout_s: float = 30.0
    memory_mb: int = 512
    concurrency: int = 4
    isolation: Literal["process", "thread"] = "process"
    environment: dict[str, str] = field(default_factory=dict)
    region: str = DEFAULT_REGION  # AWS_REGION when the worker's environment sets none


@dataclass(frozen=True, slots=True)
class InvocationRequest:
    """What the context object of one invocation is built from."""

    request_id: str
    mapping_name: str
    attempt: int  # 1 for the first invocation of these records


class Invoker(Protocol):
    """Runs a function's handler on an event; never raises for handler misbehaviour."""

    def invoke(self, event: dict[str, Any], request: InvocationRequest) -> InvokeResult:
        """Blocks until the handler returned, raised, timed out or its environment died."""
        ...

    def close(self) -> None:
        """Stop every execution environment (waits for none of their work)."""
        ...
