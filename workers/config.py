"""The mapping file: YAML with `${VAR}` substitution, validated into typed models.

Every problem is reported as `FILE: KEY.PATH: what is wrong`, all of them at once.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import re
import socket
import sys
import types
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Self, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from workers.amqp_url import query_problems
from workers.invoker import FunctionSpec
from workers.redact import REDACTED, is_secret_name, redact_client_config, redact_text, redact_url

__all__ = [
    "Config",
    "ConfigError",
    "DestinationConfig",
    "EventSourceMapping",
    "FileDestination",
    "FilterCriteria",
    "FilterSpec",
    "FunctionConfig",
    "KafkaDestination",
    "KafkaSource",
    "MemorySource",
    "MetricsConfig",
    "Problem",
    "RabbitMQDestination",
    "RabbitMQSource",
    "RedisDestination",
    "RedisSource",
    "check_handler",
    "config_from_dict",
    "json_schema",
    "load_config",
    "parse_config",
    "redact_url",
]

Loc = tuple[str | int, ...]

# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration: where (a key path) and what."""

    path: str  # e.g. "event_source_mappings[0].batch_size"; "" for the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A configuration cannot be used; the message has one `FILE: PATH: problem` line each."""

    def __init__(self, file: str | Path, problems: Sequence[Problem]) -> None:
        self.file = str(file)
        # Whatever a message quotes, a password in it is masked (workers.redact's one rule).
        self.problems = tuple(Problem(p.path, redact_text(p.message)) for p in problems)
        super().__init__("\n".join(f"{self.file}: {problem}" for problem in self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, tuple[Problem, ...]]]:
        return (type(self), (self.file, self.problems))


def _invalid(*problems: tuple[Loc, str]) -> PydanticCustomError:
    """A validation error for keys relative to the validated value (several at once).

    Model validators can only raise one error and only at the model's own location; the
    relative paths ride in the context and `_problems_of` puts them back where they belong.
    """
    summary = "; ".join(message for _, message in problems)
    return PydanticCustomError(
        "esm_config", "{summary}", {"summary": summary, "problems": list(problems)}
    )


def _here(message: str) -> PydanticCustomError:
    return _invalid(((), message))


# --------------------------------------------------------------------------------------------
# Secrets: one rule, in workers.redact. Values that came from `${VAR}` are shown as written.

# While a file is validated: each string that `${VAR}` substitution produced -> as written.
_AS_WRITTEN: ContextVar[Mapping[str, str]] = ContextVar(
    "_AS_WRITTEN", default=types.MappingProxyType({})
)


class _Model(BaseModel):
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


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True, slots=True)
class _Range:
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
                raise _here(f"must be {kind} (got {_show(value)})")
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
                bounds = f"greater than {_num(self.lo)} and at most {_num(self.hi)}"
            else:
                bounds = f"between {_num(self.lo)} and {_num(self.hi)}"
        elif self.lo is not None:
            bounds = f"{'greater than' if self.lo_exclusive else 'at least'} {_num(self.lo)}"
        else:
            assert self.hi is not None
            bounds = f"at most {_num(self.hi)}"
        raise _here(f"must be {bounds} (got {_num(value)})")


_NAME = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value) or set(value) == {"."}:
        raise _here(
            f"must be letters, digits, '.', '_' and '-' (got {_show(value)})"
            if value
            else "must not be empty"
        )
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise _here(f"is not an environment variable name (got {_show(value)})")
    return value


def _check_client_value(value: Any) -> str | int | float | bool:
    if isinstance(value, str | int | float | bool):
        return value
    raise _here(f"must be a string, number or boolean (got {_show(value)})")


