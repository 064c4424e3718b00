"""Reading a configuration file: YAML (duplicate keys refused) and `${VAR}` substitution.

What comes out is plain data for the models in `workers.app.config` to validate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from workers.app.config_errors import ConfigError, Problem, render
from workers.engine.settings import Loc

__all__ = ["StrictLoader", "parse_yaml", "read_yaml", "substitute"]


class StrictLoader(yaml.SafeLoader):
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
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_text(path: str | Path) -> str:
    """A configuration file's text; raises ConfigError naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), [Problem("", f"cannot read the file: {reason}")]) from None


def parse_yaml(text: str, file: str, loader: type[StrictLoader] = StrictLoader) -> Any:
    """The data in YAML text (no substitution); raises ConfigError naming `file`."""
    try:
        return yaml.load(text, Loader=loader)
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


def read_yaml(
    text: str, file: str, environ: Mapping[str, str] | None = None
) -> tuple[Any, dict[str, str]]:
    """The data in YAML text with `${VAR}` substituted from `environ` (default: os.environ), and
    each substituted string -> as written in the file; raises ConfigError naming `file`."""
    return substitute(parse_yaml(text, file), file, environ)


def substitute(
    data: Any, file: str, environ: Mapping[str, str] | None = None
) -> tuple[Any, dict[str, str]]:
    """`data` with `${VAR}` substituted from `environ` (default: os.environ), and each substituted
    string -> as written; raises ConfigError naming `file`."""
    problems: list[tuple[Loc, str]] = []
    as_written: dict[str, str] = {}
    data = _substitute(data, os.environ if environ is None else environ, (), problems, as_written)
    if problems:
        raise ConfigError(file, [Problem(render(loc), message) for loc, message in problems])
    return data, as_written
