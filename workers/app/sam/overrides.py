"""The overrides file: where a template's sources and destinations live here.

```yaml
parameters: {KafkaBootstrap: 127.0.0.1:9092}          # template parameter values
sources:                                              # keyed by what the template names:
  OrdersQueue: {queue_url: http://..., endpoint_url: http://...}   # a logical id,
  KafkaBootstrap: {client_config: {session.timeout.ms: 6000}}      # a parameter name,
  "arn:aws:mq:...:broker:orders:b-1": {url: "amqp://${MQ_USER}:${MQ_PASSWORD}@..."}  # an ARN
destinations:
  FailuresQueue: {type: file, path: ./dead-letters}
functions:
  OrdersFunction: {isolation: thread}
```

`${VAR}` works as in a mapping file. Each entry must be used by the template: one that names
nothing the template has is an error (a typo would otherwise go unnoticed).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.app.config_errors import ConfigError, Problem
from workers.app.config_loading import parse_yaml, read_text, substitute

__all__ = ["SECTIONS", "Overrides", "read_overrides"]

SECTIONS = ("parameters", "sources", "destinations", "functions")


@dataclass
class Overrides:
    """An overrides file's sections; `raw` keeps `${VAR}` as written (for `workers sam convert`)."""

    file: str = "<overrides>"
    parameters: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each substituted string -> as written, for error messages.
    as_written: dict[str, str] = field(default_factory=dict)
    _used: set[tuple[str, str]] = field(default_factory=set)

    def entry(self, section: str, keys: list[str]) -> tuple[str, dict[str, Any]] | None:
        """The first of `keys` that `section` has, with its entry (noted as used)."""
        entries: dict[str, dict[str, Any]] = getattr(self, section)
        for key in keys:
            if key in entries:
                self._used.add((section, key))
                return key, entries[key]
        return None

    def use(self, section: str, key: str) -> None:
        self._used.add((section, key))

    def unused(self, names: Mapping[str, list[str]]) -> list[Problem]:
        """Entries no part of the template asked for; `names` lists what each section could be
        keyed by, for the message."""
        problems = []
        for section in ("sources", "destinations", "functions"):
            known = names.get(section, [])
            for key in getattr(self, section):
                if (section, key) in self._used:
                    continue
                close = difflib.get_close_matches(key, known, n=1)
                hint = (
                    f" (did you mean {close[0]!r}?)"
                    if close
                    else f" (it names: {', '.join(known)})"
                    if known
                    else ""
                )
                problems.append(
                    Problem(
                        f"{section}.{key}",
                        f"the template has no {section[:-1]} named {key!r}{hint}",
                        self.file,
                    )
                )
        return problems


def read_overrides(
    path: str | Path | None, *, substituted: bool, environ: Mapping[str, str] | None = None
) -> Overrides:
    """Read an overrides file (none: empty overrides). `substituted`: `${VAR}` replaced from
    the environment (to run), or kept as written (to print a mapping file); parameters are
    always substituted, since the template's values are computed from them."""
    if path is None:
        return Overrides()
    name = str(path)
    text = read_text(path)
    data = parse_yaml(text, name)
    if data is None:
        return Overrides(file=name)
    if not isinstance(data, dict):
        raise ConfigError(name, [Problem("", f"must be a mapping of {', '.join(SECTIONS)}")])
    problems = []
    for key in data:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), SECTIONS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(SECTIONS)}"
            problems.append(Problem(str(key), f"unknown key ({hint})"))
    sections: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        value = data.get(section) or {}
        if not isinstance(value, dict):
            problems.append(Problem(section, "must be a mapping"))
            continue
        for key, entry in value.items():
            if section != "parameters" and not isinstance(entry, dict):
                problems.append(Problem(f"{section}.{key}", "must be a mapping of settings"))
        sections[section] = {str(k): v for k, v in value.items()}
    if problems:
        raise ConfigError(name, problems)
    parameters, as_written = substitute(sections["parameters"], name, environ)
    rest: dict[str, dict[str, Any]] = {s: sections[s] for s in SECTIONS[1:]}
    if substituted:
        rest, more = substitute(rest, name, environ)
        as_written.update(more)
    return Overrides(
        file=name,
        parameters={k: _parameter_value(v) for k, v in parameters.items()},
        sources=rest["sources"],
        destinations=rest["destinations"],
        functions=rest["functions"],
        as_written=as_written,
    )


def _parameter_value(value: Any) -> Any:
    # A list parameter may be given as a YAML list; CloudFormation takes it comma-separated.
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value