Name = Annotated[str, AfterValidator(_check_name)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
ClientValue = Annotated[
    str | int | float | bool,
    PlainValidator(_check_client_value),
    WithJsonSchema({"type": ["string", "integer", "number", "boolean"]}),
]
ClientConfig = dict[str, ClientValue]


def _check_bootstrap(value: str) -> str:
    if not value or any(not part.strip() for part in value.split(",")):
        raise _here(f"must be a comma-separated list of host:port (got {_show(value)})")
    return value


Bootstrap = Annotated[str, AfterValidator(_check_bootstrap)]


def _url_checker(*schemes: str, path_schemes: tuple[str, ...] = ()) -> AfterValidator:
    names = [f"{scheme}://" for scheme in (*schemes, *path_schemes)]
    allowed = f"{', '.join(names[:-1])} or {names[-1]}"

    def check(value: str) -> str:
        shown = _show(value)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise _here(f"bad URL: {exc} (got {shown})") from None
        if parts.scheme not in (*schemes, *path_schemes) or "://" not in value:
            raise _here(f"bad URL: scheme must be {allowed} (got {shown})")
        if parts.scheme in path_schemes:
            if not parts.path:
                raise _here(f"bad URL: no socket path (got {shown})")
        elif not parts.hostname:
            raise _here(f"bad URL: no host (got {shown})")
        return value

    return AfterValidator(check)


def _check_amqp_query(value: str) -> str:
    problems = query_problems(value)
    if problems:
        raise _here("bad URL: " + "; ".join(problems))
    return value


AmqpUrl = Annotated[str, _url_checker("amqp", "amqps"), AfterValidator(_check_amqp_query)]
RedisUrl = Annotated[str, _url_checker("redis", "rediss", path_schemes=("unix",))]

# 1973-03-03 in epoch ms: anything smaller was almost certainly written in seconds.
_MIN_EPOCH_MS = 100_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_ms(value: str | int) -> int:
    """Epoch milliseconds of an ISO-8601 string (UTC unless it says otherwise) or an int."""
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _check_timestamp(value: Any) -> str | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _here(f"must be an ISO-8601 time or epoch milliseconds (got {_show(value)})")
    try:
        ms = _epoch_ms(value)
    except ValueError:
        raise _here(
            f"must be an ISO-8601 time or epoch milliseconds (got {_show(value)})"
        ) from None
    if ms < _MIN_EPOCH_MS:
        raise _here(f"must be epoch milliseconds (got {_show(value)}, which looks like seconds)")
    return value


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

# --------------------------------------------------------------------------------------------
# Functions

_HANDLER = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)")


def split_handler(handler: str) -> tuple[str, str] | None:
    """(module, function) of `module:function` or of Lambda's own `module.function` spelling
    (the last dot separates the function), or None when it is neither."""
    found = _HANDLER.fullmatch(handler)
    if found is None and ":" not in handler:
        module, dot, function = handler.rpartition(".")
        found = _HANDLER.fullmatch(f"{module}:{function}") if dot else None
    return (found["module"], found["function"]) if found else None


def _handler_problem(handler: str) -> str | None:
    if split_handler(handler) is not None:
        return None
    return f"must be 'module:function' or Lambda's 'module.function' (got {_show(handler)})"


class FunctionConfig(_Model):
    """A function: the handler and the limits of its execution environments."""

    handler: str = Field(
        description=(
            "'package.module:function' or Lambda's 'package.module.function';"
            " async def handlers are allowed"
        ),
        examples=["app.handlers:handle_orders"],
    )
    timeout_s: Annotated[float, _Range(0, 900, lo_exclusive=True)] = Field(
        default=30.0, description="An invocation running longer is killed and counts as failed"
    )
    memory_mb: Annotated[int, _Range(128, 10240)] = Field(
        default=512, description="Memory limit of one execution environment"
    )
    concurrency: Annotated[int, _Range(1)] = Field(
        default=4, description="Most execution environments running at once"
    )
    isolation: Literal["process", "thread"] = Field(
        "process", description="'process' runs the handler in a child process; 'thread' in-process"
    )
    environment: dict[Annotated[str, AfterValidator(_check_env_name)], str] = Field(
        default_factory=dict, description="Environment variables set for the handler"
    )

    @field_validator("handler")
    @classmethod
    def _handler_shape(cls, value: str) -> str:
        problem = _handler_problem(value)
        if problem:
            raise _here(problem)
        return value

    def spec(self, name: str) -> FunctionSpec:
        """This function as the invoker takes it."""
        return FunctionSpec(
            name=name,
            handler=self.handler,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            concurrency=self.concurrency,
            isolation=self.isolation,
            environment=dict(self.environment),
        )


