"""Lambda `FilterCriteria` matching: EventBridge-style patterns compiled once into predicates.

Semantics follow Lambda event filtering, which runs EventBridge's matcher (aws/event-ruler):
https://docs.aws.amazon.com/lambda/latest/dg/invocation-eventfiltering.html
"""

from __future__ import annotations

import json
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from workers.engine.records import Record

log = logging.getLogger("workers.filters")

__all__ = ["FilterError", "Match", "compile_filters", "compile_pattern", "split_matching"]

Match = Callable[[Mapping[str, Any]], bool]
_LeafTest = Callable[[Any], bool]

_MISSING = object()
_EMPTY: Mapping[str, Any] = {}

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_LOWER = (">", ">=")
_UPPER = ("<", "<=")
_OPERATORS = (
    "anything-but",
    "equals-ignore-case",
    "exists",
    "numeric",
    "prefix",
    "suffix",
)


class FilterError(ValueError):
    """A filter pattern is invalid; the message names the path inside the pattern."""


def compile_pattern(pattern: str | dict[str, Any]) -> Match:
    """Compile one pattern (JSON text or an already parsed object) into a record predicate."""
    if isinstance(pattern, str):
        try:
            parsed = json.loads(
                pattern, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
            )
        except FilterError:
            raise
        except ValueError as exc:
            raise FilterError(f"filter pattern is not valid JSON: {exc}") from None
    else:
        parsed = pattern
    if not isinstance(parsed, dict):
        raise FilterError(f"filter pattern must be a JSON object, got {_kind(parsed)}")
    return _compile_object(parsed, "")


def compile_filters(patterns: Sequence[str | dict[str, Any]]) -> Match | None:
    """Compile a mapping's filters: a record is kept if any pattern matches.

    Returns None when there are no filters, so the caller can skip filtering altogether.
    """
    compiled: list[Match] = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(compile_pattern(pattern))
        except FilterError as exc:
            raise FilterError(f"filters[{index}]: {exc}") from None
    if not compiled:
        return None
    if len(compiled) == 1:
        return compiled[0]
    return _any_of(tuple(compiled))


# --- compiling -----------------------------------------------------------------------------------


def _compile_object(obj: Mapping[Any, Any], path: str) -> Match:
    if not obj:
        raise FilterError(f"{path or 'filter pattern'}: pattern object is empty")
    tests: list[Match] = []
    for key, spec in obj.items():
        if not isinstance(key, str):
            raise FilterError(
                f"{path or 'filter pattern'}: field names must be strings, got {key!r}"
            )
        child = _join(path, key)
        if key == "$or":
            tests.append(_compile_or(spec, child))
        elif isinstance(spec, dict):
            tests.append(_nested(key, _compile_object(spec, child)))
        elif isinstance(spec, list):
            tests.append(_compile_field(key, spec, child))
        else:
            raise FilterError(
                f"{child}: expected an array of matchers or a nested object, got {_kind(spec)}"
            )
    if len(tests) == 1:
        return tests[0]
    return _all_of(tuple(tests))


def _compile_or(spec: Any, path: str) -> Match:
    if not isinstance(spec, list) or len(spec) < 2 or not all(isinstance(s, dict) for s in spec):
        raise FilterError(f"{path}: expected an array of at least two pattern objects")
    return _any_of(tuple(_compile_object(s, f"{path}[{i}]") for i, s in enumerate(spec)))


