"""Configuration problems and how they read: `FILE: KEY.PATH: what is wrong`, one line each.

pydantic's errors become key paths as users write them (union tags dropped) and plain messages
(an unknown key suggests the one probably meant; a secret's value is never quoted).
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from workers.engine.redact import REDACTED, is_secret_name, redact_text
from workers.engine.settings import Loc, show

__all__ = ["ConfigError", "Problem", "problems_of", "render"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration: where (a key path) and what."""

    path: str  # e.g. "event_source_mappings[0].batch_size"; "" for the file as a whole
    message: str
    file: str = ""  # when not the error's own file (a template's overrides file)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A configuration cannot be used; the message has one `FILE: PATH: problem` line each."""

    def __init__(self, file: str | Path, problems: Sequence[Problem]) -> None:
        self.file = str(file)
        # Whatever a message quotes, a password in it is masked (workers.engine.redact's one rule).
        self.problems = tuple(Problem(p.path, redact_text(p.message), p.file) for p in problems)
        super().__init__(
            "\n".join(f"{problem.file or self.file}: {problem}" for problem in self.problems)
        )

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, tuple[Problem, ...]]]:
        return (type(self), (self.file, self.problems))


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def render(loc: Sequence[str | int]) -> str:
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


def _locate(root: type[BaseModel], loc: Sequence[str | int]) -> _Located:
    """Follow a pydantic error location through the models from `root`, dropping union tags."""
    out: list[str | int] = []
    tp: Any = root
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
    got = f" (got {show(value)})"
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
        return (*at.loc, "type"), f"must be one of {tags} (got {show(ctx.get('tag'))})"
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


def problems_of(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """Each error of validating `root` as a Problem at its key path, with a plain message."""
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "esm_config":
            ctx = error.get("ctx") or {}
            for relative, message in ctx.get("problems") or [((), error["msg"])]:
                problems.append(Problem(render(_locate(root, (*loc, *relative)).loc), message))
            continue
        where, message = _message(error, _locate(root, loc))
        problems.append(Problem(render(where), message))
    return problems