@contextmanager
def _environment(overlay: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in overlay}
    os.environ.update(overlay)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def check_handler(spec: FunctionSpec, file: str | Path = "<config>") -> None:
    """Import the handler's module and check the function is there and callable.

    Not part of parsing: the module may only become importable once the runtime has set up
    sys.path. The import runs with the function's `environment` applied, because handlers often
    read it at import time (as on Lambda, where it is set before the module loads).
    """
    path = _render(("functions", spec.name, "handler"))

    def fail(message: str) -> NoReturn:
        raise ConfigError(file, [Problem(path, message)])

    parts = split_handler(spec.handler)
    if parts is None:
        fail(f"must be 'module:function' or Lambda's 'module.function' (got {_show(spec.handler)})")
    module_name, function_name = parts
    try:
        with _environment(spec.environment):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            fail(f"cannot import {module_name!r}: no module named {exc.name!r}")
        fail(f"importing {module_name!r} failed: ModuleNotFoundError: {exc}")
    except (Exception, SystemExit) as exc:  # whatever the module raises while it runs
        fail(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    function = getattr(module, function_name, None)
    if function is None:
        fail(f"module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        fail(f"{spec.handler!r} is not callable (it is {type(function).__name__})")


# --------------------------------------------------------------------------------------------
# Sources


class _Positioned(_Model):
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
            raise _invalid(
                (
                    ("starting_position_timestamp",),
                    "is required with starting_position AT_TIMESTAMP",
                )
            )
        if not at and self.starting_position_timestamp is not None:
            raise _invalid(
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
        return None if value is None else _epoch_ms(value)


# Keys the runtime owns: each points at the mapping key that sets it, or says why it is managed.
_KAFKA_OWNED = {
    "bootstrap.servers": "set bootstrap_servers instead",
    "group.id": "set consumer_group_id instead",
    "auto.offset.reset": "set starting_position instead",
    "enable.auto.commit": "offsets are committed by the runtime once records have settled",
    "enable.auto.offset.store": "offsets are committed by the runtime once records have settled",
}


class KafkaSource(_Positioned):
    """A Kafka (or Kafka-protocol) consumer group reading topics."""

    type: Literal["kafka"]
    bootstrap_servers: Bootstrap = Field(description="host:port[,host:port...]")
    topics: list[NonEmptyStr] = Field(min_length=1)
    consumer_group_id: str = Field(default="", description="Default: the mapping's name")
    client_config: ClientConfig = Field(
        default_factory=dict,
        description="librdkafka properties passed as they are (SASL, TLS, session.timeout.ms...)",
    )

    @field_validator("client_config")
    @classmethod
    def _no_owned_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = [
            ((key,), f"cannot be set here: {_KAFKA_OWNED[key]}")
            for key in value
            if key in _KAFKA_OWNED
        ]
        if owned:
            raise _invalid(*owned)
        return value


class RabbitMQSource(_Model):
    """A RabbitMQ queue; the virtual host comes from the URL's path."""

    type: Literal["rabbitmq"]
    url: AmqpUrl = Field(description="amqp://user:pass@host:5672/vhost (amqps:// for TLS)")
    queue: NonEmptyStr
    prefetch_count: Annotated[int, _Range(1, 65535)] | None = Field(
        default=None,
        description="Unacknowledged messages the broker sends ahead; unset: connector's choice",
    )

    @property
    def virtual_host(self) -> str:
        # As pika reads it: no path or "/" is the default vhost "/", otherwise the unquoted path.
        path = urlsplit(self.url).path
        return "/" if path in ("", "/") else unquote(path[1:])


class RedisSource(_Positioned):
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
    claim_idle_s: Annotated[float, _Range(0, lo_exclusive=True)] = Field(
        default=60.0, description="Entries pending longer than this on another consumer are claimed"
    )
    partition_key_field: NonEmptyStr | None = Field(
        default=None,
        description="Entry field whose value orders records, for key-ordered parallelism",
    )

    @model_validator(mode="after")
    def _default_consumer_name(self) -> Self:
        if not self.consumer_name:
            self.consumer_name = socket.gethostname()
        return self


class MemorySource(_Model):
    """The in-process broker used by tests and `workers demo`."""

    type: Literal["memory"]
    topic: NonEmptyStr = "memory"
    partitions: Annotated[int, _Range(1)] = 1
    generate: Annotated[int, _Range(0)] = Field(
        default=0,
        description="Sample JSON records to pre-fill the topic with, for trying things out",
    )
    keys: Annotated[int, _Range(0)] = Field(
        default=0, description="Distinct keys of the sample records (0: no keys)"
    )


Source = Annotated[
    KafkaSource | RabbitMQSource | RedisSource | MemorySource, Field(discriminator="type")
]

# --------------------------------------------------------------------------------------------
# Destinations


class KafkaDestination(_Model):
    """Dead letters produced to a Kafka topic."""

    type: Literal["kafka"]
    topic: NonEmptyStr
    bootstrap_servers: Bootstrap | None = Field(
        default=None, description="Default: the source's cluster (and its client_config)"
    )
    client_config: ClientConfig = Field(default_factory=dict)


class RabbitMQDestination(_Model):
    """Dead letters published to a RabbitMQ exchange."""

    type: Literal["rabbitmq"]
    url: AmqpUrl
    exchange: str = Field(
        default="", description="'' is the default exchange (routing_key = queue name)"
    )
    routing_key: str
    queue: str = Field(
        default="",
        description=(
            "The queue the letters land in, read by `workers dlq`; default: routing_key when"
            " exchange is '' (the default exchange routes by queue name)"
        ),
    )

    @property
    def letters_queue(self) -> str:
        return self.queue or (self.routing_key if not self.exchange else "")


class RedisDestination(_Model):
    """Dead letters appended to a Redis stream."""

    type: Literal["redis"]
    url: RedisUrl
    stream: NonEmptyStr
    maxlen: Annotated[int, _Range(1)] | None = Field(
        default=None,
        description="Approximate cap on the stream's length (XADD MAXLEN ~); unset: none",
    )


class FileDestination(_Model):
    """Dead letters as JSON Lines files in a directory."""

    type: Literal["file"]
    path: NonEmptyStr = Field(description="Directory; relative to the working directory")


Destination = Annotated[
    KafkaDestination | RabbitMQDestination | RedisDestination | FileDestination,
    Field(discriminator="type"),
]


class DestinationConfig(_Model):
    """Where records go once they exhaust their retries or their maximum age."""

    on_failure: Destination


# --------------------------------------------------------------------------------------------
# Mappings


def _pattern_text(value: Any) -> Any:
    # A mapping in YAML is friendlier than JSON inside a string; store the JSON text Lambda uses.
    return json.dumps(value) if isinstance(value, dict) else value


class FilterSpec(_Model):
    """One filter: a record matching any filter is processed, the others are skipped."""

    pattern: Annotated[
        str,
        BeforeValidator(_pattern_text),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "object"}]}),
    ] = Field(description="Lambda/EventBridge pattern, as JSON text or as a YAML mapping")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        from workers.filters import FilterError, compile_pattern

        try:
            compile_pattern(value)
        except FilterError as exc:
            raise _here(str(exc)) from None
        return value


