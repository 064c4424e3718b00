"""The `context` object handed to a handler, with the attributes of Lambda's Python context.

Matches the runtime interface client's `LambdaContext` (awslambdaric): `identity` is an object
whose fields are None when no Cognito identity invoked the function (as for every event source
mapping), `client_context` is None, `tenant_id` is None, and `log()` writes to the function's
output.
"""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any

LATEST = "$LATEST"


def function_arn(function_name: str) -> str:
    return f"arn:aws:lambda:local:000000000000:function:{function_name}"


def log_group_name(function_name: str) -> str:
    return f"/aws/lambda/{function_name}"


def new_log_stream_name() -> str:
    """One per execution environment, in Lambda's `YYYY/MM/DD/[$LATEST]<hex>` form."""
    return time.strftime("%Y/%m/%d/", time.gmtime()) + f"[{LATEST}]" + secrets.token_hex(16)


class CognitoIdentity:
    """`context.identity`: Lambda hands an object with both fields None to mapped invocations,
    so `context.identity.cognito_identity_id` is None rather than an AttributeError."""

    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self) -> None:
        self.cognito_identity_id: str | None = None
        self.cognito_identity_pool_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"CognitoIdentity([cognito_identity_id={self.cognito_identity_id},"
            f"cognito_identity_pool_id={self.cognito_identity_pool_id}])"
        )


class LambdaContext:
    """Lambda's context attributes, plus the mapping name and the attempt number."""

    def __init__(
        self,
        *,
        function_name: str,
        memory_limit_in_mb: int,
        aws_request_id: str,
        log_stream_name: str,
        deadline_monotonic: float,
        mapping_name: str,
        attempt: int,
    ) -> None:
        self.function_name = function_name
        self.function_version = LATEST
        self.invoked_function_arn = function_arn(function_name)
        self.memory_limit_in_mb = memory_limit_in_mb
        self.aws_request_id = aws_request_id
        self.log_group_name = log_group_name(function_name)
        self.log_stream_name = log_stream_name
        self.mapping_name = mapping_name
        self.attempt = attempt
        self.identity = CognitoIdentity()
        self.client_context: Any = None
        self.tenant_id: str | None = None
        self._deadline = deadline_monotonic

    def get_remaining_time_in_millis(self) -> int:
        # CLOCK_MONOTONIC is system-wide on Linux, so a deadline computed by the parent holds here.
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def log(self, message: Any) -> None:
        """Write `message` to the function's output, as Lambda's `context.log` does (no newline
        is added; the output is logged with the request id)."""
        sys.stdout.write(str(message))

    def __repr__(self) -> str:
        return (
            f"LambdaContext(function_name={self.function_name!r}, "
            f"aws_request_id={self.aws_request_id!r}, mapping_name={self.mapping_name!r}, "
            f"attempt={self.attempt})"
        )
