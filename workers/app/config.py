"""The mapping file's models: functions, event source mappings and their settings.

Reading the file and `${VAR}` substitution are in `config_loading`, the wording of problems
(`FILE: KEY.PATH: what is wrong`, all of them at once) in `config_errors`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    NoReturn,
    Self,
    Union,
)

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from workers.app.config_errors import ConfigError, Problem, problems_of, render
from workers.app.config_loading import read_text, read_yaml
from workers.app.config_warnings import mapping_warnings
from workers.engine.invoker import DEFAULT_REGION, FunctionSpec
from workers.engine.redact import redact_url
from workers.engine.settings import (
    AS_WRITTEN,
    DestinationSettings,
    EnvName,
    Loc,
    Model,
    Name,
    NonEmptyStr,
    Range,
    SourceSettings,
    here,
    invalid,
    show,
)

__all__ = [
    "Config",
    "ConfigError",
    "DestinationConfig",
    "EventSourceMapping",
    "FilterCriteria",
    "FilterSpec",
    "FunctionConfig",
    "MetricsConfig",
    "Problem",
    "check_handler",
    "config_from_dict",
    "json_schema",
    "load_config",
    "parse_config",
    "redact_url",
    "split_handler",
]


# --------------------------------------------------------------------------------------------
# Functions

# Lowercase letters, digits and dashes, as AWS names regions (eu-west-1, us-gov-east-1).
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
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
    return f"must be 'module:function' or Lambda's 'module.function' (got {show(handler)})"


class FunctionConfig(Model):
    """A function: the handler and the limits of its execution environments."""

    handler: str = Field(
        description=(
            "'package.module:function' or Lambda's 'package.module.function';"
            " async def handlers are allowed"
        ),
        examples=["app.handlers:handle_orders"],
    )
    timeout_s: Annotated[float, Range(0, 900, lo_exclusive=True)] = Field(
        default=30.0, description="An invocation running longer is killed and counts as failed"
    )
    memory_mb: Annotated[int, Range(128, 10240)] = Field(
        default=512, description="Memory limit of one execution environment"
    )
    concurrency: Annotated[int, Range(1)] = Field(
        default=4, description="Most execution environments running at once"
    )
    isolation: Literal["process", "thread"] = Field(
        "process", description="'process' runs the handler in a child process; 'thread' in-process"
    )
    environment: dict[EnvName, str] = Field(
        default_factory=dict, description="Environment variables set for the handler"
    )
    region: str = Field(
        default=DEFAULT_REGION,
        description=(
            "AWS_REGION and AWS_DEFAULT_REGION the handler sees when the worker's environment"
            " sets neither"
        ),
        examples=["eu-west-1"],
    )
    code_paths: list[NonEmptyStr] = Field(
        default_factory=list,
        description=(
            "Directories put first on the handler's import path, in order (relative to this"
            " file's directory): the function's code, then its layers, as Lambda's task root and"
            " /opt/python; the first is LAMBDA_TASK_ROOT. Default: the working directory"
        ),
        examples=[["src/orders", "layers/common/python"]],
    )

    @field_validator("handler")
    @classmethod
    def _handler_shape(cls, value: str) -> str:
        problem = _handler_problem(value)
        if problem:
            raise here(problem)
        return value

    @field_validator("region")
    @classmethod
    def _region_shape(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise here(f"must be a region name such as 'eu-west-1' (got {show(value)})")
        return value

    def spec(self, name: str, base: str | Path | None = None) -> FunctionSpec:
        """This function as the invoker takes it; `code_paths` are made absolute from `base`
        (the configuration file's directory; default: the working directory)."""
        root = Path(base) if base is not None else Path.cwd()
        return FunctionSpec(
            name=name,
            handler=self.handler,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            concurrency=self.concurrency,
            isolation=self.isolation,
            environment=dict(self.environment),
            region=self.region,
            code_paths=tuple(str((root / path).resolve()) for path in self.code_paths),
        )


def check_handler(spec: FunctionSpec, file: str | Path = "<config>") -> None:
    """Import the handler's module and check the function is there and callable.

    Not part of parsing: the module may only become importable once the runtime has set up
    sys.path. The import runs with the function's variables applied, Lambda's reserved ones
    (AWS_REGION, ...) included, because handlers often read them at import time (as on Lambda,
    where they are set before the module loads): `boto3.client("s3")` at the top of a module
    needs a region.
    """
    from workers.invoke.loading import applied

    path = render(("functions", spec.name, "handler"))

    def fail(message: str) -> NoReturn:
        raise ConfigError(file, [Problem(path, message)])

    parts = split_handler(spec.handler)
    if parts is None:
        fail(f"must be 'module:function' or Lambda's 'module.function' (got {show(spec.handler)})")
    module_name, function_name = parts
    try:
        with applied(spec, log_stream_name="validate"):
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
# Sources and destinations: each connector's own models (`connectors/<name>/config.py`), found
# through the registry and assembled into tagged unions on `type` by `_assemble` below.


def _tagged_union(models: list[type[Any]]) -> Any:
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007


def _assemble() -> tuple[Any, Any]:
    from workers.app.registry import connectors

    found = connectors().values()
    sources = [c.source_settings for c in found if c.source_settings is not None]
    destinations = [c.destination_settings for c in found if c.destination_settings is not None]
    return _tagged_union(sources), _tagged_union(destinations)


if TYPE_CHECKING:
    Source = SourceSettings
    Destination = DestinationSettings
else:
    Source, Destination = _assemble()


class DestinationConfig(Model):
    """Where records go once they exhaust their retries or their maximum age."""

    on_failure: Destination


# --------------------------------------------------------------------------------------------
# Mappings


def _pattern_text(value: Any) -> Any:
    # A mapping in YAML is friendlier than JSON inside a string; store the JSON text Lambda uses.
    return json.dumps(value) if isinstance(value, dict) else value


class FilterSpec(Model):
    """One filter: a record matching any filter is processed, the others are skipped."""

    pattern: Annotated[
        str,
        BeforeValidator(_pattern_text),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "object"}]}),
    ] = Field(description="Lambda/EventBridge pattern, as JSON text or as a YAML mapping")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        from workers.engine.filters import FilterError, compile_pattern

        try:
            compile_pattern(value)
        except FilterError as exc:
            raise here(str(exc)) from None
        return value