class FilterCriteria(_Model):
    filters: list[FilterSpec] = Field(default_factory=list)


class EventSourceMapping(_Model):
    """Reads a source, batches its records and invokes a function with them."""

    name: Name = Field(description="Unique; the default consumer group")
    function: str = Field(description="A key of `functions`")
    enabled: bool = True
    pollers: Annotated[int, _Range(1)] = Field(
        default=1, description="Poller processes sharing the group or queue"
    )
    source: Source
    batch_size: Annotated[int, _Range(1, 10000)] = Field(
        default=100, description="Most records per invocation"
    )
    maximum_batch_bytes: Annotated[int, _Range(1, 64 * 1024 * 1024)] = Field(
        6 * 1024 * 1024, description="Payload cap per invocation (Lambda's is 6 MiB)"
    )
    maximum_batching_window_s: Annotated[float, _Range(0, 300)] = Field(
        default=0.5, description="Longest wait to fill a batch"
    )
    parallelization_factor: Annotated[int, _Range(1, 100)] = Field(
        default=1, description="Concurrent batches per partition or stream, ordered per key"
    )
    bisect_batch_on_function_error: bool = Field(
        default=False,
        description="Split a failing batch in two and retry each half (Lambda's default: off)",
    )
    maximum_retry_attempts: Annotated[int, _Range(-1, 10000)] = Field(
        default=-1,
        description=(
            "Retries of a failing batch; -1 (Lambda's default for streams) retries until the"
            " records succeed or exceed maximum_record_age_s"
        ),
    )
    maximum_record_age_s: int = Field(
        default=-1, description="Records older than this are not retried; -1: no limit"
    )
    function_response_types: list[Literal["ReportBatchItemFailures"]] = Field(
        default_factory=list,
        description="[ReportBatchItemFailures] lets the handler report failed records",
    )
    filter_criteria: FilterCriteria | None = None
    destination_config: DestinationConfig | None = None

    @field_validator("maximum_record_age_s", mode="before")
    @classmethod
    def _no_bool_age(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise _here(f"must be an integer (got {_show(value)})")
        return value

    @field_validator("maximum_record_age_s")
    @classmethod
    def _record_age(cls, value: int) -> int:
        if value != -1 and not 1 <= value <= 604800:
            raise _here(f"must be -1 (no limit) or between 1 and 604800 (got {value})")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Self:
        source = self.source
        if isinstance(source, KafkaSource) and not source.consumer_group_id:
            source.consumer_group_id = self.name
        if isinstance(source, RedisSource) and not source.consumer_group:
            source.consumer_group = self.name
        destination = self.destination_config.on_failure if self.destination_config else None
        if isinstance(destination, KafkaDestination) and destination.bootstrap_servers is None:
            if not isinstance(source, KafkaSource):
                raise _invalid(
                    (
                        ("destination_config", "on_failure", "bootstrap_servers"),
                        f"is required when the source is not kafka (it is {source.type})",
                    )
                )
            # Same cluster: the source's credentials and TLS settings are needed to reach it.
            destination.bootstrap_servers = source.bootstrap_servers
            if not destination.client_config:
                destination.client_config = dict(source.client_config)
        if (
            isinstance(destination, KafkaDestination)
            and isinstance(source, KafkaSource)
            and destination.topic in source.topics
            and destination.bootstrap_servers == source.bootstrap_servers
        ):
            # Lambda refuses this too: every letter would be read again as a record, in a loop.
            raise _invalid(
                (
                    ("destination_config", "on_failure", "topic"),
                    f"must not be a topic the mapping reads ({destination.topic!r}):"
                    " its letters would be read back as records",
                )
            )
        return self


class MetricsConfig(_Model):
    """The Prometheus and health endpoint."""

    host: str = Field(
        default="127.0.0.1", description="Bind address; loopback unless you mean otherwise"
    )
    port: Annotated[int, _Range(0, 65535)] | None = Field(
        default=None,
        description="Unset: no endpoint unless --metrics-port is given; 0: any free port",
    )


def _reference_problems(
    functions: Collection[str] | None, mappings: Sequence[tuple[object, object]]
) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    first_use: dict[str, int] = {}
    for index, (name, function) in enumerate(mappings):
        if isinstance(name, str):
            if name in first_use:
                problems.append(
                    (
                        ("event_source_mappings", index, "name"),
                        f"duplicate mapping name {name!r}"
                        f" (also event_source_mappings[{first_use[name]}])",
                    )
                )
            else:
                first_use[name] = index
        if functions is not None and isinstance(function, str) and function not in functions:
            known = ", ".join(repr(f) for f in functions) or "none"
            problems.append(
                (
                    ("event_source_mappings", index, "function"),
                    f"no function named {function!r} in functions (known: {known})",
                )
            )
    return problems


class Config(_Model):
    """An esm-workers configuration: functions and the event source mappings feeding them."""

    functions: dict[Name, FunctionConfig] = Field(min_length=1)
    event_source_mappings: list[EventSourceMapping] = Field(min_length=1)
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig())

    _file: str = PrivateAttr("<config>")

    @model_validator(mode="after")
    def _references(self) -> Self:
        problems = _reference_problems(
            self.functions, [(m.name, m.function) for m in self.event_source_mappings]
        )
        if problems:
            raise _invalid(*problems)
        return self

    @property
    def file(self) -> str:
        """Where this configuration came from, as error messages name it."""
        return self._file

    def mapping(self, name: str) -> EventSourceMapping:
        for mapping in self.event_source_mappings:
            if mapping.name == name:
                return mapping
        known = ", ".join(repr(m.name) for m in self.event_source_mappings)
        raise ConfigError(
            self.file,
            [Problem("event_source_mappings", f"no mapping named {name!r} (known: {known})")],
        )

    def function_spec(self, name: str) -> FunctionSpec:
        """The function a mapping's `function` names, as the invoker takes it."""
        function = self.functions.get(name)
        if function is None:
            known = ", ".join(repr(f) for f in self.functions)
            raise ConfigError(
                self.file, [Problem("functions", f"no function named {name!r} (known: {known})")]
            )
        return function.spec(name)

    def check_handlers(self) -> None:
        """`check_handler` for every function; one ConfigError listing all that fail."""
        problems: list[Problem] = []
        for name, function in self.functions.items():
            try:
                check_handler(function.spec(name), self.file)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(self.file, problems)

    def warnings(self) -> list[str]:
        """Legal but probably unintended settings, to show at start-up and by `validate`."""
        found: list[str] = []
        for m in self.event_source_mappings:
            if not m.enabled:
                continue
            if m.destination_config is None:
                found.append(
                    f"mapping {m.name!r} has no on-failure destination:"
                    " records that exhaust their retries will be dropped"
                )
            on_failure = m.destination_config.on_failure if m.destination_config else None
            if isinstance(on_failure, RabbitMQDestination) and not on_failure.letters_queue:
                found.append(
                    f"mapping {m.name!r} dead-letters to exchange {on_failure.exchange!r} with no"
                    " `queue`: `workers dlq` cannot read those letters back"
                )
            if (
                m.maximum_retry_attempts == -1
                and m.maximum_record_age_s == -1
                and m.destination_config is None
            ):
                found.append(
                    f"mapping {m.name!r} retries a failing record forever"
                    " (maximum_retry_attempts and maximum_record_age_s are both -1)"
                    + ("" if m.source.type == "rabbitmq" else ", holding up the records after it")
                )
        return found


