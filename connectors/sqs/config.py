"""The `sqs` source settings of a mapping. Credentials come from the standard AWS chain
(environment, shared files, container or instance roles), never from the configuration."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from workers.engine.settings import (
    ClientConfig,
    DestinationSettings,
    Loc,
    Model,
    SourceSettings,
    here,
    show,
    url_checker,
)

# botocore `Config` options a mapping may set; `retries.*` are the keys of its `retries` dict.
CLIENT_OPTIONS = frozenset(
    {
        "connect_timeout",
        "read_timeout",
        "max_pool_connections",
        "tcp_keepalive",
        "user_agent_extra",
        "retries.max_attempts",
        "retries.mode",
    }
)

# https://docs.aws.amazon.com/general/latest/gr/sqs-service.html: the queue URL names the region.
_AWS_HOST = re.compile(r"(?:sqs\.)?([a-z]{2}(?:-[a-z]+)+-\d+)\.(?:queue\.)?amazonaws\.com(?:\.cn)?")


def _check_queue_url(value: str) -> str:
    parts = urlsplit(value)
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) != 2:
        raise here(f"must be a queue URL, scheme://host/ACCOUNT/QUEUE (got {show(value)})")
    return value


def _check_client_config(value: dict[str, object]) -> dict[str, object]:
    unknown = sorted(set(value) - CLIENT_OPTIONS)
    if unknown:
        raise here(
            f"unknown option {unknown[0]!r}; known: {', '.join(sorted(CLIENT_OPTIONS))}"
            " (credentials come from the AWS chain, never from this file)"
        )
    return value


QueueUrl = Annotated[str, url_checker("https", "http"), AfterValidator(_check_queue_url)]
EndpointUrl = Annotated[str, url_checker("https", "http")]


def region_of(queue_url: str) -> str | None:
    """The region an AWS queue URL names (https://sqs.REGION.amazonaws.com/...), else None."""
    match = _AWS_HOST.fullmatch(urlsplit(queue_url).hostname or "")
    return match.group(1) if match else None


class SQSQueue(Model):
    """A queue and how to reach it: what the sqs source and destination share."""

    queue_url: QueueUrl = Field(
        description="https://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE (a FIFO queue ends in .fifo)"
    )
    endpoint_url: EndpointUrl | None = Field(
        default=None,
        description=(
            "The SQS endpoint; default: AWS's for the region, or the queue URL's own host when it"
            " is not an AWS one (a local SQS-compatible server)"
        ),
    )
    region: str | None = Field(
        default=None,
        description="Default: the region in the queue URL, else the AWS chain's (AWS_REGION, ...)",
    )
    client_config: Annotated[ClientConfig, AfterValidator(_check_client_config)] = Field(
        default_factory=dict,
        description=(
            "botocore client options: connect_timeout, read_timeout, max_pool_connections,"
            " tcp_keepalive, user_agent_extra, retries.max_attempts, retries.mode"
        ),
    )

    @property
    def fifo(self) -> bool:
        return self.queue_url.rstrip("/").endswith(".fifo")

    @property
    def queue_name(self) -> str:
        return self.queue_url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def client_region(self) -> str | None:
        return self.region or region_of(self.queue_url)

    @property
    def client_endpoint(self) -> str | None:
        if self.endpoint_url is not None:
            return self.endpoint_url
        if region_of(self.queue_url) is not None:
            return None
        parts = urlsplit(self.queue_url)
        return f"{parts.scheme}://{parts.netloc}"


class SQSSource(SQSQueue, SourceSettings):
    """An Amazon SQS queue (standard or FIFO), or a queue of an SQS-compatible server."""

    # Standard queues deliver in no order; a FIFO queue's groups are ordered (`Capabilities`).
    ordered: ClassVar[bool] = False
    single_unit: ClassVar[bool] = True
    # Retries wait in SQS (ChangeMessageVisibility); exhausted messages are left to the queue.
    broker_retries: ClassVar[bool] = True

    type: Literal["sqs"]


class SQSDestination(SQSQueue, DestinationSettings):
    """Dead letters sent to an SQS queue: the letter is the body, its labels message attributes."""

    type: Literal["sqs"]

    def complete(self, mapping: str, source: SourceSettings) -> list[tuple[Loc, str]]:
        if isinstance(source, SQSSource) and _same_queue(source.queue_url, self.queue_url):
            # Every letter would be read again as a record, in a loop.
            return [(("queue_url",), "is the queue the mapping reads; letters need another")]
        return []

    def where(self) -> str:
        return f"queue {self.queue_url}"


def _same_queue(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()
