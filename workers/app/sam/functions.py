"""A template's Lambda functions as functions of the native format.

Read: `Handler`, the code (`CodeUri`, or `Code` as a local directory the way `aws cloudformation
package` takes it), `Timeout`, `MemorySize`, `Environment`, `ReservedConcurrentExecutions` and
`Layers` (local `AWS::Serverless::LayerVersion` / `AWS::Lambda::LayerVersion` content, with
Lambda's `python/` layout). The code and layer directories become the function's `code_paths`,
relative to the template's directory. Other properties (`Role`, `Policies`, `Architectures`,
`Tracing`, ...) mean nothing here and are listed as ignored.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.app.sam.intrinsics import Resolver, TemplateError
from workers.app.sam.overrides import Overrides
from workers.app.sam.template import Transformed, local_code_key

__all__ = ["FunctionDraft", "read_functions"]

# Properties read here (the rest are listed as ignored); Events are the mappings' business.
_READ = {
    "Handler",
    "CodeUri",
    "Code",
    "Runtime",
    "Timeout",
    "MemorySize",
    "Environment",
    "ReservedConcurrentExecutions",
    "Layers",
    "Events",
    "FunctionName",
    "Description",
    "PackageType",
}
# Lambda's defaults where they differ from the native format's.
_LAMBDA_TIMEOUT_S = 3
_LAMBDA_MEMORY_MB = 128


@dataclass
class FunctionDraft:
    logical_id: str
    config: dict[str, Any]
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)
    throttled: bool = False  # ReservedConcurrentExecutions 0: Lambda never invokes it


@dataclass
class Functions:
    drafts: dict[str, FunctionDraft] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Names a mapping's FunctionName may use (physical name, logical id) -> logical id.
    names: dict[str, str] = field(default_factory=dict)


def _layer_paths(directory: Path, relative: str) -> list[str]:
    """What Lambda puts on the path from a layer: /opt/python/lib/pythonX.Y/site-packages and
    /opt/python; a layer without `python/` (not built by `sam build` yet) as it is."""
    if not (directory / "python").is_dir():
        return [relative]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path("python", "lib", version, "site-packages")
    paths = [str(Path(relative) / site)] if (directory / site).is_dir() else []
    return [*paths, str(Path(relative) / "python")]


class _Reader:
    def __init__(
        self, resolver: Resolver, transformed: Transformed, overrides: Overrides, base: Path
    ) -> None:
        self.r = resolver
        self.t = transformed
        self.o = overrides
        self.base = base
        self.out = Functions()

    def written(self, logical_id: str, key: str) -> str:
        """Where the template writes a function's property (the SAM name for its code)."""
        if key == "Code" and "CodeUri" in self.t.written_functions.get(logical_id, {}):
            key = "CodeUri"
        return f"Resources.{logical_id}.Properties.{key}"

    def directory(self, code: Any, where: str) -> str | None:
        """A local code directory (relative to the template's), None for code elsewhere."""
        key = local_code_key(code)
        written = None
        if key is not None and key in self.t.local_code:
            written, where = self.t.local_code[key]
        elif isinstance(code, str):
            written = code  # `aws cloudformation package` style: Code: ./src
        if written is None:
            return None
        path = self.base / written
        if not path.is_dir():
            # Said where the template names the directory (a SAM CodeUri, Globals, a layer).
            raise TemplateError(
                tuple(where.split(".")), f"no directory {written!r} beside the template"
            )
        return str(Path(written))

    def read(self) -> Functions:
        for logical_id in self.r.resources.of_type("AWS::Lambda::Function"):
            physical = self.r.resources.name(logical_id)
            self.out.names.setdefault(physical, logical_id)
            self.out.names[logical_id] = logical_id
            self._function(logical_id)
        return self.out

    def _function(self, logical_id: str) -> None:
        resources = self.r.resources
        raw = resources.properties(logical_id)
        written = self.t.written_functions.get(logical_id, raw)
        ignored = sorted(k for k in written if k not in _READ)
        if ignored:
            self.out.ignored.append(f"{logical_id}: {', '.join(ignored)}")
        if str(resources.prop(logical_id, "PackageType", "Zip")) == "Image":
            self.out.skipped.append(f"{logical_id}: a container image function cannot run here")
            return
        runtime = str(resources.prop(logical_id, "Runtime", "python"))
        if not runtime.startswith("python"):
            self.out.skipped.append(f"{logical_id}: runtime {runtime} cannot run here (Python)")
            return
        if "Handler" not in raw:
            raise TemplateError(resources.loc(logical_id), "Handler is required")
        config: dict[str, Any] = {
            "handler": self.r.text(raw["Handler"], resources.loc(logical_id, "Handler")),
            "timeout_s": resources.prop(logical_id, "Timeout", _LAMBDA_TIMEOUT_S),
            "memory_mb": resources.prop(logical_id, "MemorySize", _LAMBDA_MEMORY_MB),
        }
        draft = FunctionDraft(logical_id, config)
        for native, cfn in (
            ("handler", "Handler"),
            ("timeout_s", "Timeout"),
            ("memory_mb", "MemorySize"),
            ("environment", "Environment"),
            ("concurrency", "ReservedConcurrentExecutions"),
            ("code_paths", "Code"),
        ):
            draft.origins[native] = ("", self.written(logical_id, cfn))
        environment = resources.prop(logical_id, "Environment") or {}
        variables = environment.get("Variables") if isinstance(environment, dict) else None
        if isinstance(variables, dict) and variables:
            config["environment"] = {str(k): self._text(v) for k, v in variables.items()}
        reserved = resources.prop(logical_id, "ReservedConcurrentExecutions")
        if reserved is not None:
            if str(reserved) == "0":
                draft.throttled = True
                self.out.notes.append(
                    f"{logical_id}: ReservedConcurrentExecutions 0 (never invoked on Lambda):"
                    " its mappings are disabled"
                )
            else:
                config["concurrency"] = reserved
        paths = self._code(logical_id, raw) + self._layers(logical_id, raw)
        if paths:
            config["code_paths"] = paths
        found = self.o.entry("functions", [logical_id])
        if found is not None:
            key, entry = found
            for setting, value in entry.items():
                if setting == "environment" and isinstance(value, dict):
                    config["environment"] = {**config.get("environment", {}), **value}
                else:
                    config[setting] = value
                draft.origins[setting] = (self.o.file, f"functions.{key}.{setting}")
        self.out.drafts[logical_id] = draft

    def _text(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    def _code(self, logical_id: str, raw: Mapping[str, Any]) -> list[str]:
        code = raw.get("Code")
        if isinstance(code, dict) and "ZipFile" in code:
            inline = "InlineCode" in self.t.written_functions.get(logical_id, {})
            where = self.written(logical_id, "InlineCode" if inline else "Code")
            raise TemplateError(
                tuple(where.split(".")),
                "inline code cannot run here: put it in a directory (CodeUri)",
            )
        directory = self.directory(code, self.written(logical_id, "Code"))
        if directory is None:
            self.out.notes.append(
                f"{logical_id}: its code is in S3: the handler is imported from the working"
                " directory"
            )
            return []
        return [directory]

    def _layers(self, logical_id: str, raw: Mapping[str, Any]) -> list[str]:
        written = raw.get("Layers") or []
        paths: list[str] = []
        for index, layer in enumerate(written if isinstance(written, list) else []):
            loc = self.r.resources.loc(logical_id, "Layers", index)
            origin = self.r.origin(layer, loc)
            if (
                origin is not None
                and origin.kind == "resource"
                and self.r.resources.type_of(origin.name) == "AWS::Lambda::LayerVersion"
            ):
                content = self.r.resources.properties(origin.name).get("Content")
                where = f"Resources.{origin.name}.Properties.Content"
                directory = self.directory(content, where)
                if directory is not None:
                    paths += _layer_paths(self.base / directory, directory)
                    continue
            named = self.r.text(layer, loc)
            self.out.notes.append(
                f"{logical_id}: layer {named} is not here: install what it provides in the"
                " environment `workers` runs in"
            )
        return paths


def read_functions(
    resolver: Resolver, transformed: Transformed, overrides: Overrides, base: Path
) -> Functions:
    """Every Python function of the template that exists (its Condition holds); `base` is the
    template's directory."""
    return _Reader(resolver, transformed, overrides, base).read()