class FilterCriteria(Model):
    filters: list[FilterSpec] = Field(default_factory=list)


class ScalingConfig(Model):
    """Lambda's ScalingConfig: how far a mapping's concurrency may go."""

    maximum_concurrency: Annotated[int, Range(2, 1000)] = Field(
        description=(
            "Most batches of the mapping invoked at once, over all its pollers (Lambda's"
            " MaximumConcurrency, 2 to 1000); the lanes (partitions and streams times"
            " parallelization_factor) still bound it too"
        )
    )


class EventSourceMapping(Model):
    """Reads a source, batches its records and invokes a function with them."""

    name: Name = Field(description="Unique; the default consumer group")
    function: str = Field(description="A key of `functions`")
    enabled: bool = Field(
        default=True,
        description="false: starts disabled, not polling, until `workers mappings enable`",
    )
    pollers: Annotated[int, Range(1)] = Field(
        default=1, description="Poller processes sharing the group or queue"
    )
    source: Source
    batch_size: Annotated[int, Range(1, 10000)] = Field(
        default=100, description="Most records per invocation"
    )
    maximum_batch_bytes: Annotated[int, Range(1, 64 * 1024 * 1024)] = Field(
        6 * 1024 * 1024, description="Payload cap per invocation (Lambda's is 6 MiB)"
    )
    maximum_batching_window_s: Annotated[float, Range(0, 300)] = Field(
        default=0.5, description="Longest wait to fill a batch"
    )
    parallelization_factor: Annotated[int, Range(1, 100)] = Field(
        default=1, description="Concurrent batches per partition or stream, ordered per key"
    )
    bisect_batch_on_function_error: bool = Field(
        default=False,
        description="Split a failing batch in two and retry each half (Lambda's default: off)",
    )
    maximum_retry_attempts: Annotated[int, Range(-1, 10000)] = Field(
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
    stalled_after_s: Annotated[float, Range(0, 604800, lo_exclusive=True)] = Field(
        default=300,
        description=(
            "A partition, stream or queue whose position has not moved this long while records"
            " wait on it is reported as stalled (log, /status, esm_stalled_units)"
        ),
    )
    scaling_config: ScalingConfig | None = None

    @field_validator("maximum_record_age_s", mode="before")
    @classmethod
    def _no_bool_age(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise here(f"must be an integer (got {show(value)})")
        return value

    @field_validator("maximum_record_age_s")
    @classmethod
    def _record_age(cls, value: int) -> int:
        if value != -1 and not 1 <= value <= 604800:
            raise here(f"must be -1 (no limit) or between 1 and 604800 (got {value})")
        return value

    @model_validator(mode="after")
    def _concurrency_per_poller(self) -> Self:
        scaling = self.scaling_config
        if scaling is not None and scaling.maximum_concurrency < self.pollers:
            raise invalid(
                (
                    ("scaling_config", "maximum_concurrency"),
                    f"must be at least pollers ({self.pollers}): each poller runs at least one"
                    f" batch at a time (got {scaling.maximum_concurrency})",
                )
            )
        return self

    def batches_at_once(self, instance: int) -> int:
        """The most batches poller `instance` may run at once (its share of
        `scaling_config.maximum_concurrency`), or 0 for no bound beyond its lanes."""
        if self.scaling_config is None:
            return 0
        share, left = divmod(self.scaling_config.maximum_concurrency, self.pollers)
        return share + (1 if instance < left else 0)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Self:
        self.source.complete(self.name)
        if self.destination_config is not None:
            problems = self.destination_config.on_failure.complete(self.name, self.source)
            if problems:
                where = ("destination_config", "on_failure")
                raise invalid(*(((*where, *loc), message) for loc, message in problems))
        return self


class MetricsConfig(Model):
    """The Prometheus and health endpoint."""

    host: str = Field(
        default="127.0.0.1", description="Bind address; loopback unless you mean otherwise"
    )
    port: Annotated[int, Range(0, 65535)] | None = Field(
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


class Config(Model):
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
            raise invalid(*problems)
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
        return function.spec(name, self.directory)

    @property
    def directory(self) -> Path:
        """What relative paths in the configuration are relative to: the file's directory."""
        path = Path(self._file)
        return path.parent.resolve() if path.is_file() else Path.cwd()

    def check_handlers(self) -> None:
        """`check_handler` for every function; one ConfigError listing all that fail."""
        problems: list[Problem] = []
        for name, function in self.functions.items():
            try:
                check_handler(function.spec(name, self.directory), self.file)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(self.file, problems)

    def warnings(self) -> list[str]:
        """Legal but probably unintended settings, to show at start-up and by `validate`."""
        # Disabled mappings too: `workers mappings enable` can start them at any time.
        return [w for m in self.event_source_mappings for w in mapping_warnings(m)]


# --------------------------------------------------------------------------------------------
# Loading


def config_from_dict(data: Any, file: str | Path = "<config>") -> Config:
    """Validate already-parsed configuration data (no substitution)."""
    name = str(file)
    if not isinstance(data, dict):
        what = "empty" if data is None else f"{show(data)}, not a mapping"
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
        problems = problems_of(exc, Config)
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
            problem = Problem(render(loc), message)
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
    data, as_written = read_yaml(text, name, environ)
    token = AS_WRITTEN.set(as_written)
    try:
        return config_from_dict(data, name)
    finally:
        AS_WRITTEN.reset(token)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a configuration file; raises ConfigError."""
    text = read_text(path)
    return parse_config(text, path, environ)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (config/schema.json holds a copy)."""
    schema = Config.model_json_schema()
    schema["title"] = "esm-workers configuration"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.app.config")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema")
    args = parser.parse_args(argv)
    if not args.schema:
        parser.print_usage(sys.stderr)
        return 2
    print(json.dumps(json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