def _compile_field(key: str, specs: list[Any], path: str) -> Match:
    if not specs:
        raise FilterError(f"{path}: matcher array is empty")
    strings: set[str] = set()
    numbers: set[int | float] = set()
    bools: set[bool] = set()
    match_null = False
    exists_true = exists_false = False
    others: list[_LeafTest] = []
    for index, spec in enumerate(specs):
        where = f"{path}[{index}]"
        if spec is None:
            match_null = True
        elif isinstance(spec, bool):
            bools.add(spec)
        elif isinstance(spec, str):
            strings.add(spec)
        elif isinstance(spec, int | float):
            numbers.add(_finite(spec, where))
        elif isinstance(spec, dict):
            if len(spec) != 1:
                raise FilterError(
                    f"{where}: a matcher object needs exactly one operator, got {list(spec)}"
                )
            ((name, arg),) = spec.items()
            if name == "exists":
                if not isinstance(arg, bool):
                    raise FilterError(f"{where}.exists: expected true or false, got {_kind(arg)}")
                if arg:
                    exists_true = True
                else:
                    exists_false = True
            else:
                others.append(_compile_operator(name, arg, where))
        else:
            raise FilterError(f"{where}: expected a value or a matcher object, got {_kind(spec)}")
    if strings or numbers or bools or match_null:
        others.insert(
            0, _exact(frozenset(strings), frozenset(numbers), frozenset(bools), match_null)
        )
    return _field(key, _first_of(others), exists_true, exists_false)


def _compile_operator(name: Any, arg: Any, where: str) -> _LeafTest:
    at = f"{where}.{name}"
    if name == "prefix":
        return _prefix(*_string_or_ignore_case(arg, at))
    if name == "suffix":
        return _suffix(*_string_or_ignore_case(arg, at))
    if name == "equals-ignore-case":
        return _ignore_case(frozenset({_string(arg, at).casefold()}))
    if name == "numeric":
        return _compile_numeric(arg, at)
    if name == "anything-but":
        return _compile_anything_but(arg, at)
    raise FilterError(f"{where}: unknown operator {name!r} (supported: {', '.join(_OPERATORS)})")


def _compile_numeric(arg: Any, at: str) -> _LeafTest:
    if not isinstance(arg, list) or len(arg) not in (2, 4):
        raise FilterError(f"{at}: expected [op, number] or [op, number, op, number]")
    checks: list[tuple[str, int | float]] = []
    for i in range(0, len(arg), 2):
        op, bound = arg[i], arg[i + 1]
        if not isinstance(op, str) or op not in _COMPARE:
            raise FilterError(
                f"{at}[{i}]: unknown comparison {op!r} (supported: {', '.join(_COMPARE)})"
            )
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise FilterError(f"{at}[{i + 1}]: expected a number, got {_kind(bound)}")
        checks.append((op, _finite(bound, f"{at}[{i + 1}]")))
    if len(checks) == 2:
        # A range is one lower and one upper bound, as EventBridge requires; "=" stands alone.
        ops = {checks[0][0], checks[1][0]}
        if "=" in ops or not (ops & set(_LOWER) and ops & set(_UPPER)):
            raise FilterError(f"{at}: a range needs one of > >= and one of < <=")
        lower = next(c for c in checks if c[0] in _LOWER)
        upper = next(c for c in checks if c[0] in _UPPER)
        empty = lower[1] > upper[1] or (lower[1] == upper[1] and ops != {">=", "<="})
        if empty:
            raise FilterError(f"{at}: the range from {lower[1]} to {upper[1]} matches no number")
        return _range(_COMPARE[lower[0]], lower[1], _COMPARE[upper[0]], upper[1])
    op, bound = checks[0]
    return _compare(_COMPARE[op], bound)


def _compile_anything_but(arg: Any, at: str) -> _LeafTest:
    if isinstance(arg, dict):
        if len(arg) != 1:
            raise FilterError(f"{at}: expected exactly one of prefix, suffix, equals-ignore-case")
        ((name, inner),) = arg.items()
        inner_at = f"{at}.{name}"
        if name == "prefix":
            return _not_string(_prefix(_string(inner, inner_at), False))
        if name == "suffix":
            return _not_string(_suffix(_string(inner, inner_at), False))
        if name == "equals-ignore-case":
            values = inner if isinstance(inner, list) else [inner]
            if not values:
                raise FilterError(f"{inner_at}: expected a string or a non-empty array of strings")
            folded = frozenset(
                _string(v, f"{inner_at}[{i}]").casefold() for i, v in enumerate(values)
            )
            return _not_string(_ignore_case(folded))
        raise FilterError(
            f"{at}: unknown operator {name!r} (supported: prefix, suffix, equals-ignore-case)"
        )
    values = arg if isinstance(arg, list) else [arg]
    if not values:
        raise FilterError(f"{at}: expected a value or a non-empty array of values")
    # EventBridge accepts all-string or all-number lists only.
    if all(isinstance(v, str) for v in values):
        return _not_exact(frozenset(values), frozenset())
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        numbers = frozenset(_finite(v, f"{at}[{i}]") for i, v in enumerate(values))
        return _not_exact(frozenset(), numbers)
    raise FilterError(f"{at}: expected strings only or numbers only, got {values!r}")


