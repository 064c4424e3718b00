"""A SAM or CloudFormation template, with its overrides file, as a native configuration.

`load_template` is what `workers run|validate|invoke|dlq TEMPLATE --overrides FILE` use;
`convert` + `render` are `workers sam convert`. Problems name the file and the key path they
come from: the template (`Resources.OrdersFunction.Properties.Events.Sqs.Properties.BatchSize`)
or the overrides file (`sources.OrdersQueue.queue_url`), all of them at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workers.app.config import Config, config_from_dict
from workers.app.config_errors import ConfigError, Problem, render
from workers.app.sam.functions import Functions, read_functions
from workers.app.sam.intrinsics import DEFAULT_PSEUDO, Resolver, TemplateError
from workers.app.sam.mappings import Draft, Skipped, read_mapping, written_path
from workers.app.sam.overrides import Overrides, read_overrides
from workers.app.sam.template import Transformed, read_template, transform
from workers.engine.settings import AS_WRITTEN

__all__ = ["Conversion", "Notes", "convert", "load_template", "render_yaml"]


@dataclass
class Notes:
    """What the template has that does not run here, said once at start-up."""

    file: str = ""
    not_mappings: list[str] = field(default_factory=list)  # Api, Schedule, S3 events...
    skipped: list[str] = field(default_factory=list)  # mappings and functions that cannot run
    ignored: list[str] = field(default_factory=list)  # properties with no meaning here
    not_applied: list[str] = field(default_factory=list)  # mapping properties not carried over
    access: list[str] = field(default_factory=list)  # SourceAccessConfigurations, per mapping
    other: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """What runs differently than on AWS: events and mappings left out, settings not
        applied."""
        out = []
        if self.not_mappings:
            out.append(
                f"{self.file}: events that are not event source mappings, left alone: "
                + ", ".join(self.not_mappings)
            )
        if self.skipped:
            out.append(f"{self.file}: skipped, cannot run here: " + "; ".join(self.skipped))
        if self.not_applied:
            out.append(f"{self.file}: not applied here: " + "; ".join(self.not_applied))
        return out

    def infos(self) -> list[str]:
        """What was read as expected, worth saying once: properties ignored, settings derived."""
        out = []
        if self.ignored:
            out.append(f"{self.file}: ignored, no meaning here: " + "; ".join(self.ignored))
        return out + [f"{self.file}: {note}" for note in self.other]

    def lines(self) -> list[str]:
        return self.warnings() + self.infos()


@dataclass
class Conversion:
    data: dict[str, Any]
    notes: Notes
    file: str
    as_written: dict[str, str] = field(default_factory=dict)
    drafts: list[Draft] = field(default_factory=list)
    functions: Functions = field(default_factory=Functions)


def _written(loc: tuple[str | int, ...], events: Transformed) -> str:
    """A resolver location as the template writes it (a SAM event for the mappings the
    transform made)."""
    if len(loc) >= 3 and loc[0] == "Resources" and loc[1] in events.events:
        event = events.events[str(loc[1])]
        return written_path(event.where, tuple(loc[3:]), event.type)
    return render(loc)


def _parameter_problems(template: dict[str, Any], overrides: Overrides) -> list[Problem]:
    declared = template.get("Parameters") or {}
    return [
        Problem(
            f"parameters.{name}",
            "the template has no such parameter"
            + (f" (it has: {', '.join(declared)})" if declared else ""),
            overrides.file,
        )
        for name in overrides.parameters
        if name not in declared and name not in DEFAULT_PSEUDO
    ]


def convert(
    template_path: str | Path,
    overrides_path: str | Path | None = None,
    *,
    substituted: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Conversion:
    """The template's functions and mappings as native configuration data (not yet validated).

    `substituted`: `${VAR}` in the overrides replaced from the environment (to run), or kept
    (to print a mapping file that substitutes them itself)."""
    file = str(template_path)
    template = read_template(template_path)
    overrides = read_overrides(overrides_path, substituted=substituted, environ=environ)
    problems = _parameter_problems(template, overrides)
    region = str(overrides.parameters.get("AWS::Region", DEFAULT_PSEUDO["AWS::Region"]))
    transformed = transform(template, overrides.parameters, region, file)
    resolver = Resolver(transformed.template, overrides.parameters)
    notes = Notes(file=file)
    notes.not_mappings = [f"{f}.{e} ({t})" for f, e, t in transformed.other_events]
    if "Outputs" in template:
        notes.ignored.append("Outputs")
    base = Path(template_path).resolve().parent
    try:
        functions = read_functions(resolver, transformed, overrides, base)
    except TemplateError as exc:
        problem = Problem(_written(exc.loc, transformed), exc.message)
        raise ConfigError(file, [*problems, problem]) from None
    notes.skipped += functions.skipped
    notes.ignored = functions.ignored + notes.ignored
    notes.other += functions.notes
    drafts: list[Draft] = []
    for logical_id in resolver.resources.of_type("AWS::Lambda::EventSourceMapping"):
        event = transformed.events.get(logical_id)
        name = event.name if event else logical_id
        where = event.where if event else f"Resources.{logical_id}.Properties"
        try:
            read = read_mapping(
                resolver,
                overrides,
                logical_id,
                name=name,
                where=where,
                event_type=event.type if event else "",
                functions=functions.names,
            )
        except TemplateError as exc:
            problems.append(Problem(_written(exc.loc, transformed), exc.message))
            continue
        if isinstance(read, Skipped):
            notes.skipped.append(f"{read.name} ({read.reason})")
        elif read.function not in functions.drafts:
            notes.skipped.append(f"{read.name} (its function {read.function} cannot run here)")
        else:
            if functions.drafts[read.function].throttled:
                read.mapping["enabled"] = False
            drafts.append(read)
            if read.not_applied:
                notes.not_applied.append(f"{read.name}: {', '.join(read.not_applied)}")
            if read.access:
                notes.access.append(
                    f"{read.name}: the template's SourceAccessConfigurations are"
                    f" {', '.join(read.access)}: here, credentials come through ${{VAR}} in"
                    " its entry of the overrides file"
                )
            notes.other += read.notes
    problems += overrides.unused(_names(resolver, functions, drafts))
    if problems:
        raise ConfigError(file, problems)
    if not drafts:
        skipped = f" (skipped: {'; '.join(notes.skipped)})" if notes.skipped else ""
        raise ConfigError(
            file,
            [Problem("Resources", f"no event source mapping of the template runs here{skipped}")],
        )
    data: dict[str, Any] = {
        "functions": {i: d.config for i, d in functions.drafts.items()},
        "event_source_mappings": [d.mapping for d in drafts],
    }
    return Conversion(data, notes, file, overrides.as_written, drafts, functions)


def _names(resolver: Resolver, functions: Functions, drafts: list[Draft]) -> dict[str, list[str]]:
    """What each overrides section may be keyed by, for the message about an unused entry."""
    resources = [
        i
        for i in resolver.resources
        if resolver.resources.type_of(i)
        in ("AWS::SQS::Queue", "AWS::MSK::Cluster", "AWS::AmazonMQ::Broker", "AWS::SNS::Topic")
    ]
    return {
        "sources": [d.name for d in drafts] + resources + list(resolver.declared),
        "destinations": resources + list(resolver.declared),
        "functions": list(functions.drafts),
    }


_MAPPING_PATH = re.compile(r"event_source_mappings\[(\d+)\](?:\.(.*))?")
_FUNCTION_PATH = re.compile(r"functions\.([A-Za-z0-9_.-]+?)(?:\.(.*))?")


def _locate(rest: str, origins: dict[str, tuple[str, str]], fallback: str) -> tuple[str, str, str]:
    """(file, path, what is left of the native key) for a native key path."""
    parts = rest.split(".")
    for cut in range(len(parts), 0, -1):
        key = ".".join(parts[:cut])
        if key in origins:
            file, path = origins[key]
            return file, ".".join([path, *parts[cut:]]), ""
    return "", fallback, rest


def _origin_problems(exc: ConfigError, conversion: Conversion) -> list[Problem]:
    """Problems of the native configuration at the template's or the overrides' key paths."""
    out = []
    for problem in exc.problems:
        file, path, native = "", problem.path, ""
        found = _MAPPING_PATH.fullmatch(problem.path)
        named = _FUNCTION_PATH.fullmatch(problem.path)
        if found and int(found.group(1)) < len(conversion.drafts):
            draft = conversion.drafts[int(found.group(1))]
            file, path, native = _locate(found.group(2) or "", draft.origins, draft.where)
        elif named and named.group(1) in conversion.functions.drafts:
            draft_f = conversion.functions.drafts[named.group(1)]
            where = f"Resources.{draft_f.logical_id}.Properties"
            file, path, native = _locate(named.group(2) or "", draft_f.origins, where)
        message = f"{native}: {problem.message}" if native else problem.message
        out.append(Problem(path, message, file if file != conversion.file else ""))
    return out


def load_template(
    template_path: str | Path,
    overrides_path: str | Path | None = None,
    *,
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, Notes]:
    """The template as a validated configuration, and what it has that does not run here.

    `strict`: events that are not mappings and mappings that cannot run are errors."""
    conversion = convert(template_path, overrides_path, environ=environ)
    notes = conversion.notes
    if strict and (notes.not_mappings or notes.skipped):
        problems = [
            Problem("", f"--strict: not an event source mapping: {event}")
            for event in notes.not_mappings
        ] + [Problem("", f"--strict: cannot run here: {what}") for what in notes.skipped]
        raise ConfigError(conversion.file, problems)
    token = AS_WRITTEN.set(conversion.as_written)
    try:
        config = config_from_dict(conversion.data, conversion.file)
    except ConfigError as exc:
        raise ConfigError(conversion.file, _origin_problems(exc, conversion)) from None
    finally:
        AS_WRITTEN.reset(token)
    return config, notes


def _escaped(node: Any, keep: set[str], path: str = "") -> Any:
    """Template values with `${` written `$${`, so that the mapping file's own substitution
    leaves them as they are; values from the overrides file (`keep`) stay as written."""
    if path in keep:
        return node
    if isinstance(node, dict):
        return {k: _escaped(v, keep, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_escaped(v, keep, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        return node.replace("${", "$${")
    return node


def render_yaml(conversion: Conversion) -> str:
    """The mapping file `workers sam convert` prints (overrides' `${VAR}` kept as written)."""
    keep = set()
    for index, draft in enumerate(conversion.drafts):
        keep |= {
            f"event_source_mappings[{index}].{key}"
            for key, (file, _) in draft.origins.items()
            if file
        }
    for name, function in conversion.functions.drafts.items():
        keep |= {f"functions.{name}.{key}" for key, (file, _) in function.origins.items() if file}
    data = _escaped(conversion.data, keep)
    lines = [f"# Converted from {conversion.file} by `workers sam convert`."]
    lines += [f"# {line}" for line in conversion.notes.lines()]
    lines += [f"# {line}" for line in conversion.notes.access]
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(lines) + "\n" + body
