"""CloudFormation's intrinsic functions and conditions, evaluated as a stack would see them here.

aws-sam-translator only inlines parameter references in place; it does not evaluate `Fn::If`,
conditions, `Fn::Join` or `Fn::GetAtt` of plain resources, so the evaluation is here: `Ref`,
`Fn::GetAtt`, `Fn::Sub`, `Fn::Join`, `Fn::Select`, `Fn::Split`, `Fn::FindInMap`, `Fn::If`
with `Conditions` (`Fn::Equals`, `Fn::And`, `Fn::Or`, `Fn::Not`, `Condition`), `Fn::Base64`,
`Fn::GetAZs` and `AWS::NoValue`. Parameters take the overrides file's values, else their
`Default`. What a resource's `Ref` or attribute would be on AWS (its ARN, its name) comes from
`workers.app.sam.resources`. Only the values a mapping needs are evaluated, so an intrinsic this
cannot resolve elsewhere in the template (an `Fn::ImportValue` in an API) does not matter.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workers.app.sam.resources import Resources
from workers.engine.settings import Loc

__all__ = ["NO_VALUE", "Origin", "Resolver", "TemplateError"]


class TemplateError(Exception):
    """A value of the template cannot be evaluated: where (a key path) and why."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()

FUNCTIONS = frozenset(
    {
        "Ref",
        "Fn::GetAtt",
        "Fn::Sub",
        "Fn::Join",
        "Fn::Select",
        "Fn::Split",
        "Fn::FindInMap",
        "Fn::If",
        "Fn::Base64",
        "Fn::GetAZs",
        "Fn::ImportValue",
        "Fn::Cidr",
        "Fn::Length",
        "Fn::ToJsonString",
        "Fn::Transform",
    }
)
_SUB = re.compile(r"\$\{([^}]*)\}")
DEFAULT_PSEUDO = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "local",
    "AWS::NotificationARNs": [],
}


def function_of(node: Any) -> tuple[str, Any] | None:
    """(name, argument) when `node` is an intrinsic function call."""
    if isinstance(node, dict) and len(node) == 1:
        ((key, value),) = node.items()
        if key in FUNCTIONS:
            return key, value
    return None


@dataclass(frozen=True)
class Origin:
    """What a value of the template names: a resource (by logical id) or a parameter."""

    kind: str  # "resource" | "parameter"
    name: str