def _string_or_ignore_case(arg: Any, at: str) -> tuple[str, bool]:
    if isinstance(arg, dict) and len(arg) == 1 and "equals-ignore-case" in arg:
        return _string(arg["equals-ignore-case"], f"{at}.equals-ignore-case").casefold(), True
    return _string(arg, at), False


def _string(value: Any, at: str) -> str:
    if not isinstance(value, str):
        raise FilterError(f"{at}: expected a string, got {_kind(value)}")
    return value


def _finite(value: int | float, at: str) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"{at}: expected a finite number, got {value}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise FilterError(f"filter pattern has duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise FilterError(f"filter pattern is not valid JSON: {name} is not a JSON number")


# --- matching ------------------------------------------------------------------------------------
# Everything below runs per record, so closures hold precomputed sets and bounds and do no parsing.
# Documents come from JSON decoding, so checks dispatch on the exact builtin type first: an ABC
# isinstance (Mapping) costs several times more and is kept as the fallback only.

_SCALARS = frozenset({str, int, float, bool, type(None)})
_NUMBERS = frozenset({int, float})
_ARRAYS = (list, tuple)


def _is_number(value: Any) -> bool:
    # bool is an int subclass but not a JSON number; exact types keep it out.
    return type(value) in _NUMBERS


def _all_of(tests: tuple[Match, ...]) -> Match:
    # Chained two-way closures measure faster than a loop or a generator over a tuple.
    result = tests[0]
    for test in tests[1:]:
        result = _both(result, test)
    return result


def _both(first: Match, second: Match) -> Match:
    return lambda doc: first(doc) and second(doc)


def _any_of(tests: tuple[Match, ...]) -> Match:
    result = tests[0]
    for test in tests[1:]:
        result = _either(result, test)
    return result


def _either(first: Match, second: Match) -> Match:
    return lambda doc: first(doc) or second(doc)


def _first_of(tests: list[_LeafTest]) -> _LeafTest | None:
    if not tests:
        return None
    result = tests[0]
    for test in tests[1:]:
        result = _either_leaf(result, test)
    return result


def _either_leaf(first: _LeafTest, second: _LeafTest) -> _LeafTest:
    return lambda value: first(value) or second(value)


def _leaves(values: list[Any] | tuple[Any, ...], out: list[Any]) -> list[Any]:
    # Arrays in the document match if any element does (nested arrays flatten, as in EventBridge);
    # objects inside an array are not leaves for a value matcher.
    for value in values:
        if type(value) in _SCALARS:
            out.append(value)
        elif isinstance(value, _ARRAYS):
            _leaves(value, out)
        elif not isinstance(value, Mapping):
            out.append(value)
    return out


