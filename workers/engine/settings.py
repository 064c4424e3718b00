"""The building blocks of configuration models, shared by the application's configuration and
each connector's own models (`connectors/<name>/config.py`).

Every check raises with one readable message; `invalid` reports several keys at once, relative to
the value being validated, and `workers.app.config_errors` puts them back where they belong.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from workers.engine.redact import redact_client_config, redact_text, redact_url

Loc = tuple[str | int, ...]


def invalid(*problems: tuple[Loc, str]) -> PydanticCustomError:
    """A validation error for keys relative to the validated value (several at once).

    Model validators can only raise one error and only at the model's own location; the
    relative paths ride in the context and `config_errors.problems_of` puts them back where they
    belong.
    """
    summary = "; ".join(message for _, message in problems)
    return PydanticCustomError(
        "esm_config", "{summary}", {"summary": summary, "problems": list(problems)}
    )


def here(message: str) -> PydanticCustomError:
    return invalid(((), message))


# --------------------------------------------------------------------------------------------
# Secrets: one rule, in workers.engine.redact. Values that came from `${VAR}` are shown as written.

# While a file is validated: each string that `${VAR}` substitution produced -> as written.
AS_WRITTEN: ContextVar[Mapping[str, str]] = ContextVar(
    "AS_WRITTEN", default=types.MappingProxyType({})
)


class Model(BaseModel):
    """Unknown keys are errors; credentials never show in repr() or str()."""

    model_config = ConfigDict(extra="forbid")

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "url" and isinstance(value, str):
                yield name, redact_url(value)
            elif name == "client_config" and isinstance(value, Mapping):
                yield name, redact_client_config(value)
            else:
                yield name, value


# --------------------------------------------------------------------------------------------
# Field types


def num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True, slots=True)
class Range:
    """Numeric bounds with one readable message ("must be between 1 and 10000 (got 0)").

    pydantic's own ge/le report one bound at a time and accept true/false as 1/0.
    """

    lo: float | None = None
    hi: float | None = None
    lo_exclusive: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        kind = "an integer" if source is int else "a number"

        def no_bool(value: Any) -> Any:
            if isinstance(value, bool):
                raise here(f"must be {kind} (got {show(value)})")
            return value

        return core_schema.no_info_before_validator_function(
            no_bool, core_schema.no_info_after_validator_function(self._check, handler(source))
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        if self.lo is not None:
            json_schema["exclusiveMinimum" if self.lo_exclusive else "minimum"] = self.lo
        if self.hi is not None:
            json_schema["maximum"] = self.hi
        return json_schema

    def _check(self, value: float) -> float:
        low_ok = self.lo is None or (value > self.lo if self.lo_exclusive else value >= self.lo)
        high_ok = self.hi is None or value <= self.hi
        if low_ok and high_ok:
            return value
        if self.lo is not None and self.hi is not None:
            if self.lo_exclusive:
                bounds = f"greater than {num(self.lo)} and at most {num(self.hi)}"
            else:
                bounds = f"between {num(self.lo)} and {num(self.hi)}"
        elif self.lo is not None:
            bounds = f"{'greater than' if self.lo_exclusive else 'at least'} {num(self.lo)}"
        else:
            assert self.hi is not None
            bounds = f"at most {num(self.hi)}"
        raise here(f"must be {bounds} (got {num(value)})")


_NAME = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value) or set(value) == {"."}:
        raise here(
            f"must be letters, digits, '.', '_' and '-' (got {show(value)})"
            if value
            else "must not be empty"
        )
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise here(f"is not an environment variable name (got {show(value)})")
    return value


def _check_client_value(value: Any) -> str | int | float | bool:
    if isinstance(value, str | int | float | bool):
        return value
    raise here(f"must be a string, number or boolean (got {show(value)})")


Name = Annotated[str, AfterValidator(_check_name)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
ClientValue = Annotated[
    str | int | float | bool,
    PlainValidator(_check_client_value),
    WithJsonSchema({"type": ["string", "integer", "number", "boolean"]}),
]
ClientConfig = dict[str, ClientValue]


def _check_bootstrap(value: str) -> str:
    if not value or any(not part.strip() for part in value.split(",")):
        raise here(f"must be a comma-separated list of host:port (got {show(value)})")
    return value


Bootstrap = Annotated[str, AfterValidator(_check_bootstrap)]


def url_checker(*schemes: str, path_schemes: tuple[str, ...] = ()) -> AfterValidator:
    names = [f"{scheme}://" for scheme in (*schemes, *path_schemes)]
    allowed = f"{', '.join(names[:-1])} or {names[-1]}"

    def check(value: str) -> str:
        shown = show(value)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise here(f"bad URL: {exc} (got {shown})") from None
        if parts.scheme not in (*schemes, *path_schemes) or "://" not in value:
            raise here(f"bad URL: scheme must be {allowed} (got {shown})")
        if parts.scheme in path_schemes:
            if not parts.path:
                raise here(f"bad URL: no socket path (got {shown})")
        elif not parts.hostname:
            raise here(f"bad URL: no host (got {shown})")
        return value

    return AfterValidator(check)


# 1973-03-03 in epoch ms: anything smaller was almost certainly written in seconds.
_MIN_EPOCH_MS = 100_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(value: str | int) -> int:
    """Epoch milliseconds of an ISO-8601 string (UTC unless it says otherwise) or an int."""
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def timestamp_ms(value: Any) -> int:
    """Epoch milliseconds of a time as `starting_position_timestamp` takes it (ISO-8601, UTC
    unless it says otherwise, or epoch milliseconds); raises ValueError saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"must be an ISO-8601 time or epoch milliseconds (got {show(value)})")
    try:
        ms = epoch_ms(value)
    except ValueError:
        raise ValueError(
            f"must be an ISO-8601 time or epoch milliseconds (got {show(value)})"
        ) from None
    if ms < _MIN_EPOCH_MS:
        raise ValueError(
            f"must be epoch milliseconds (got {show(value)}, which looks like seconds)"
        )
    return ms


