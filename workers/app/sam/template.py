"""Reading a SAM or CloudFormation template, and the SAM transform.

YAML short-form tags (`!Ref`, `!GetAtt A.B`, `!Sub`, ...) are read by aws-sam-translator's own
constructor (the one `aws cloudformation` uses), on this project's strict loader (duplicate keys
refused, dates kept as text). A SAM template (`Transform: AWS::Serverless-2016-10-31`) is turned
into plain CloudFormation by aws-sam-translator itself, as `sam deploy` does: Globals applied,
each SQS, Kafka or MQ event made an `AWS::Lambda::EventSourceMapping`. Local code directories
(`CodeUri`, `ContentUri`) pass through the transform as placeholders, since it accepts only S3.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.app.config_errors import ConfigError, Problem
from workers.app.config_loading import StrictLoader, parse_yaml, read_text

__all__ = [
    "MAPPING_EVENTS",
    "SAM_TRANSFORM",
    "SamEvent",
    "Transformed",
    "is_template",
    "read_template",
    "transform",
]

SAM_TRANSFORM = "AWS::Serverless-2016-10-31"
# A function's events that SAM turns into event source mappings.
MAPPING_EVENTS = frozenset(
    {"SQS", "SelfManagedKafka", "MSK", "MQ", "Kinesis", "DynamoDB", "DocumentDB"}
)
# A template has these at the top; a mapping file never does.
_TEMPLATE_KEYS = re.compile(
    r"^(?:AWSTemplateFormatVersion|Resources|Transform)[ \t]*:"
    r'|"(?:AWSTemplateFormatVersion|Resources)"\s*:',
    re.MULTILINE,
)
_PLACEHOLDER_BUCKET = "esm-workers-local-code"
_EXTRA = (
    "reading a SAM or CloudFormation template needs the `sam` extra: pip install 'esm-workers[sam]'"
)


def is_template(text: str) -> bool:
    """Whether configuration text is a SAM or CloudFormation template rather than a mapping file."""
    return _TEMPLATE_KEYS.search(text) is not None


class _TemplateLoader(StrictLoader):
    """The strict loader plus CloudFormation's short-form tags."""


def _loader() -> type[_TemplateLoader]:
    if "!" not in _TemplateLoader.yaml_multi_constructors:
        try:
            from samtranslator.yaml_helper import intrinsics_multi_constructor
        except ImportError:
            raise ConfigError("<template>", [Problem("", _EXTRA)]) from None
        _TemplateLoader.add_multi_constructor("!", intrinsics_multi_constructor)
    return _TemplateLoader


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_template(path: str | Path) -> dict[str, Any]:
    """The template's data, `!Tag` forms as their `Fn::` mappings; raises ConfigError."""
    name = str(path)
    text = read_text(path)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            raise ConfigError(name, [Problem("", f"invalid JSON: {exc}")]) from None
    else:
        try:
            data = parse_yaml(text, name, _loader())
        except ConfigError as exc:
            raise ConfigError(name, exc.problems) from None
    if not isinstance(data, dict) or not isinstance(data.get("Resources"), dict):
        raise ConfigError(name, [Problem("Resources", "a template needs a Resources mapping")])
    return data


@dataclass(frozen=True)
class SamEvent:
    """A function's event that the SAM transform made a mapping resource."""

    name: str  # the mapping's name: <Function>-<Event>
    where: str  # the path of its Properties in the template
    type: str  # SQS, SelfManagedKafka, MSK, MQ, ...


@dataclass
class Transformed:
    """A template as plain CloudFormation, and what the SAM transform does not keep."""

    template: dict[str, Any]
    # (local directory, where the template names it) by the placeholder key standing for it in
    # Code / Content.
    local_code: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The events the transform made mapping resources, by the logical id it gave them.
    events: dict[str, SamEvent] = field(default_factory=dict)
    # (function, event name, event type) of events that are not event source mappings.
    other_events: list[tuple[str, str, str]] = field(default_factory=list)
    # Logical id -> properties of each function as written (Globals applied), to list ignored ones.
    written_functions: dict[str, dict[str, Any]] = field(default_factory=dict)


def transforms_of(template: dict[str, Any]) -> list[str]:
    declared = template.get("Transform") or []
    return [declared] if isinstance(declared, str) else [t for t in declared if isinstance(t, str)]


def _is_local(uri: Any) -> bool:
    return isinstance(uri, str) and not uri.startswith("s3://")