# --------------------------------------------------------------------------------------------
# Error messages


def _show(value: Any) -> str:
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
        value = redact_text(_AS_WRITTEN.get().get(value, value))
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _render(loc: Sequence[str | int]) -> str:
    """A key path as users write it: `event_source_mappings[0].source.topics[1]`."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself is wrong"
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _strip(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tagged(tp: Any) -> dict[str, type[BaseModel]]:
    """The members of a union of models by their `type` tag ({} if `tp` is no such union)."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members: dict[str, type[BaseModel]] = {}
    for arg in get_args(tp):
        field = arg.model_fields.get("type") if _is_model(arg) else None
        if field is not None:
            members[get_args(field.annotation)[0]] = arg
    return members


@dataclass(slots=True)
class _Located:
    loc: Loc  # without discriminator tags
    parent: type[BaseModel] | None  # the model holding the last key
    target: Any  # the declared type at the location, when known


def _locate(loc: Sequence[str | int]) -> _Located:
    """Follow a pydantic error location through the models, dropping union tags."""
    out: list[str | int] = []
    tp: Any = Config
    parent: type[BaseModel] | None = None
    for part in loc:
        tp = _strip(tp)
        tagged = _tagged(tp)
        if tagged and part in tagged:
            tp = tagged[part]
            continue
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
            tp = _strip(args[0])  # Optional[X]
        out.append(part)
        if _is_model(tp):
            parent = tp
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = field.annotation if field else None
        elif get_origin(tp) is list:
            parent, tp = None, get_args(tp)[0]
        elif get_origin(tp) is dict:
            parent, tp = None, get_args(tp)[1]
        else:
            parent, tp = None, None
    return _Located(tuple(out), parent, _strip(tp))


_KINDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(error: Any, at: _Located) -> tuple[Loc, str]:
    kind: str = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    last = next((p for p in reversed(at.loc) if isinstance(p, str)), "")
    if is_secret_name(last):
        value = REDACTED
    got = f" (got {_show(value)})"
    if kind == "missing":
        return at.loc, "is required"
    if kind == "extra_forbidden":
        known = list(at.parent.model_fields) if at.parent else []
        close = difflib.get_close_matches(str(last), known, n=1)
        if close:
            return at.loc, f"unknown key (did you mean {close[0]!r}?)"
        return at.loc, "unknown key" + (f" (known keys: {', '.join(known)})" if known else "")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(repr(t) for t in _tagged(at.target)) or ctx.get("expected_tags", "")
        if kind == "union_tag_not_found":
            return (*at.loc, "type"), f"is required (one of {tags})"
        return (*at.loc, "type"), f"must be one of {tags} (got {_show(ctx.get('tag'))})"
    if kind == "literal_error":
        return at.loc, f"must be {ctx.get('expected')}{got}"
    if kind in ("too_short", "string_too_short"):
        return at.loc, "must not be empty"
    if kind in _KINDS:
        message = f"must be {_KINDS[kind]}{got}"
        if kind == "string_type" and isinstance(value, int | float):
            message += "; quote it in YAML"
        return at.loc, message
    text: str = error["msg"]
    text = text.removeprefix("Value error, ")
    return at.loc, text[:1].lower() + text[1:] + got