class Resolver:
    """Evaluates values of one template with given parameter values."""

    def __init__(
        self,
        template: Mapping[str, Any],
        parameters: Mapping[str, Any],
    ) -> None:
        self.template = template
        declared = template.get("Parameters") or {}
        self.declared: dict[str, Any] = dict(declared) if isinstance(declared, dict) else {}
        self.given = {k: v for k, v in parameters.items() if not k.startswith("AWS::")}
        self.pseudo = {
            **DEFAULT_PSEUDO,
            **{k: v for k, v in parameters.items() if k in DEFAULT_PSEUDO},
        }
        if "AWS::StackId" not in self.pseudo:
            self.pseudo["AWS::StackId"] = (
                f"arn:{self.pseudo['AWS::Partition']}:cloudformation:{self.pseudo['AWS::Region']}:"
                f"{self.pseudo['AWS::AccountId']}:stack/{self.pseudo['AWS::StackName']}/local"
            )
        conditions = template.get("Conditions") or {}
        self.conditions: dict[str, Any] = dict(conditions) if isinstance(conditions, dict) else {}
        mappings = template.get("Mappings") or {}
        self.mappings: dict[str, Any] = dict(mappings) if isinstance(mappings, dict) else {}
        self._decided: dict[str, bool] = {}
        self._deciding: set[str] = set()
        self.resources = Resources(template.get("Resources") or {}, self)

    @property
    def region(self) -> str:
        return str(self.pseudo["AWS::Region"])

    @property
    def account(self) -> str:
        return str(self.pseudo["AWS::AccountId"])

    @property
    def partition(self) -> str:
        return str(self.pseudo["AWS::Partition"])

    # --- values ----------------------------------------------------------------------------------

    def value(self, node: Any, loc: Loc) -> Any:
        """`node` with every intrinsic function evaluated (NO_VALUE when it is AWS::NoValue)."""
        call = function_of(node)
        if call is not None:
            return self._call(call[0], call[1], (*loc, call[0]))
        if isinstance(node, dict):
            out = {}
            for key, item in node.items():
                resolved = self.value(item, (*loc, key))
                if resolved is not NO_VALUE:
                    out[key] = resolved
            return out
        if isinstance(node, list):
            items = [self.value(item, (*loc, i)) for i, item in enumerate(node)]
            return [item for item in items if item is not NO_VALUE]
        return node

    def text(self, node: Any, loc: Loc) -> str:
        """A value that must come out as a string (numbers and booleans as CloudFormation
        writes them)."""
        value = self.value(node, loc)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float | str):
            return str(value)
        raise TemplateError(loc, f"must be a string (it is {_kind(value)})")

    def reduce(self, node: Any, loc: Loc) -> Any:
        """`node` with its outer `Fn::If`s decided, the rest as written (to see what it names)."""
        call = function_of(node)
        while call is not None and call[0] == "Fn::If":
            node = self._if(call[1], (*loc, "Fn::If"), evaluate=False)
            call = function_of(node)
        return node

    def origin(self, node: Any, loc: Loc) -> Origin | None:
        """The resource or parameter a value names: `Ref X`, `Fn::GetAtt [X, ...]`, or a
        `Fn::Sub` that is one `${X}` / `${X.Attribute}`."""
        node = self.reduce(node, loc)
        call = function_of(node)
        if call is None:
            return None
        name, arg = call
        target: str | None = None
        if name == "Ref" and isinstance(arg, str):
            target = arg
        elif name == "Fn::GetAtt":
            parts = arg.split(".", 1) if isinstance(arg, str) else arg
            if isinstance(parts, list) and parts and isinstance(parts[0], str):
                target = parts[0]
        elif name == "Fn::Sub" and isinstance(arg, str):
            found = _SUB.fullmatch(arg)
            if found is not None:
                target = found.group(1).split(".", 1)[0]
        if target is None or target.startswith("AWS::"):
            return None
        if target in self.resources:
            return Origin("resource", target)
        if target in self.declared:
            return Origin("parameter", target)
        return None

    # --- conditions ------------------------------------------------------------------------------

    def condition(self, name: Any, loc: Loc) -> bool:
        if not isinstance(name, str) or name not in self.conditions:
            known = ", ".join(self.conditions) or "none"
            raise TemplateError(loc, f"no condition named {name!r} in Conditions (known: {known})")
        if name in self._decided:
            return self._decided[name]
        if name in self._deciding:
            raise TemplateError(("Conditions", name), "the condition refers to itself")
        self._deciding.add(name)
        try:
            decided = self._truth(self.conditions[name], ("Conditions", name))
        finally:
            self._deciding.discard(name)
        self._decided[name] = decided
        return decided

    def _truth(self, node: Any, loc: Loc) -> bool:
        if isinstance(node, bool):
            return node
        if isinstance(node, str) and node.lower() in ("true", "false"):
            return node.lower() == "true"
        if not isinstance(node, dict) or len(node) != 1:
            raise TemplateError(loc, "must be a condition function (Fn::Equals, Fn::And, ...)")
        ((name, arg),) = node.items()
        here = (*loc, name)
        if name == "Condition":
            return self.condition(arg, here)
        if name == "Fn::Equals":
            pair = self._list(arg, here, 2, 2)
            left, right = (self.value(item, (*here, i)) for i, item in enumerate(pair))
            return bool(_comparable(left) == _comparable(right))
        if name == "Fn::Not":
            (only,) = self._list(arg, here, 1, 1)
            return not self._truth(only, (*here, 0))
        if name in ("Fn::And", "Fn::Or"):
            items = self._list(arg, here, 2, 10)
            truths = (self._truth(item, (*here, i)) for i, item in enumerate(items))
            return all(truths) if name == "Fn::And" else any(truths)
        raise TemplateError(loc, f"{name} is not a condition function")

    # --- functions -------------------------------------------------------------------------------

    def _call(self, name: str, arg: Any, loc: Loc) -> Any:
        if name == "Ref":
            return self.ref(arg, loc)
        if name == "Fn::GetAtt":
            return self._get_att(arg, loc)
        if name == "Fn::Sub":
            return self._sub(arg, loc)
        if name == "Fn::Join":
            delimiter, items = self._list(arg, loc, 2, 2)
            values = self.value(items, (*loc, 1))
            if not isinstance(values, list):
                raise TemplateError(loc, "the second item must be a list")
            return self.text(delimiter, (*loc, 0)).join(
                self.text(v, (*loc, 1, i)) for i, v in enumerate(values)
            )
        if name == "Fn::Select":
            index, items = self._list(arg, loc, 2, 2)
            position = int(self.text(index, (*loc, 0)))
            values = self.value(items, (*loc, 1))
            if not isinstance(values, list) or not 0 <= position < len(values):
                raise TemplateError(loc, f"index {position} is out of range")
            return values[position]
        if name == "Fn::Split":
            delimiter, source = self._list(arg, loc, 2, 2)
            return self.text(source, (*loc, 1)).split(self.text(delimiter, (*loc, 0)))
        if name == "Fn::FindInMap":
            return self._find_in_map(arg, loc)
        if name == "Fn::If":
            return self._if(arg, loc, evaluate=True)
        if name == "Fn::Base64":
            return base64.b64encode(self.text(arg, loc).encode()).decode()
        if name == "Fn::GetAZs":
            region = self.text(arg, loc) or self.region
            return [f"{region}{zone}" for zone in "abc"]
        raise TemplateError(loc, f"{name} cannot be evaluated here (it needs AWS)")

    def ref(self, name: Any, loc: Loc) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if not isinstance(name, str):
            raise TemplateError(loc, "must name a parameter or a resource")
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.declared:
            return self.parameter(name, loc)
        if name in self.resources:
            return self.resources.ref(name, loc)
        raise TemplateError(loc, f"{name!r} is neither a parameter nor a resource of the template")

    def parameter(self, name: str, loc: Loc) -> Any:
        declared = self.declared[name] if isinstance(self.declared[name], dict) else {}
        kind = str(declared.get("Type", "String"))
        if name in self.given:
            value = self.given[name]
        elif "Default" in declared:
            value = declared["Default"]
        else:
            raise TemplateError(
                loc,
                f"parameter {name} has no Default: give it a value in the overrides file"
                f" (parameters: {{{name}: ...}})",
            )
        if kind.startswith("AWS::SSM::Parameter::Value") and name not in self.given:
            raise TemplateError(
                loc,
                f"parameter {name} is read from SSM Parameter Store on AWS: give its value in"
                f" the overrides file (parameters: {{{name}: ...}})",
            )
        allowed = declared.get("AllowedValues")
        if isinstance(allowed, list) and str(value) not in [str(a) for a in allowed]:
            raise TemplateError(
                ("Parameters", name),
                f"{value!r} is not one of its AllowedValues ({', '.join(map(str, allowed))})",
            )
        if kind == "CommaDelimitedList" or kind.startswith("List<"):
            if isinstance(value, list):
                return [str(v) for v in value]
            return [part.strip() for part in str(value).split(",")]
        if kind == "Number" and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    return float(value)
                except ValueError:
                    raise TemplateError(
                        ("Parameters", name), f"must be a number (got {value!r})"
                    ) from None
        return value

    def _get_att(self, arg: Any, loc: Loc) -> Any:
        parts = arg.split(".", 1) if isinstance(arg, str) else arg
        if not isinstance(parts, list) or len(parts) != 2:
            raise TemplateError(loc, "must be [LogicalId, Attribute] or 'LogicalId.Attribute'")
        logical_id = parts[0]
        attribute = self.text(parts[1], (*loc, 1))
        if not isinstance(logical_id, str) or logical_id not in self.resources:
            raise TemplateError(loc, f"no resource named {logical_id!r} in the template")
        return self.resources.attribute(logical_id, attribute, loc)

    def _sub(self, arg: Any, loc: Loc) -> str:
        variables: dict[str, Any] = {}
        if isinstance(arg, list):
            text, given = self._list(arg, loc, 2, 2)
            if not isinstance(given, dict):
                raise TemplateError(loc, "the second item must be a mapping of variables")
            variables = {k: self.value(v, (*loc, 1, k)) for k, v in given.items()}
        else:
            text = arg
        if not isinstance(text, str):
            raise TemplateError(loc, "must be a string, or [string, {variables}]")

        def replace(found: re.Match[str]) -> str:
            name = found.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return self.text(variables[name], loc)
            if "." in name and name.split(".", 1)[0] in self.resources:
                return self.text({"Fn::GetAtt": name.split(".", 1)}, loc)
            return self.text({"Ref": name}, loc)

        return _SUB.sub(replace, text)

    def _find_in_map(self, arg: Any, loc: Loc) -> Any:
        items = self._list(arg, loc, 3, 4)
        names = [self.text(item, (*loc, i)) for i, item in enumerate(items[:3])]
        found: Any = self.mappings
        for depth, key in enumerate(names):
            if not isinstance(found, dict) or key not in found:
                where = ["Mappings", *names[:depth]]
                if len(items) == 4 and isinstance(items[3], dict) and "DefaultValue" in items[3]:
                    return self.value(items[3]["DefaultValue"], (*loc, 3))
                raise TemplateError(loc, f"no key {key!r} in {'.'.join(where)}")
            found = found[key]
        return self.value(found, ("Mappings", *names))

    def _if(self, arg: Any, loc: Loc, *, evaluate: bool) -> Any:
        name, then, otherwise = self._list(arg, loc, 3, 3)
        chosen, index = (then, 1) if self.condition(name, (*loc, 0)) else (otherwise, 2)
        return self.value(chosen, (*loc, index)) if evaluate else chosen

    def _list(self, arg: Any, loc: Loc, least: int, most: int) -> list[Any]:
        if not isinstance(arg, list) or not least <= len(arg) <= most:
            count = str(least) if least == most else f"{least} to {most}"
            raise TemplateError(loc, f"must be a list of {count} items")
        return arg


def _comparable(value: Any) -> Any:
    # Fn::Equals compares as CloudFormation does: parameters are strings there.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