def _objects(
    values: list[Any] | tuple[Any, ...], out: list[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    for value in values:
        if type(value) is dict or (type(value) not in _SCALARS and isinstance(value, Mapping)):
            out.append(value)
        elif isinstance(value, _ARRAYS):
            _objects(value, out)
    return out


def _field(key: str, test: _LeafTest | None, exists_true: bool, exists_false: bool) -> Match:
    # `exists` looks at leaf values only, as EventBridge documents: a field holding an object or an
    # empty array counts as absent. A present null is a leaf, so it exists.
    leaf = test if test is not None else _never

    def match(doc: Mapping[str, Any]) -> bool:
        value = doc.get(key, _MISSING)
        if type(value) in _SCALARS:
            return exists_true or leaf(value)
        if value is _MISSING:
            return exists_false
        if isinstance(value, _ARRAYS):
            leaves = _leaves(value, [])
            if not leaves:
                return exists_false
            return exists_true or any(map(leaf, leaves))
        if isinstance(value, Mapping):
            return exists_false
        return exists_true or leaf(value)

    return match


def _never(value: Any) -> bool:
    return False


def _nested(key: str, sub: Match) -> Match:
    def match(doc: Mapping[str, Any]) -> bool:
        value = doc.get(key)
        if type(value) is dict:
            return sub(value)
        if type(value) in _SCALARS:
            # Not an object: every field below is absent, which `exists: false` can match.
            return sub(_EMPTY)
        if isinstance(value, _ARRAYS):
            # Each element is matched whole, so sibling fields must hold in the same element.
            return any(map(sub, _objects(value, [])))
        return sub(value if isinstance(value, Mapping) else _EMPTY)

    return match


def _exact(
    strings: frozenset[str],
    numbers: frozenset[int | float],
    bools: frozenset[bool],
    match_null: bool,
) -> _LeafTest:
    def test(value: Any) -> bool:
        if isinstance(value, str):
            return value in strings
        if value is None:
            return match_null
        if isinstance(value, bool):
            return value in bools
        if type(value) in _NUMBERS:
            # 1 and 1.0 hash and compare equal, so the set lookup is a numeric comparison.
            return value in numbers
        return False

    return test


def _not_exact(strings: frozenset[str], numbers: frozenset[int | float]) -> _LeafTest:
    def test(value: Any) -> bool:
        if isinstance(value, str):
            return value not in strings
        if _is_number(value):
            return value not in numbers
        return True

    return test


def _prefix(prefix: str, ignore_case: bool) -> _LeafTest:
    if ignore_case:
        return lambda value: isinstance(value, str) and value.casefold().startswith(prefix)
    return lambda value: isinstance(value, str) and value.startswith(prefix)


def _suffix(suffix: str, ignore_case: bool) -> _LeafTest:
    if ignore_case:
        return lambda value: isinstance(value, str) and value.casefold().endswith(suffix)
    return lambda value: isinstance(value, str) and value.endswith(suffix)


def _ignore_case(folded: frozenset[str]) -> _LeafTest:
    return lambda value: isinstance(value, str) and value.casefold() in folded


def _not_string(test: _LeafTest) -> _LeafTest:
    # The anything-but forms of string operators only consider string values.
    return lambda value: isinstance(value, str) and not test(value)


def _compare(op: Callable[[Any, Any], bool], bound: int | float) -> _LeafTest:
    return lambda value: _is_number(value) and op(value, bound)


def _range(
    low_op: Callable[[Any, Any], bool],
    low: int | float,
    high_op: Callable[[Any, Any], bool],
    high: int | float,
) -> _LeafTest:
    return lambda value: _is_number(value) and low_op(value, low) and high_op(value, high)


def split_matching(
    run: list[Record], matches: Match, view: Callable[[Record], dict[str, Any]], mapping: str
) -> tuple[list[Record], list[Record]]:
    """`run` as (kept, filtered out) by `matches` on each record's `view`. A record its connector
    could not convert is no document to match: it is kept, to be dead-lettered; so is one the
    filter cannot judge, for the handler (or, when its event cannot be built either, the
    destination) to deal with."""
    try:
        kept = [r for r in run if r.fault is not None or matches(view(r))]
    except Exception:
        kept = [r for r in run if r.fault is not None or _judged(r, matches, view, mapping)]
    if len(kept) == len(run):
        return run, []
    keep = {id(r) for r in kept}
    return kept, [r for r in run if id(r) not in keep]


def _judged(
    record: Record, matches: Match, view: Callable[[Record], dict[str, Any]], mapping: str
) -> bool:
    try:
        return matches(view(record))
    except Exception as exc:
        log.warning(
            "mapping %s: filter criteria cannot be applied to %s@%s (%s: %s); not filtering it out",
            mapping,
            record.source,
            record.position,
            type(exc).__name__,
            exc,
        )
        return True