def _problems_of(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "esm_config":
            ctx = error.get("ctx") or {}
            for relative, message in ctx.get("problems") or [((), error["msg"])]:
                problems.append(Problem(_render(_locate((*loc, *relative)).loc), message))
            continue
        where, message = _message(error, _locate(loc))
        problems.append(Problem(_render(where), message))
    return problems


# --------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


# Unquoted times stay strings (PyYAML would make datetimes that no string field accepts).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise ConfigError(file, [Problem("", f"{where}invalid YAML: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, [Problem("", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        # PyYAML's composer recurses once per level: a document nested hundreds deep.
        raise ConfigError(file, [Problem("", "invalid YAML: nested too deeply")]) from None


_REFERENCE = re.compile(
    r"\$\$\{|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?"
)


def _substitute(
    node: Any,
    environ: Mapping[str, str],
    loc: Loc,
    problems: list[tuple[Loc, str]],
    as_written: dict[str, str] | None = None,
) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string value; `$${` is a literal `${`.

    Done on parsed values, not on the text, so a value can hold any character without breaking
    the YAML. Keys are left alone. As in the shell, `:-` also applies when VAR is set but empty.
    Each string changed is noted in `as_written` (result -> text in the file), so that error
    messages can show what the file says rather than what the environment put there.
    """
    if isinstance(node, dict):
        return {
            k: _substitute(v, environ, (*loc, k), problems, as_written) for k, v in node.items()
        }
    if isinstance(node, list):
        return [
            _substitute(v, environ, (*loc, i), problems, as_written) for i, v in enumerate(node)
        ]
    if not isinstance(node, str) or "${" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$${":
            return "${"
        name, default = match.group("name"), match.group("default")
        if name is None:
            snippet = node[match.start() : match.start() + 20]
            problems.append(
                (
                    loc,
                    f"malformed reference {snippet!r}: write ${{NAME}} or ${{NAME:-default}}"
                    " (or $${ for a literal ${)",
                )
            )
            return text
        value = environ.get(name)
        if default is not None:
            return value or default
        if value is None:
            problems.append(
                (
                    loc,
                    f"environment variable {name} is not set"
                    f" (write ${{{name}:-default}} to give a default)",
                )
            )
            return text
        return value

    result = _REFERENCE.sub(replace, node)
    if as_written is not None and result != node:
        as_written[result] = node
    return result


def config_from_dict(data: Any, file: str | Path = "<config>") -> Config:
    """Validate already-parsed configuration data (no substitution)."""
    name = str(file)
    if not isinstance(data, dict):
        what = "empty" if data is None else f"{_show(data)}, not a mapping"
        raise ConfigError(
            name,
            [
                Problem(
                    "", f"the configuration is {what}: expected functions and event_source_mappings"
                )
            ],
        )
    # Top-level `x-...` keys hold YAML anchors to reuse (the Compose convention): not settings.
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = _problems_of(exc)
        # Reference checks run after field validation, so they are lost when any field is bad;
        # redo them on the raw data so that one run reports everything.
        functions = data.get("functions")
        mappings = data.get("event_source_mappings")
        raw = [
            (m.get("name"), m.get("function")) if isinstance(m, dict) else (None, None)
            for m in (mappings if isinstance(mappings, list) else [])
        ]
        for loc, message in _reference_problems(
            functions if isinstance(functions, dict) else None, raw
        ):
            problem = Problem(_render(loc), message)
            if problem not in problems:
                problems.append(problem)
        raise ConfigError(name, problems) from None
    config._file = name
    return config


def parse_config(
    text: str, file: str | Path = "<string>", environ: Mapping[str, str] | None = None
) -> Config:
    """Parse and validate YAML text; `file` is the name error messages use."""
    name = str(file)
    data = _parse_yaml(text, name)
    problems: list[tuple[Loc, str]] = []
    as_written: dict[str, str] = {}
    data = _substitute(data, os.environ if environ is None else environ, (), problems, as_written)
    if problems:
        raise ConfigError(name, [Problem(_render(loc), message) for loc, message in problems])
    token = _AS_WRITTEN.set(as_written)
    try:
        return config_from_dict(data, name)
    finally:
        _AS_WRITTEN.reset(token)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a configuration file; raises ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(path, [Problem("", f"cannot read the file: {reason}")]) from None
    return parse_config(text, path, environ)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (config/schema.json holds a copy)."""
    schema = Config.model_json_schema()
    schema["title"] = "esm-workers configuration"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.config")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema")
    args = parser.parse_args(argv)
    if not args.schema:
        parser.print_usage(sys.stderr)
        return 2
    print(json.dumps(json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