def _placeholders(template: dict[str, Any], out: Transformed) -> None:
    """Local CodeUri / ContentUri -> s3:// placeholders the transform accepts; noted in `out`."""

    def hold(properties: dict[str, Any], key: str, where: str) -> None:
        if _is_local(properties.get(key)):
            token = str(len(out.local_code))
            out.local_code[token] = (properties[key], f"{where}.{key}")
            properties[key] = f"s3://{_PLACEHOLDER_BUCKET}/{token}"

    globals_ = template.get("Globals")
    if isinstance(globals_, dict) and isinstance(globals_.get("Function"), dict):
        hold(globals_["Function"], "CodeUri", "Globals.Function")
    for logical_id, resource in template["Resources"].items():
        if not isinstance(resource, dict) or not isinstance(resource.get("Properties"), dict):
            continue
        where = f"Resources.{logical_id}.Properties"
        if resource.get("Type") == "AWS::Serverless::Function":
            hold(resource["Properties"], "CodeUri", where)
        elif resource.get("Type") == "AWS::Serverless::LayerVersion":
            hold(resource["Properties"], "ContentUri", where)


def local_code_key(code: Any) -> str | None:
    """The placeholder key of transformed `Code` / `Content`, if it stands for a directory."""
    if isinstance(code, dict) and code.get("S3Bucket") == _PLACEHOLDER_BUCKET:
        key = code.get("S3Key")
        return key if isinstance(key, str) else None
    return None


def _events(template: dict[str, Any], out: Transformed) -> None:
    function_globals = (template.get("Globals") or {}).get("Function") or {}
    for logical_id, resource in template["Resources"].items():
        if not isinstance(resource, dict):
            continue
        if resource.get("Type") == "AWS::Serverless::Function":
            properties = resource.get("Properties") or {}
            out.written_functions[logical_id] = {**function_globals, **properties}
            events = properties.get("Events") or {}
            for event, spec in events.items() if isinstance(events, dict) else ():
                kind = spec.get("Type") if isinstance(spec, dict) else None
                if kind in MAPPING_EVENTS:
                    # The transform names the mapping it makes <Function><Event>.
                    out.events[logical_id + event] = SamEvent(
                        f"{logical_id}-{event}",
                        f"Resources.{logical_id}.Properties.Events.{event}.Properties",
                        str(kind),
                    )
                else:
                    out.other_events.append((logical_id, event, str(kind)))
        elif resource.get("Type") == "AWS::Lambda::Function":
            out.written_functions[logical_id] = dict(resource.get("Properties") or {})


def transform(
    template: dict[str, Any], parameters: dict[str, Any], region: str, file: str
) -> Transformed:
    """The template as plain CloudFormation (the SAM transform applied when it declares it)."""
    declared = transforms_of(template)
    unsupported = [t for t in declared if t != SAM_TRANSFORM]
    if unsupported:
        raise ConfigError(
            file,
            [
                Problem(
                    "Transform",
                    f"{', '.join(unsupported)} cannot be applied here (only {SAM_TRANSFORM} is)",
                )
            ],
        )
    source = copy.deepcopy(template)
    out = Transformed(template=source)
    _events(source, out)
    if not declared:
        serverless = [
            logical_id
            for logical_id, resource in source["Resources"].items()
            if isinstance(resource, dict)
            and str(resource.get("Type", "")).startswith("AWS::Serverless::")
        ]
        if serverless:
            raise ConfigError(
                file,
                [
                    Problem(
                        f"Resources.{logical_id}.Type",
                        f"a SAM resource needs `Transform: {SAM_TRANSFORM}` in the template",
                    )
                    for logical_id in serverless
                ],
            )
        return out
    _placeholders(source, out)
    # Nested applications are fetched from the Serverless Application Repository: not here.
    for logical_id, resource in list(source["Resources"].items()):
        if isinstance(resource, dict) and resource.get("Type") == "AWS::Serverless::Application":
            del source["Resources"][logical_id]
    try:
        import boto3
        from samtranslator.metrics.metrics import DummyMetricsPublisher, Metrics
        from samtranslator.model.exceptions import InvalidDocumentException
        from samtranslator.parser.parser import Parser
        from samtranslator.translator.translator import Translator
    except ImportError:
        raise ConfigError(file, [Problem("", _EXTRA)]) from None
    # The transform's metrics stay here (it would print a notice about them otherwise).
    metrics = Metrics("ServerlessTransform", DummyMetricsPublisher())
    translator = Translator(
        None, Parser(), boto_session=boto3.session.Session(region_name=region), metrics=metrics
    )
    try:
        out.template = translator.translate(
            source, parameter_values=dict(parameters), get_managed_policy_map=dict
        )
    except InvalidDocumentException as exc:
        raise ConfigError(
            file, [Problem("", f"SAM transform: {cause.message}") for cause in exc.causes]
        ) from None
    finally:
        metrics.publish()
    return out
