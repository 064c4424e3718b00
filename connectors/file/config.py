"""The `file` destination settings: dead letters as JSON Lines files."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.engine.settings import (
    DestinationSettings,
    NonEmptyStr,
)


class FileDestination(DestinationSettings):
    """Dead letters as JSON Lines files in a directory."""

    type: Literal["file"]
    path: NonEmptyStr = Field(description="Directory; relative to the working directory")

    def where(self) -> str:
        return self.path
