"""The `memory` source settings: the in-process broker."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from workers.engine.settings import (
    NonEmptyStr,
    Range,
    SourceSettings,
)


class MemorySource(SourceSettings):
    """The in-process broker used by tests and `workers demo`."""

    type: Literal["memory"]
    topic: NonEmptyStr = "memory"
    partitions: Annotated[int, Range(1)] = 1
    generate: Annotated[int, Range(0)] = Field(
        default=0,
        description="Sample JSON records to pre-fill the topic with, for trying things out",
    )
    keys: Annotated[int, Range(0)] = Field(
        default=0, description="Distinct keys of the sample records (0: no keys)"
    )
    checkpoint: Literal["offset", "ack"] = Field(
        default="offset",
        description="offset: read like Kafka (committed offsets per partition); ack: read like"
        " Redis Streams (each record acked, unacked ones delivered again after a restart)",
    )
    broker: NonEmptyStr | None = Field(
        default=None,
        description="Name of an in-process broker that every source naming it shares, so a"
        " restarted source resumes where the last one left off (default: a broker of its own)",
    )
