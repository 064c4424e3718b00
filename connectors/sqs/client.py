"""What the SQS source (and later its destination, store and publisher) share: the boto3 client,
built from the standard AWS credential chain, and which errors are worth retrying."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ReadTimeoutError,
)

from connectors.sqs import config as cfg
from workers.engine.ports import ConnectorConfigError

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

log = logging.getLogger("connectors.sqs")

# Entries per batch call (DeleteMessageBatch, ChangeMessageVisibilityBatch) and messages per
# ReceiveMessage: SQS's own limit.
BATCH_MAX = 10

# Longer than the longest long poll (20 s), shorter than botocore's default of 60 s.
DEFAULT_CLIENT = {"connect_timeout": 10, "read_timeout": 40}

# https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/CommonErrors.html
_MISSING = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_DENIED = {
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "KMS.AccessDeniedException",
}
_BUSY = {
    "RequestThrottled",
    "ThrottlingException",
    "Throttling",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "KmsThrottled",
}


class SQSUnavailable(Exception):
    """SQS could not be reached or asked to slow down; trying again later makes sense."""


RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    SQSUnavailable,
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
)


def sqs_client(src: cfg.SQSQueue) -> SQSClient:
    """A client for the queue's endpoint and region; credentials from the AWS chain."""
    options: dict[str, Any] = dict(DEFAULT_CLIENT)
    retries: dict[str, Any] = {"mode": "standard"}
    for name, value in src.client_config.items():
        if name.startswith("retries."):
            retries[name.removeprefix("retries.")] = value
        else:
            options[name] = value
    try:
        return boto3.session.Session().client(
            "sqs",
            region_name=src.client_region,
            endpoint_url=src.client_endpoint,
            config=Config(retries=retries, **options),  # type: ignore[arg-type]
        )
    except NoRegionError:
        raise ConnectorConfigError(
            f"queue {src.queue_url}: no region: set `region`, or AWS_REGION in the environment"
        ) from None


def translate(exc: BaseException, queue_url: str) -> BaseException:
    """The error to raise for a driver error: a configuration error when retrying cannot help,
    `SQSUnavailable` when it can, else the error itself."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{code}: {error.get('Message', '')}".strip(": ")
        if code in _MISSING:
            return ConnectorConfigError(f"queue {queue_url} does not exist ({message})")
        if code in _DENIED:
            return ConnectorConfigError(f"queue {queue_url}: access denied ({message})")
        if code in _BUSY or status >= 500:
            return SQSUnavailable(f"queue {queue_url}: {message}")
        return exc
    if isinstance(exc, NoCredentialsError):
        return ConnectorConfigError(
            f"queue {queue_url}: no AWS credentials found in the standard chain (environment,"
            " shared credentials file, container or instance role)"
        )
    if isinstance(exc, RETRYABLE_ERRORS):
        return exc
    if isinstance(exc, BotoCoreError):
        return SQSUnavailable(f"queue {queue_url}: {exc}")
    return exc


T = TypeVar("T")


def chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), BATCH_MAX):
        yield items[i : i + BATCH_MAX]


def arn_of(queue_url: str, region: str) -> str:
    """The ARN a queue URL names (https://HOST/ACCOUNT/NAME), as SQS writes it: what the event
    shows until GetQueueAttributes has told the queue's own."""
    account, name = queue_url.rstrip("/").rsplit("/", 2)[-2:]
    partition = "aws-cn" if region.startswith("cn-") else "aws"
    if region.startswith("us-gov-"):
        partition = "aws-us-gov"
    return f"arn:{partition}:sqs:{region}:{account}:{name}"
