"""Filter criteria: EventBridge pattern semantics as Lambda applies them to records."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.filters import FilterError, compile_filters, compile_pattern

KAFKA_DOC: dict[str, Any] = {
    "topic": "orders",
    "partition": 0,
    "offset": 5,
    "timestamp": 1700000000000,
    "timestampType": "CREATE_TIME",
    "key": "customer-7",
    "value": {
        "kind": "order",
        "total": 42.5,
        "items": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 0}],
        "tags": ["priority", "gift"],
        "customer": {"id": 7, "tier": "Gold", "email": None},
    },
    "headers": [],
}


def case(pattern: dict[str, Any], doc: dict[str, Any], expected: bool, id: str) -> Any:
    return pytest.param(pattern, doc, expected, id=id)


MATCH_CASES = [
    # exact values
    case({"a": ["x"]}, {"a": "x"}, True, "string-equal"),
    case({"a": ["x"]}, {"a": "y"}, False, "string-different"),
    case({"a": ["x"]}, {"a": "X"}, False, "string-case-sensitive"),
    case({"a": ["x"]}, {}, False, "string-missing"),
    case({"a": ["x", "y"]}, {"a": "y"}, True, "or-within-array"),
    case({"a": [""]}, {"a": ""}, True, "empty-string"),
    case({"a": [""]}, {"a": None}, False, "empty-string-is-not-null"),
    case({"a": [5]}, {"a": 5}, True, "number-equal"),
    case({"a": [1]}, {"a": 1.0}, True, "int-pattern-float-value"),
    case({"a": [1.0]}, {"a": 1}, True, "float-pattern-int-value"),
    case({"a": [5]}, {"a": "5"}, False, "number-pattern-string-value"),
    case({"a": ["5"]}, {"a": 5}, False, "string-pattern-number-value"),
    case({"a": [1]}, {"a": True}, False, "number-pattern-bool-value"),
    case({"a": [True]}, {"a": True}, True, "bool-equal"),
    case({"a": [True]}, {"a": 1}, False, "bool-pattern-number-value"),
    case({"a": [False]}, {"a": 0}, False, "false-pattern-zero-value"),
    case({"a": [True]}, {"a": "true"}, False, "bool-pattern-string-value"),
    case({"a": [2**63 + 1]}, {"a": 2**63 + 1}, True, "big-int-equal"),
    case({"a": [2**63 + 1]}, {"a": 2**63}, False, "big-int-different"),
    # null
    case({"a": [None]}, {"a": None}, True, "null-matches-null"),
    case({"a": [None]}, {}, False, "null-does-not-match-missing"),
    case({"a": [None]}, {"a": ""}, False, "null-does-not-match-empty-string"),
    case({"a": [None, "x"]}, {"a": "x"}, True, "null-or-value"),
    # prefix / suffix
    case({"a": [{"prefix": "ord"}]}, {"a": "orders"}, True, "prefix"),
    case({"a": [{"prefix": "ord"}]}, {"a": "Orders"}, False, "prefix-case-sensitive"),
    case({"a": [{"prefix": "ord"}]}, {"a": "xord"}, False, "prefix-not-at-start"),
    case({"a": [{"prefix": "1"}]}, {"a": 12}, False, "prefix-ignores-numbers"),
    case({"a": [{"prefix": "ord"}]}, {}, False, "prefix-missing"),
    case({"a": [{"prefix": {"equals-ignore-case": "ORD"}}]}, {"a": "orders"}, True, "prefix-ic"),
    case(
        {"a": [{"prefix": {"equals-ignore-case": "ORD"}}]}, {"a": "xorders"}, False, "prefix-ic-no"
    ),
    case({"a": [{"suffix": ".png"}]}, {"a": "cat.png"}, True, "suffix"),
    case({"a": [{"suffix": ".png"}]}, {"a": "cat.PNG"}, False, "suffix-case-sensitive"),
    case({"a": [{"suffix": {"equals-ignore-case": ".png"}}]}, {"a": "c.PNG"}, True, "suffix-ic"),
    case({"a": [{"suffix": ".png"}]}, {"a": "cat.jpg"}, False, "suffix-different"),
    # equals-ignore-case
    case({"a": [{"equals-ignore-case": "gold"}]}, {"a": "GoLd"}, True, "ignore-case"),
    case({"a": [{"equals-ignore-case": "gold"}]}, {"a": "golden"}, False, "ignore-case-whole"),
    case({"a": [{"equals-ignore-case": "1"}]}, {"a": 1}, False, "ignore-case-number"),
    # anything-but
    case({"a": [{"anything-but": "x"}]}, {"a": "y"}, True, "anything-but-string"),
    case({"a": [{"anything-but": "x"}]}, {"a": "x"}, False, "anything-but-string-equal"),
    case({"a": [{"anything-but": "x"}]}, {}, False, "anything-but-needs-field"),
    case({"a": [{"anything-but": "x"}]}, {"a": None}, True, "anything-but-null-value"),
    case({"a": [{"anything-but": "5"}]}, {"a": 5}, True, "anything-but-string-vs-number"),
    case({"a": [{"anything-but": ["x", "y"]}]}, {"a": "y"}, False, "anything-but-list-hit"),
    case({"a": [{"anything-but": ["x", "y"]}]}, {"a": "z"}, True, "anything-but-list-miss"),
    case({"a": [{"anything-but": 3}]}, {"a": 3.0}, False, "anything-but-number-numeric"),
    case({"a": [{"anything-but": [1, 2]}]}, {"a": 4}, True, "anything-but-numbers"),
    case({"a": [{"anything-but": 3}]}, {"a": "3"}, True, "anything-but-number-vs-string"),
    case({"a": [{"anything-but": "x"}]}, {"a": ["x", "y"]}, True, "anything-but-array-any"),
    case({"a": [{"anything-but": "x"}]}, {"a": ["x", "x"]}, False, "anything-but-array-all-x"),
    case({"a": [{"anything-but": {"prefix": "us-"}}]}, {"a": "eu-1"}, True, "anything-but-prefix"),
    case({"a": [{"anything-but": {"prefix": "us-"}}]}, {"a": "us-1"}, False, "not-prefix-hit"),
    case({"a": [{"anything-but": {"prefix": "us-"}}]}, {"a": 5}, False, "not-prefix-number"),
    case({"a": [{"anything-but": {"suffix": ".png"}}]}, {"a": "a.jpg"}, True, "not-suffix"),
    case({"a": [{"anything-but": {"suffix": ".png"}}]}, {"a": "a.png"}, False, "not-suffix-hit"),
    case(
        {"a": [{"anything-but": {"equals-ignore-case": ["Stop", "Halt"]}}]},
        {"a": "HALT"},
        False,
        "not-ignore-case-hit",
    ),
    case(
        {"a": [{"anything-but": {"equals-ignore-case": "stop"}}]},
        {"a": "go"},
        True,
        "not-ignore-case-miss",
    ),
    # numeric
    case({"n": [{"numeric": [">", 0]}]}, {"n": 1}, True, "gt"),
    case({"n": [{"numeric": [">", 0]}]}, {"n": 0}, False, "gt-boundary"),
    case({"n": [{"numeric": [">=", 0]}]}, {"n": 0}, True, "ge-boundary"),
    case({"n": [{"numeric": ["<", 0]}]}, {"n": -0.5}, True, "lt-negative-float"),
    case({"n": [{"numeric": ["<", 0]}]}, {"n": 0.0}, False, "lt-boundary"),
    case({"n": [{"numeric": ["<=", 0]}]}, {"n": 0}, True, "le-boundary"),
    case({"n": [{"numeric": ["=", 100]}]}, {"n": 100.0}, True, "eq-int-float"),
    case({"n": [{"numeric": ["=", 3.018e2]}]}, {"n": 301.8}, True, "eq-exponent"),
    case({"n": [{"numeric": ["=", 100]}]}, {"n": 100.5}, False, "eq-different"),
    case({"n": [{"numeric": [">", 0, "<=", 5]}]}, {"n": 5}, True, "range-upper-inclusive"),
    case({"n": [{"numeric": [">", 0, "<=", 5]}]}, {"n": 0}, False, "range-lower-exclusive"),
    case({"n": [{"numeric": [">", 0, "<=", 5]}]}, {"n": 5.000001}, False, "range-above"),
    case({"n": [{"numeric": ["<", 10, ">=", 1]}]}, {"n": 1}, True, "range-upper-first"),
    case({"n": [{"numeric": [">=", 5, "<=", 5]}]}, {"n": 5}, True, "range-single-point"),
    case({"n": [{"numeric": [">", 0]}]}, {"n": "7"}, False, "numeric-string-value"),
    case({"n": [{"numeric": [">", 0]}]}, {"n": True}, False, "numeric-bool-value"),
    case({"n": [{"numeric": [">", 0]}]}, {"n": None}, False, "numeric-null-value"),
    case({"n": [{"numeric": [">", 0]}]}, {}, False, "numeric-missing"),
    case({"n": [{"numeric": [">", 2**64]}]}, {"n": 2**64 + 1}, True, "numeric-big-int"),
    case({"n": [{"numeric": [">", 0]}]}, {"n": [-1, 3]}, True, "numeric-array-any"),
    case({"n": [{"numeric": ["<", 0]}, {"numeric": [">", 10]}]}, {"n": 11}, True, "numeric-or"),
    case({"n": [{"numeric": ["<", 0]}, {"numeric": [">", 10]}]}, {"n": 5}, False, "numeric-or-no"),
    # exists
    case({"a": [{"exists": True}]}, {"a": "x"}, True, "exists-present"),
    case({"a": [{"exists": True}]}, {}, False, "exists-missing"),
    case({"a": [{"exists": True}]}, {"a": None}, True, "exists-null-is-present"),
    case({"a": [{"exists": True}]}, {"a": ""}, True, "exists-empty-string"),
    case({"a": [{"exists": True}]}, {"a": [1]}, True, "exists-array"),
    case({"a": [{"exists": True}]}, {"a": []}, False, "exists-empty-array-has-no-leaf"),
    case({"a": [{"exists": True}]}, {"a": {"b": 1}}, False, "exists-object-is-not-leaf"),
    case({"a": [{"exists": False}]}, {}, True, "not-exists-missing"),
    case({"a": [{"exists": False}]}, {"a": None}, False, "not-exists-null"),
    case({"a": [{"exists": False}]}, {"a": 0}, False, "not-exists-present"),
    case({"a": [{"exists": False}]}, {"a": {"b": 1}}, True, "not-exists-object"),
    case({"a": [{"exists": False}, "x"]}, {"a": "x"}, True, "not-exists-or-value"),
    case({"a": [{"exists": False}, "x"]}, {"a": "y"}, False, "not-exists-or-value-no"),
    # nesting
    case({"value": {"kind": ["order"]}}, KAFKA_DOC, True, "nested"),
    case({"value": {"kind": ["refund"]}}, KAFKA_DOC, False, "nested-different"),
    case({"value": {"customer": {"tier": ["Gold"]}}}, KAFKA_DOC, True, "nested-deep"),
    case({"value": {"customer": {"email": [None]}}}, KAFKA_DOC, True, "nested-null"),
    case({"value": {"missing": {"x": ["y"]}}}, KAFKA_DOC, False, "nested-missing-parent"),
    case({"a": {"b": [{"exists": False}]}}, {}, True, "not-exists-under-missing-parent"),
    case({"a": {"b": [{"exists": False}]}}, {"a": "text"}, True, "not-exists-under-scalar"),
    case({"a": {"b": ["x"]}}, {"a": "x"}, False, "nested-pattern-scalar-value"),
    case({"value": {"kind": ["order"]}}, {"value": "raw string"}, False, "nested-raw-value"),
    case({"value": ["raw string"]}, {"value": "raw string"}, True, "raw-value-string"),
    case({"value": ["x"]}, {"value": {"x": 1}}, False, "leaf-pattern-object-value"),
    # arrays in documents
    case({"value": {"tags": ["gift"]}}, KAFKA_DOC, True, "array-contains"),
    case({"value": {"tags": ["sale"]}}, KAFKA_DOC, False, "array-does-not-contain"),
    case({"value": {"tags": [{"prefix": "pri"}]}}, KAFKA_DOC, True, "array-prefix"),
    case({"a": ["x"]}, {"a": [["y"], ["x"]]}, True, "nested-arrays-flatten"),
    case({"a": ["x"]}, {"a": []}, False, "empty-array"),
    case({"value": {"items": {"sku": ["B2"]}}}, KAFKA_DOC, True, "array-of-objects"),
    case({"value": {"items": {"sku": ["C3"]}}}, KAFKA_DOC, False, "array-of-objects-no"),
    case(
        {"value": {"items": {"sku": ["B2"], "qty": [{"numeric": [">", 0]}]}}},
        KAFKA_DOC,
        False,
        "array-of-objects-same-element",
    ),
    case(
        {"value": {"items": {"sku": ["A1"], "qty": [{"numeric": [">", 0]}]}}},
        KAFKA_DOC,
        True,
        "array-of-objects-same-element-hit",
    ),
    case({"a": {"b": ["x"]}}, {"a": [[{"b": "x"}]]}, True, "nested-array-of-objects"),
    case({"a": {"b": ["x"]}}, {"a": []}, False, "nested-empty-array"),
    # AND across fields
    case({"topic": ["orders"], "partition": [0]}, KAFKA_DOC, True, "and-both"),
    case({"topic": ["orders"], "partition": [1]}, KAFKA_DOC, False, "and-one-fails"),
    case(
        {"topic": ["orders"], "value": {"kind": ["order"], "total": [{"numeric": [">=", 40]}]}},
        KAFKA_DOC,
        True,
        "and-metadata-and-value",
    ),
    case(
        {"topic": ["orders"], "value": {"kind": ["order"], "total": [{"numeric": [">", 50]}]}},
        KAFKA_DOC,
        False,
        "and-nested-fails",
    ),
    # $or across fields
    case({"$or": [{"a": ["1"]}, {"b": ["2"]}]}, {"b": "2"}, True, "dollar-or"),
    case({"$or": [{"a": ["1"]}, {"b": ["2"]}]}, {"a": "2", "b": "1"}, False, "dollar-or-no"),
    case(
        {"c": ["3"], "$or": [{"a": ["1"]}, {"b": ["2"]}]},
        {"a": "1", "c": "4"},
        False,
        "dollar-or-and-field",
    ),
]


@pytest.mark.parametrize(("pattern", "doc", "expected"), MATCH_CASES)
def test_pattern_matches(pattern: dict[str, Any], doc: dict[str, Any], expected: bool) -> None:
    assert compile_pattern(pattern)(doc) is expected
    # The JSON text form compiles to the same predicate.
    assert compile_pattern(json.dumps(pattern))(doc) is expected


def test_no_filters_means_no_filtering() -> None:
    assert compile_filters([]) is None


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param({"value": {"kind": "order"}}, True, id="first-filter"),
        pytest.param({"value": {"kind": "refund", "total": 500}}, True, id="second-filter"),
        pytest.param({"value": {"kind": "refund", "total": 5}}, False, id="neither"),
        pytest.param({"value": "not json"}, False, id="raw-value"),
    ],
)
def test_filters_are_ored(doc: dict[str, Any], expected: bool) -> None:
    keep = compile_filters(
        [
            '{"value": {"kind": ["order"]}}',
            {"value": {"total": [{"numeric": [">", 100]}]}},
        ]
    )
    assert keep is not None
    assert keep(doc) is expected


def test_single_filter() -> None:
    keep = compile_filters(['{"topic": ["orders"]}'])
    assert keep is not None
    assert keep(KAFKA_DOC)
    assert not keep({**KAFKA_DOC, "topic": "payments"})


def test_compiled_pattern_is_reusable_and_does_not_touch_the_document() -> None:
    match = compile_pattern({"value": {"tags": [{"anything-but": "x"}]}})
    doc = json.loads(json.dumps(KAFKA_DOC))
    for _ in range(3):
        assert match(doc)
    assert doc == KAFKA_DOC


def test_any_mapping_and_sequence_type_is_a_document() -> None:
    match = compile_pattern({"value": {"kind": ["order"], "tags": ["b"], "n": [{"exists": False}]}})
    nested = MappingProxyType({"kind": "order", "tags": ("a", "b"), "n": MappingProxyType({})})
    assert match(MappingProxyType({"value": nested}))
    assert match({"value": [MappingProxyType({"kind": "order", "tags": ["b"]})]})
    assert not match({"value": (MappingProxyType({"kind": "order", "tags": ["c"]}),)})


INVALID_CASES = [
    pytest.param("{not json", "", "not valid JSON", id="not-json"),
    pytest.param('{"a": [NaN]}', "", "NaN", id="nan-constant"),
    pytest.param('{"a": ["x"], "a": ["y"]}', "", "duplicate key 'a'", id="duplicate-key"),
    pytest.param("[1, 2]", "", "must be a JSON object, got array", id="not-object-array"),
    pytest.param('"text"', "", "must be a JSON object, got string", id="not-object-string"),
    pytest.param({}, "", "empty", id="empty-pattern"),
    pytest.param({"value": {}}, "value", "empty", id="empty-nested-object"),
    pytest.param({"value": {"kind": "order"}}, "value.kind", "expected an array", id="leaf-str"),
    pytest.param({"value": {"n": 5}}, "value.n", "got number", id="leaf-number"),
    pytest.param({"value": {"kind": []}}, "value.kind", "matcher array is empty", id="leaf-empty"),
    pytest.param({"a": [["x"]]}, "a[0]", "got array", id="array-in-matchers"),
    pytest.param(
        {"value": {"kind": [{"contains": "x"}]}},
        "value.kind[0]",
        "unknown operator 'contains'",
        id="unknown-operator",
    ),
    pytest.param(
        {"a": [{"prefix": "x", "suffix": "y"}]}, "a[0]", "exactly one operator", id="two-operators"
    ),
    pytest.param({"a": [{}]}, "a[0]", "exactly one operator", id="no-operator"),
    pytest.param({"a": [{"prefix": 5}]}, "a[0].prefix", "expected a string", id="prefix-number"),
    pytest.param(
        {"a": [{"prefix": {"equals-ignore-case": 1}}]},
        "a[0].prefix.equals-ignore-case",
        "expected a string",
        id="prefix-ignore-case-number",
    ),
    pytest.param({"a": [{"suffix": None}]}, "a[0].suffix", "got null", id="suffix-null"),
    pytest.param(
        {"a": [{"equals-ignore-case": ["x"]}]},
        "a[0].equals-ignore-case",
        "got array",
        id="ignore-case-array",
    ),
    pytest.param({"a": [{"exists": "yes"}]}, "a[0].exists", "true or false", id="exists-string"),
    pytest.param(
        {"value": {"n": [{"numeric": ["!=", 5]}]}},
        "value.n[0].numeric[0]",
        "unknown comparison '!='",
        id="numeric-bad-operator",
    ),
    pytest.param(
        {"value": {"n": [{"numeric": [">", "5"]}]}},
        "value.n[0].numeric[1]",
        "expected a number, got string",
        id="numeric-string-bound",
    ),
    pytest.param(
        {"n": [{"numeric": [">", True]}]},
        "n[0].numeric[1]",
        "got boolean",
        id="numeric-bool-bound",
    ),
    pytest.param({"n": [{"numeric": [">"]}]}, "n[0].numeric", "expected [op", id="numeric-short"),
    pytest.param({"n": [{"numeric": 5}]}, "n[0].numeric", "expected [op", id="numeric-not-list"),
    pytest.param(
        {"n": [{"numeric": [">", 1, ">", 2]}]}, "n[0].numeric", "a range needs", id="two-lowers"
    ),
    pytest.param(
        {"n": [{"numeric": ["=", 1, "<", 2]}]}, "n[0].numeric", "a range needs", id="eq-in-range"
    ),
    pytest.param(
        {"n": [{"numeric": [">", 5, "<", 1]}]}, "n[0].numeric", "matches no number", id="inverted"
    ),
    pytest.param(
        {"n": [{"numeric": [">", 5, "<=", 5]}]}, "n[0].numeric", "matches no number", id="empty"
    ),
    pytest.param(
        {"n": [{"numeric": [">", float("inf")]}]}, "n[0].numeric[1]", "finite", id="infinite"
    ),
    pytest.param(
        {"a": [{"anything-but": ["x", 1]}]},
        "a[0].anything-but",
        "strings only or numbers only",
        id="anything-but-mixed",
    ),
    pytest.param(
        {"a": [{"anything-but": None}]}, "a[0].anything-but", "strings only", id="anything-but-null"
    ),
    pytest.param(
        {"a": [{"anything-but": []}]}, "a[0].anything-but", "non-empty", id="anything-but-empty"
    ),
    pytest.param(
        {"a": [{"anything-but": {"numeric": [">", 1]}}]},
        "a[0].anything-but",
        "unknown operator 'numeric'",
        id="anything-but-unknown-inner",
    ),
    pytest.param(
        {"a": [{"anything-but": {"prefix": 1}}]},
        "a[0].anything-but.prefix",
        "expected a string",
        id="anything-but-prefix-number",
    ),
    pytest.param(
        {"a": [{"anything-but": {"equals-ignore-case": []}}]},
        "a[0].anything-but.equals-ignore-case",
        "non-empty",
        id="anything-but-ignore-case-empty",
    ),
    pytest.param({"$or": [{"a": ["x"]}]}, "$or", "at least two", id="or-one-branch"),
    pytest.param({"$or": {"a": ["x"]}}, "$or", "at least two", id="or-not-array"),
    pytest.param(
        {"$or": [{"a": ["x"]}, {"b": "y"}]}, "$or[1].b", "expected an array", id="or-bad-branch"
    ),
    pytest.param({1: ["x"]}, "", "field names must be strings", id="non-string-key"),
]


@pytest.mark.parametrize(("pattern", "path", "problem"), INVALID_CASES)
def test_invalid_pattern_is_rejected_at_compile_time(
    pattern: str | dict[str, Any], path: str, problem: str
) -> None:
    with pytest.raises(FilterError) as info:
        compile_pattern(pattern)
    message = str(info.value)
    assert path in message
    assert problem in message
    assert isinstance(info.value, ValueError)


def test_compile_filters_names_the_failing_filter() -> None:
    with pytest.raises(FilterError, match=r"^filters\[1\]: value\.kind: "):
        compile_filters(['{"topic": ["orders"]}', '{"value": {"kind": "order"}}'])


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(alphabet="abpqsxzPQSZ", max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from("abc"), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(database=None)
@given(st.dictionaries(st.sampled_from("abc"), JSON_VALUES, max_size=3))
def test_matching_never_raises(doc: dict[str, Any]) -> None:
    pattern = {
        "a": [
            "x",
            1,
            None,
            True,
            {"prefix": "p"},
            {"suffix": {"equals-ignore-case": "S"}},
            {"anything-but": [1, 2]},
            {"numeric": [">", 0, "<", 10]},
            {"equals-ignore-case": "Q"},
        ],
        "b": {"c": [{"exists": False}, {"anything-but": {"prefix": "z"}}]},
        "$or": [{"c": [{"exists": True}]}, {"a": [{"exists": True}]}],
    }
    result = compile_pattern(pattern)(doc)
    assert isinstance(result, bool)