def _check_timestamp(value: Any) -> str | int | None:
    if value is None:
        return None
    try:
        timestamp_ms(value)
    except ValueError as exc:
        raise here(str(exc)) from None
    checked: str | int = value
    return checked


Timestamp = Annotated[
    str | int | None,
    PlainValidator(_check_timestamp),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "integer", "minimum": _MIN_EPOCH_MS},
                {"type": "null"},
            ]
        }
    ),
]

StartingPosition = Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"]


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        # Before cutting it short: a secret cut in half would no longer be recognised.
        value = redact_text(AS_WRITTEN.get().get(value, value))
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


class SourceSettings(Model):
    """What a connector's source settings model derives from (with `type: Literal[name]`)."""

    type: str

    # Whether records of a unit are delivered in order; a record retried forever then holds up
    # the records after it (said by `Config.warnings`).
    ordered: ClassVar[bool] = True
    # Whether the broker takes back records to retry (`Capabilities.broker_retries`): with no
    # on-failure destination, exhausted records are left to its own dead-letter policy.
    broker_retries: ClassVar[bool] = False
    # The source is one unit (a queue): one lane per parallelization_factor slot, so a mapping
    # runs at most pollers x parallelization_factor batches at once.
    single_unit: ClassVar[bool] = False

    def complete(self, mapping: str) -> None:
        """Fill the defaults that depend on the mapping (such as a group named after it)."""


class DestinationSettings(Model):
    """What a connector's destination settings model derives from (`type: Literal[name]`)."""

    type: str

    def where(self) -> str:
        """Where the letters go, for messages: never credentials."""
        return self.type

    def complete(self, mapping: str, source: SourceSettings) -> list[tuple[Loc, str]]:
        """Fill defaults that depend on the mapping's source; returns what is wrong, as
        (key path relative to this destination, message)."""
        return []

    def warnings(self, mapping: str) -> list[str]:
        """Legal but probably unintended settings, shown at start-up and by `validate`."""
        return []


# --------------------------------------------------------------------------------------------
# What sources that keep a position share


class Positioned(SourceSettings):
    starting_position: StartingPosition = Field(
        default="TRIM_HORIZON",
        description=(
            "Where a consumer group with no checkpoint starts: TRIM_HORIZON (oldest, the default"
            " so that nothing is skipped), LATEST or AT_TIMESTAMP"
        ),
    )
    starting_position_timestamp: Timestamp = Field(
        default=None,
        description=(
            "With AT_TIMESTAMP only: ISO-8601 (UTC when no offset is given) or epoch milliseconds"
        ),
    )

    @model_validator(mode="after")
    def _timestamp_iff_at_timestamp(self) -> Self:
        at = self.starting_position == "AT_TIMESTAMP"
        if at and self.starting_position_timestamp is None:
            raise invalid(
                (
                    ("starting_position_timestamp",),
                    "is required with starting_position AT_TIMESTAMP",
                )
            )
        if not at and self.starting_position_timestamp is not None:
            raise invalid(
                (
                    ("starting_position_timestamp",),
                    "is only allowed with starting_position AT_TIMESTAMP"
                    f" (starting_position is {self.starting_position})",
                )
            )
        return self

    @property
    def starting_position_timestamp_ms(self) -> int | None:
        """`starting_position_timestamp` as epoch milliseconds."""
        value = self.starting_position_timestamp
        return None if value is None else epoch_ms(value)


# Keys the runtime owns: each points at the mapping key that sets it, or says why it is managed.
