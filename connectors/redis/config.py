"""The `redis` source and destination settings of a mapping."""

from __future__ import annotations

import socket
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from workers.engine.redact import redact_url
from workers.engine.settings import (
    DestinationSettings,
    NonEmptyStr,
    Positioned,
    Range,
    url_checker,
)

RedisUrl = Annotated[str, url_checker("redis", "rediss", path_schemes=("unix",))]


class RedisSource(Positioned):
    """Redis Streams read through a consumer group."""

    type: Literal["redis"]
    url: RedisUrl = Field(
        description="redis://[:pass@]host:6379/0, rediss:// for TLS, or unix:///path.sock",
    )
    streams: list[NonEmptyStr] = Field(min_length=1)
    consumer_group: str = Field(default="", description="Default: the mapping's name")
    consumer_name: str = Field(
        default="",
        description="Stable per instance: its pending entries survive restarts. Default: host name",
    )
    claim_idle_s: Annotated[float, Range(0, lo_exclusive=True)] = Field(
        default=60.0, description="Entries pending longer than this on another consumer are claimed"
    )
    partition_key_field: NonEmptyStr | None = Field(
        default=None,
        description="Entry field whose value orders records, for key-ordered parallelism",
    )

    def complete(self, mapping: str) -> None:
        if not self.consumer_group:
            self.consumer_group = mapping

    @model_validator(mode="after")
    def _default_consumer_name(self) -> Self:
        if not self.consumer_name:
            self.consumer_name = socket.gethostname()
        return self


class RedisDestination(DestinationSettings):
    """Dead letters appended to a Redis stream."""

    type: Literal["redis"]
    url: RedisUrl
    stream: NonEmptyStr
    maxlen: Annotated[int, Range(1)] | None = Field(
        default=None,
        description="Approximate cap on the stream's length (XADD MAXLEN ~); unset: none",
    )

    def where(self) -> str:
        return f"{redact_url(self.url)} stream {self.stream!r}"
