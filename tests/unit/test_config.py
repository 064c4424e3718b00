"""The YAML configuration: substitution, validation messages, defaults, redaction and schema."""

from __future__ import annotations

import copy
import importlib
import json
import os
import pickle
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.kafka.config import KafkaDestination, KafkaSource
from connectors.memory.config import MemorySource
from connectors.rabbitmq.config import RabbitMQSource
from connectors.redis.config import RedisSource
from workers.app.config import (
    Config,
    ConfigError,
    EventSourceMapping,
    check_handler,
    config_from_dict,
    json_schema,
    load_config,
    main,
    parse_config,
    redact_url,
)
from workers.engine.invoker import FunctionSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.yaml"
SCHEMA = ROOT / "config" / "schema.json"

BASE: dict[str, Any] = {
    "functions": {"orders": {"handler": "app.handlers:handle_orders"}},
    "event_source_mappings": [
        {
            "name": "k",
            "function": "orders",
            "source": {"type": "kafka", "bootstrap_servers": "localhost:9092", "topics": ["t"]},
        },
        {
            "name": "r",
            "function": "orders",
            "source": {
                "type": "rabbitmq",
                "url": "amqp://guest:s3cret@localhost:5672/%2F",
                "queue": "q",
            },
        },
        {
            "name": "s",
            "function": "orders",
            "source": {"type": "redis", "url": "redis://localhost:6379/0", "streams": ["st"]},
        },
    ],
}

Mutation = Callable[[dict[str, Any]], None]


def put(*path: str | int, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def drop(*path: str | int) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(doc)

    return mutate


M0 = ("event_source_mappings", 0)
M1 = ("event_source_mappings", 1)
M2 = ("event_source_mappings", 2)
ORDERS = ("functions", "orders")

# (id, change to BASE, key path the error must name, words the message must contain)
BAD: list[tuple[str, Mutation, str, str]] = [
    ("unknown top-level key", put("mappings", value=[]), "mappings", "unknown key"),
    (
        "unknown mapping key",
        put(*M0, "batchsize", value=10),
        "event_source_mappings[0].batchsize",
        "did you mean 'batch_size'?",
    ),
    (
        "unknown source key",
        put(*M0, "source", "topic", value="t"),
        "event_source_mappings[0].source.topic",
        "did you mean 'topics'?",
    ),
    (
        "unknown function key",
        put(*ORDERS, "memory", value=256),
        "functions.orders.memory",
        "did you mean 'memory_mb'?",
    ),
    (
        "unknown destination key",
        put(*M2, "destination_config", value={"on_failure": {"type": "file", "dir": "x"}}),
        "event_source_mappings[2].destination_config.on_failure.dir",
        "unknown key",
    ),
    (
        "wrong type",
        put(*M0, "batch_size", value="many"),
        "event_source_mappings[0].batch_size",
        "must be an integer (got 'many')",
    ),
    (
        "bool for an integer",
        put(*M0, "pollers", value=True),
        "event_source_mappings[0].pollers",
        "must be an integer (got true)",
    ),
    (
        "string for a list",
        put(*M0, "source", "topics", value="t"),
        "event_source_mappings[0].source.topics",
        "must be a list",
    ),
    (
        "source not a mapping",
        put(*M0, "source", value="kafka"),
        "event_source_mappings[0].source",
        "must be a mapping",
    ),
    (
        "bad enum",
        put(*ORDERS, "isolation", value="fork"),
        "functions.orders.isolation",
        "must be 'process' or 'thread' (got 'fork')",
    ),
    (
        "bad region",
        put(*ORDERS, "region", value="EU West 1"),
        "functions.orders.region",
        "must be a region name such as 'eu-west-1' (got 'EU West 1')",
    ),
    (
        "bad starting position",
        put(*M0, "source", "starting_position", value="EARLIEST"),
        "event_source_mappings[0].source.starting_position",
        "'TRIM_HORIZON', 'LATEST' or 'AT_TIMESTAMP'",
    ),
    (
        "batch_size zero",
        put(*M0, "batch_size", value=0),
        "event_source_mappings[0].batch_size",
        "must be between 1 and 10000 (got 0)",
    ),
    (
        "batch_size too big",
        put(*M1, "batch_size", value=10001),
        "event_source_mappings[1].batch_size",
        "must be between 1 and 10000 (got 10001)",
    ),
    (
        "batching window too long",
        put(*M0, "maximum_batching_window_s", value=301),
        "event_source_mappings[0].maximum_batching_window_s",
        "between 0 and 300",
    ),
    (
        "parallelization factor too big",
        put(*M0, "parallelization_factor", value=101),
        "event_source_mappings[0].parallelization_factor",
        "between 1 and 100",
    ),
    (
        "retry attempts below -1",
        put(*M0, "maximum_retry_attempts", value=-2),
        "event_source_mappings[0].maximum_retry_attempts",
        "between -1 and 10000 (got -2)",
    ),
    (
        "record age zero",
        put(*M0, "maximum_record_age_s", value=0),
        "event_source_mappings[0].maximum_record_age_s",
        "must be -1 (no limit) or between 1 and 604800 (got 0)",
    ),
    (
        "batch bytes above 64 MiB",
        put(*M0, "maximum_batch_bytes", value=64 * 1024 * 1024 + 1),
        "event_source_mappings[0].maximum_batch_bytes",
        "between 1 and 67108864",
    ),
    (
        "negative timeout",
        put(*ORDERS, "timeout_s", value=-1),
        "functions.orders.timeout_s",
        "must be greater than 0 and at most 900 (got -1)",
    ),
    (
        "timeout above Lambda's",
        put(*ORDERS, "timeout_s", value=901),
        "functions.orders.timeout_s",
        "at most 900",
    ),
    (
        "memory too small",
        put(*ORDERS, "memory_mb", value=64),
        "functions.orders.memory_mb",
        "between 128 and 10240 (got 64)",
    ),
    (
        "concurrency zero",
        put(*ORDERS, "concurrency", value=0),
        "functions.orders.concurrency",
        "must be at least 1 (got 0)",
    ),
    (
        "environment value not a string",
        put(*ORDERS, "environment", value={"RETRIES": 3}),
        "functions.orders.environment.RETRIES",
        "must be a string (got 3); quote it",
    ),
    (
        "bad environment name",
        put(*ORDERS, "environment", value={"1X": "a"}),
        "functions.orders.environment.1X",
        "not an environment variable name",
    ),
    ("missing handler", drop(*ORDERS, "handler"), "functions.orders.handler", "is required"),
    (
        "bad handler string",
        put(*ORDERS, "handler", value="app/handlers.py"),
        "functions.orders.handler",
        "must be 'module:function'",
    ),
    (
        "handler without a function",
        put(*ORDERS, "handler", value="handlers"),
        "functions.orders.handler",
        "must be 'module:function' or Lambda's 'module.function' (got 'handlers')",
    ),
    (
        "bad function name",
        put("functions", "bad name", value={"handler": "a:b"}),
        'functions["bad name"]',
        "letters, digits",
    ),
    ("no functions", put("functions", value={}), "functions", "must not be empty"),
    (
        "no mappings",
        put("event_source_mappings", value=[]),
        "event_source_mappings",
        "must not be empty",
    ),
    (
        "missing function reference",
        put(*M1, "function", value="payments"),
        "event_source_mappings[1].function",
        "no function named 'payments' in functions (known: 'orders')",
    ),
    (
        "missing function reference next to another error",
        both(put(*M1, "function", value="payments"), put(*M0, "batch_size", value=0)),
        "event_source_mappings[1].function",
        "no function named 'payments'",
    ),
    (
        "duplicate mapping name",
        put(*M2, "name", value="k"),
        "event_source_mappings[2].name",
        "duplicate mapping name 'k' (also event_source_mappings[0])",
    ),
    (
        "bad mapping name",
        put(*M0, "name", value="a/b"),
        "event_source_mappings[0].name",
        "letters, digits, '.', '_' and '-'",
    ),
    (
        "missing source type",
        drop(*M0, "source", "type"),
        "event_source_mappings[0].source.type",
        "is required (one of 'kafka', 'kombu', 'memory', 'rabbitmq', 'redis', 'sqs')",
    ),
    (
        "unknown source type",
        put(*M0, "source", "type", value="kinesis"),
        "event_source_mappings[0].source.type",
        "must be one of 'kafka', 'kombu', 'memory', 'rabbitmq', 'redis', 'sqs' (got 'kinesis')",
    ),
    (
        "empty topics",
        put(*M0, "source", "topics", value=[]),
        "event_source_mappings[0].source.topics",
        "must not be empty",
    ),
    (
        "empty streams",
        put(*M2, "source", "streams", value=[]),
        "event_source_mappings[2].source.streams",
        "must not be empty",
    ),
    (
        "empty bootstrap server entry",
        put(*M0, "source", "bootstrap_servers", value="a:9092,,b:9092"),
        "event_source_mappings[0].source.bootstrap_servers",
        "comma-separated list of host:port",
    ),
    (
        "client_config sets group.id",
        put(*M0, "source", "client_config", value={"group.id": "g"}),
        'event_source_mappings[0].source.client_config["group.id"]',
        "set consumer_group_id instead",
    ),
    (
        "client_config value not a scalar",
        put(*M0, "source", "client_config", value={"debug": ["all"]}),
        "event_source_mappings[0].source.client_config.debug",
        "must be a string, number or boolean",
    ),
    (
        "AT_TIMESTAMP without timestamp",
        put(*M0, "source", "starting_position", value="AT_TIMESTAMP"),
        "event_source_mappings[0].source.starting_position_timestamp",
        "is required with starting_position AT_TIMESTAMP",
    ),
    (
        "timestamp without AT_TIMESTAMP",
        put(*M2, "source", "starting_position_timestamp", value=1_700_000_000_000),
        "event_source_mappings[2].source.starting_position_timestamp",
        "only allowed with starting_position AT_TIMESTAMP",
    ),
    (
        "timestamp not a time",
        both(
            put(*M0, "source", "starting_position", value="AT_TIMESTAMP"),
            put(*M0, "source", "starting_position_timestamp", value="yesterday"),
        ),
        "event_source_mappings[0].source.starting_position_timestamp",
        "ISO-8601 time or epoch milliseconds (got 'yesterday')",
    ),
    (
        "timestamp in seconds",
        both(
            put(*M0, "source", "starting_position", value="AT_TIMESTAMP"),
            put(*M0, "source", "starting_position_timestamp", value=1_700_000_000),
        ),
        "event_source_mappings[0].source.starting_position_timestamp",
        "looks like seconds",
    ),
    (
        "bad URL scheme",
        put(*M1, "source", "url", value="http://guest:s3cret@localhost/"),
        "event_source_mappings[1].source.url",
        "bad URL: scheme must be amqp:// or amqps:// (got 'http://guest:***@localhost/')",
    ),
    (
        "URL without host",
        put(*M1, "source", "url", value="amqp://guest:s3cret@/vhost"),
        "event_source_mappings[1].source.url",
        "bad URL: no host",
    ),
    (
        "bad redis URL",
        put(*M2, "source", "url", value="localhost:6379"),
        "event_source_mappings[2].source.url",
        "bad URL: scheme must be redis://, rediss:// or unix://",
    ),
    (
        "bad port",
        put(*M2, "source", "url", value="redis://localhost:port/0"),
        "event_source_mappings[2].source.url",
        "bad URL",
    ),
    (
        "claim_idle_s zero",
        put(*M2, "source", "claim_idle_s", value=0),
        "event_source_mappings[2].source.claim_idle_s",
        "must be greater than 0",
    ),
    (
        "prefetch_count zero",
        put(*M1, "source", "prefetch_count", value=0),
        "event_source_mappings[1].source.prefetch_count",
        "between 1 and 65535",
    ),
    (
        "bad response type",
        put(*M0, "function_response_types", value=["ReportBatchItemFailure"]),
        "event_source_mappings[0].function_response_types[0]",
        "must be 'ReportBatchItemFailures'",
    ),
    (
        "bad filter pattern JSON",
        put(*M0, "filter_criteria", value={"filters": [{"pattern": '{"value": '}]}),
        "event_source_mappings[0].filter_criteria.filters[0].pattern",
        "not valid JSON",
    ),
    (
        "bad filter operator",
        put(
            *M0,
            "filter_criteria",
            value={"filters": [{"pattern": "{}"}, {"pattern": {"value": [{"regex": "x"}]}}]},
        ),
        "event_source_mappings[0].filter_criteria.filters[1].pattern",
        "unknown operator 'regex'",
    ),
    (
        "bad destination type",
        put(*M0, "destination_config", value={"on_failure": {"type": "kinesis", "queue": "q"}}),
        "event_source_mappings[0].destination_config.on_failure.type",
        "must be one of 'file', 'kafka', 'rabbitmq', 'redis', 'sqs' (got 'kinesis')",
    ),
    (
        "destination without on_failure",
        put(*M0, "destination_config", value={}),
        "event_source_mappings[0].destination_config.on_failure",
        "is required",
    ),
    (
        "msk event source arn that is not a cluster arn",
        put(
            *M0, "source", "event_source_arn", value="arn:aws:kafka:us-east-1:123456789012:topic/t"
        ),
        "event_source_mappings[0].source.event_source_arn",
        "must be an Amazon MSK cluster ARN, arn:aws:kafka:<region>:<account>:cluster/<name>/<uuid>"
        " (got 'arn:aws:kafka:us-east-1:123456789012:topic/t')",
    ),
    (
        "kafka destination without cluster",
        put(*M2, "destination_config", value={"on_failure": {"type": "kafka", "topic": "dlq"}}),
        "event_source_mappings[2].destination_config.on_failure.bootstrap_servers",
        "is required when the source is not kafka (it is redis)",
    ),
    (
        "kafka destination is the source topic",
        put(*M0, "destination_config", value={"on_failure": {"type": "kafka", "topic": "t"}}),
        "event_source_mappings[0].destination_config.on_failure.topic",
        "must not be a topic the mapping reads ('t')",
    ),
    (
        "rabbitmq destination without routing key",
        put(
            *M1,
            "destination_config",
            value={"on_failure": {"type": "rabbitmq", "url": "amqp://localhost"}},
        ),
        "event_source_mappings[1].destination_config.on_failure.routing_key",
        "is required",
    ),
    (
        "metrics port out of range",
        put("metrics", value={"port": 70000}),
        "metrics.port",
        "between 0 and 65535 (got 70000)",
    ),
    (
        "memory source partitions",
        put(*M0, "source", value={"type": "memory", "partitions": 0}),
        "event_source_mappings[0].source.partitions",
        "must be at least 1 (got 0)",
    ),
    (
        "maximum concurrency below Lambda's range",
        put(*M1, "scaling_config", value={"maximum_concurrency": 1}),
        "event_source_mappings[1].scaling_config.maximum_concurrency",
        "must be between 2 and 1000 (got 1)",
    ),
    (
        "maximum concurrency above Lambda's range",
        put(*M1, "scaling_config", value={"maximum_concurrency": 1001}),
        "event_source_mappings[1].scaling_config.maximum_concurrency",
        "must be between 2 and 1000 (got 1001)",
    ),
    (
        "maximum concurrency missing",
        put(*M1, "scaling_config", value={}),
        "event_source_mappings[1].scaling_config.maximum_concurrency",
        "is required",
    ),
    (
        "maximum concurrency in Lambda's spelling",
        put(*M1, "scaling_config", value={"MaximumConcurrency": 5}),
        "event_source_mappings[1].scaling_config.MaximumConcurrency",
        "unknown key",
    ),
    (
        "maximum concurrency below the pollers",
        both(
            put(*M1, "pollers", value=3),
            put(*M1, "scaling_config", value={"maximum_concurrency": 2}),
        ),
        "event_source_mappings[1].scaling_config.maximum_concurrency",
        "must be at least pollers (3): each poller runs at least one batch at a time (got 2)",
    ),
]


def write(tmp_path: Path, doc: Any, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={} if environ is None else environ)
    return str(caught.value).splitlines()


def test_base_is_valid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE, "good.yaml"), environ={})
    assert [m.name for m in config.event_source_mappings] == ["k", "r", "s"]


@pytest.mark.parametrize(("change", "path", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_configuration(tmp_path: Path, change: Mutation, path: str, words: str) -> None:
    doc = copy.deepcopy(BASE)
    change(doc)
    file = write(tmp_path, doc)
    lines = error_lines(file)
    prefix = f"{file}: {path}: "
    matching = [line for line in lines if line.startswith(prefix)]
    assert matching, f"no error at {path!r} in:\n" + "\n".join(lines)
    assert any(words in line for line in matching), "\n".join(lines)
    assert all(line.startswith(f"{file}: ") for line in lines)
    assert "s3cret" not in "\n".join(lines)


def test_all_errors_are_listed_one_per_line(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    put(*M0, "batch_size", value=0)(doc)
    put(*ORDERS, "timeout_s", value=0)(doc)
    put(*M2, "name", value="k")(doc)
    put("surprise", value=True)(doc)
    file = write(tmp_path, doc)
    lines = error_lines(file)
    assert sorted(lines) == sorted(
        [
            f"{file}: functions.orders.timeout_s: must be greater than 0 and at most 900 (got 0)",
            f"{file}: event_source_mappings[0].batch_size: must be between 1 and 10000 (got 0)",
            f"{file}: surprise: unknown key (known keys: functions, event_source_mappings,"
            " metrics)",
            f"{file}: event_source_mappings[2].name: duplicate mapping name 'k'"
            " (also event_source_mappings[0])",
        ]
    )


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    file = write(tmp_path, "functions:\n  orders:\n    handler: [a:b\n")
    (line,) = error_lines(file)
    assert line.startswith(f"{file}: line 4, column 1: invalid YAML:")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    file = write(tmp_path, "functions: {}\nfunctions: {}\n")
    (line,) = error_lines(file)
    assert line == f"{file}: line 2, column 1: invalid YAML: duplicate key 'functions'"


@pytest.mark.parametrize(
    ("text", "what"),
    [("", "the configuration is empty"), ("- a\n", "the configuration is a list, not a mapping")],
)
def test_not_a_mapping(tmp_path: Path, text: str, what: str) -> None:
    file = write(tmp_path, text)
    assert error_lines(file)[0].startswith(f"{file}: {what}")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    (line,) = error_lines(missing)
    assert line.startswith(f"{missing}: cannot read the file:")


# ----------------------------------------------------------------------------------------------
# Environment substitution

MINIMAL = """\
functions:
  f: {handler: "m:f"}
event_source_mappings:
  - name: m
    function: f
    source: {type: memory}
"""


def with_mapping(**fields: str) -> str:
    return MINIMAL + "".join(f"    {key}: {value}\n" for key, value in fields.items())


def test_example_loads_with_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    kafka, rabbit, redis = (m.source for m in config.event_source_mappings)
    assert isinstance(kafka, KafkaSource)
    assert kafka.bootstrap_servers == "localhost:9092"
    assert kafka.consumer_group_id == "orders-from-kafka"
    assert isinstance(rabbit, RabbitMQSource)
    assert rabbit.url == "amqp://guest:guest@localhost:5672/%2F"
    assert rabbit.virtual_host == "/"
    assert isinstance(redis, RedisSource)
    assert redis.url == "redis://localhost:6379/0"
    assert config.functions["orders"].environment == {"LOG_LEVEL": "INFO"}
    assert config.functions["orders"].spec("orders").region == "us-east-1"
    assert config.metrics.port == 9464
    assert config.warnings() == []


def test_example_takes_the_environment() -> None:
    environ = {
        "KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
        "RABBITMQ_URL": "amqps://app:pw@mq.internal/prod",
        "REDIS_URL": "rediss://:pw@cache:6380/2",
        "METRICS_PORT": "9100",
    }
    config = load_config(EXAMPLE, environ=environ)
    kafka, rabbit, redis = (m.source for m in config.event_source_mappings)
    assert isinstance(kafka, KafkaSource) and kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert isinstance(rabbit, RabbitMQSource) and rabbit.virtual_host == "prod"
    assert isinstance(redis, RedisSource) and redis.url == "rediss://:pw@cache:6380/2"
    assert config.metrics.port == 9100


def test_function_region_reaches_the_spec() -> None:
    text = MINIMAL.replace('"m:f"}', '"m:f", region: eu-central-1}')
    config = parse_config(text, "x.yaml", {})
    assert config.functions["f"].spec("f").region == "eu-central-1"
    assert parse_config(MINIMAL, "x.yaml", {}).functions["f"].spec("f").region == "us-east-1"


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${Q}", {"Q": "orders"}, "orders"),
        ("${Q:-fallback}", {}, "fallback"),
        ("${Q:-fallback}", {"Q": ""}, "fallback"),
        ("${Q:-fallback}", {"Q": "set"}, "set"),
        ("${Q:-}x", {}, "x"),
        ("${Q}", {"Q": ""}, ""),
        ("pre-${A}-${B:-b}-post", {"A": "a"}, "pre-a-b-post"),
        ("$${Q}", {"Q": "no"}, "${Q}"),
        ("cost: $5 #{x} ${Q}", {"Q": "'quoted: # [yaml]'"}, "cost: $5 #{x} 'quoted: # [yaml]'"),
    ],
)
def test_substitution(value: str, environ: dict[str, str], expected: str) -> None:
    text = MINIMAL.replace('"m:f"}', f'"m:f", environment: {{V: {json.dumps(value)}}}}}')
    config = parse_config(text, "x.yaml", environ)
    assert config.functions["f"].environment == {"V": expected}


def test_whole_scalar_is_coerced_to_the_field_type() -> None:
    text = with_mapping(batch_size="${BATCH}", enabled="${ON:-false}", pollers="'3'")
    mapping = parse_config(text, "x.yaml", {"BATCH": "250"}).event_source_mappings[0]
    assert (mapping.batch_size, mapping.enabled, mapping.pollers) == (250, False, 3)


def test_substituted_value_is_still_validated() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_mapping(batch_size="${BATCH}"), "x.yaml", {"BATCH": "lots"})
    assert str(caught.value) == (
        "x.yaml: event_source_mappings[0].batch_size: must be an integer (got '${BATCH}')"
    )


def test_missing_variables_are_all_reported() -> None:
    text = MINIMAL.replace("m:f", "${HANDLER}").replace(
        "source: {type: memory}", "source:\n      type: memory\n      topic: ${TOPIC}"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "env.yaml", {})
    assert str(caught.value).splitlines() == [
        "env.yaml: functions.f.handler: environment variable HANDLER is not set"
        " (write ${HANDLER:-default} to give a default)",
        "env.yaml: event_source_mappings[0].source.topic: environment variable TOPIC is not set"
        " (write ${TOPIC:-default} to give a default)",
    ]


def test_malformed_reference() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_mapping(batch_size="${B-1}"), "x.yaml", {})
    assert "x.yaml: event_source_mappings[0].batch_size: malformed reference" in str(caught.value)


def test_substitution_leaves_keys_and_non_strings_alone() -> None:
    text = MINIMAL.replace('{handler: "m:f"}', '{handler: "m:f", environment: {"A": "${A}"}}')
    config = parse_config(text, "x.yaml", {"A": "${B}"})
    # The substituted value is not scanned again.
    assert config.functions["f"].environment == {"A": "${B}"}


# ----------------------------------------------------------------------------------------------
# Defaults


def test_defaults() -> None:
    config = parse_config(
        MINIMAL
        + "  - name: kk\n    function: f\n"
        + "    source: {type: kafka, bootstrap_servers: 'h:9092', topics: [t]}\n"
        + "  - name: rr\n    function: f\n"
        + "    source: {type: rabbitmq, url: 'amqp://h/v%2Fx', queue: q}\n"
        + "  - name: ss\n    function: f\n"
        + "    source: {type: redis, url: 'unix:///run/redis.sock', streams: [s]}\n",
        "x.yaml",
        {},
    )
    function = config.functions["f"]
    assert function.spec("f") == FunctionSpec(name="f", handler="m:f")
    assert (function.timeout_s, function.memory_mb, function.concurrency) == (30.0, 512, 4)
    assert (function.isolation, function.environment) == ("process", {})

    memory, kafka, rabbit, redis = config.event_source_mappings
    assert memory.enabled is True
    assert memory.pollers == 1
    assert memory.batch_size == 100
    assert memory.maximum_batch_bytes == 6291456
    assert memory.maximum_batching_window_s == 0.5
    assert memory.parallelization_factor == 1
    assert memory.bisect_batch_on_function_error is False
    assert memory.maximum_retry_attempts == -1
    assert memory.maximum_record_age_s == -1
    assert memory.function_response_types == []
    assert memory.filter_criteria is None
    assert memory.destination_config is None
    assert memory.source == MemorySource(type="memory", topic="memory", partitions=1)

    assert isinstance(kafka.source, KafkaSource)
    assert kafka.source.consumer_group_id == "kk"
    assert kafka.source.starting_position == "TRIM_HORIZON"
    assert kafka.source.starting_position_timestamp_ms is None
    assert kafka.source.client_config == {}

    assert isinstance(rabbit.source, RabbitMQSource)
    assert rabbit.source.prefetch_count is None
    assert rabbit.source.virtual_host == "v/x"

    assert isinstance(redis.source, RedisSource)
    assert redis.source.consumer_group == "ss"
    assert redis.source.consumer_name == socket.gethostname()
    assert redis.source.claim_idle_s == 60.0
    assert redis.source.partition_key_field is None
    assert redis.source.starting_position == "TRIM_HORIZON"

    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", None)
    assert config.file == "x.yaml"


def test_explicit_group_and_consumer_names_are_kept() -> None:
    text = with_mapping().replace(
        "source: {type: memory}",
        "source: {type: redis, url: 'redis://h', streams: [s], consumer_group: g,"
        " consumer_name: c1}",
    )
    source = parse_config(text, "x.yaml", {}).event_source_mappings[0].source
    assert isinstance(source, RedisSource)
    assert (source.consumer_group, source.consumer_name) == ("g", "c1")


@pytest.mark.parametrize(
    ("written", "ms"),
    [
        ("2024-01-01T00:00:00Z", 1_704_067_200_000),  # unquoted: YAML must not make a datetime
        ("'2024-01-01T01:00:00+01:00'", 1_704_067_200_000),
        ("'2024-01-01 00:00:00.250'", 1_704_067_200_250),  # no offset: UTC
        ("1704067200000", 1_704_067_200_000),
        ("'1704067200000'", 1_704_067_200_000),
    ],
)
def test_at_timestamp(written: str, ms: int) -> None:
    text = with_mapping().replace(
        "source: {type: memory}",
        "source: {type: kafka, bootstrap_servers: h, topics: [t],"
        f" starting_position: AT_TIMESTAMP, starting_position_timestamp: {written}}}",
    )
    source = parse_config(text, "x.yaml", {}).event_source_mappings[0].source
    assert isinstance(source, KafkaSource)
    assert source.starting_position_timestamp_ms == ms


def test_kafka_destination_defaults_to_the_source_cluster() -> None:
    text = with_mapping(destination_config="{on_failure: {type: kafka, topic: dlq}}").replace(
        "source: {type: memory}",
        "source: {type: kafka, bootstrap_servers: 'h:9093', topics: [t],"
        " client_config: {security.protocol: SSL}}",
    )
    mapping = parse_config(text, "x.yaml", {}).event_source_mappings[0]
    assert mapping.destination_config is not None
    destination = mapping.destination_config.on_failure
    assert isinstance(destination, KafkaDestination)
    assert destination.bootstrap_servers == "h:9093"
    assert destination.client_config == {"security.protocol": "SSL"}


def test_filter_pattern_may_be_a_mapping() -> None:
    text = with_mapping(filter_criteria="{filters: [{pattern: {value: {kind: [order]}}}]}")
    criteria = parse_config(text, "x.yaml", {}).event_source_mappings[0].filter_criteria
    assert criteria is not None
    assert json.loads(criteria.filters[0].pattern) == {"value": {"kind": ["order"]}}


def test_mapping_lookup() -> None:
    config = config_from_dict(copy.deepcopy(BASE), "base.yaml")
    assert config.mapping("r").name == "r"
    with pytest.raises(ConfigError) as caught:
        config.mapping("nope")
    assert str(caught.value) == (
        "base.yaml: event_source_mappings: no mapping named 'nope' (known: 'k', 'r', 's')"
    )


def test_warnings() -> None:
    doc = copy.deepcopy(BASE)
    doc["event_source_mappings"][0]["destination_config"] = {
        "on_failure": {"type": "file", "path": "dlq"}
    }
    doc["event_source_mappings"][0]["maximum_retry_attempts"] = 2
    doc["event_source_mappings"][1]["maximum_record_age_s"] = 60
    # A disabled mapping is warned about too: it can be enabled while running.
    doc["event_source_mappings"][2]["enabled"] = False
    assert config_from_dict(doc).warnings()[0] == (
        "mapping 'r' has no on-failure destination:"
        " records that exhaust their retries will be dropped"
    )
    doc["event_source_mappings"][1]["maximum_record_age_s"] = -1
    assert config_from_dict(doc).warnings()[1:] == [
        "mapping 'r' retries a failing record forever"
        " (maximum_retry_attempts and maximum_record_age_s are both -1)",
        "mapping 's' has no on-failure destination:"
        " records that exhaust their retries will be dropped",
        "mapping 's' retries a failing record forever"
        " (maximum_retry_attempts and maximum_record_age_s are both -1),"
        " holding up the records after it",
    ]


def test_an_sqs_mapping_without_destination_leaves_exhausted_messages_to_the_queue() -> None:
    doc = copy.deepcopy(BASE)
    doc["event_source_mappings"] = [
        {
            "name": "q",
            "function": "orders",
            "source": {"type": "sqs", "queue_url": "https://sqs.eu-west-1.amazonaws.com/1/q"},
        }
    ]
    # Nothing is dropped, so unlimited retries are not "forever" unless the queue has no redrive
    # policy, which the one warning says.
    assert config_from_dict(doc).warnings() == [
        "mapping 'q' has no on-failure destination: records that exhaust their retries are left"
        " to the queue, for its redrive policy to move (without one they are retried forever)"
    ]


def test_validate_connect_warns_when_the_queue_takes_messages_away_before_the_retries_end() -> None:
    from workers.app.wiring import probe_warnings
    from workers.engine.probing import SourceFacts

    def warnings(max_receive_count: int | None, **mapping: Any) -> list[str]:
        doc = {
            "name": "q",
            "function": "orders",
            "source": {"type": "sqs", "queue_url": "https://sqs.eu-west-1.amazonaws.com/1/q"},
            **mapping,
        }
        facts = SourceFacts(max_receive_count, "queue q's redrive policy (maxReceiveCount)")
        return probe_warnings(EventSourceMapping.model_validate(doc), facts)

    letters = {"on_failure": {"type": "file", "path": "dlq"}}
    assert warnings(None, maximum_retry_attempts=3) == []
    assert warnings(4, maximum_retry_attempts=3) == []
    (short,) = warnings(3, maximum_retry_attempts=3)
    assert "is 3, but the mapping tries a failing record up to 4 times" in short
    assert "on-failure destination" not in short
    # -1 with a destination stops at ten retries, as on Lambda: eleven receives.
    (capped,) = warnings(10, destination_config=letters)
    assert "up to 11 times (maximum_retry_attempts 10)" in capped
    assert "before it can reach the on-failure destination" in capped
    # -1 without one: the queue's redrive policy is meant to decide.
    assert warnings(1) == []


def test_maximum_concurrency_is_shared_between_the_pollers() -> None:
    doc = copy.deepcopy(BASE)
    put(*M1, "pollers", value=3)(doc)
    put(*M1, "scaling_config", value={"maximum_concurrency": 8})(doc)
    put(*M1, "parallelization_factor", value=4)(doc)
    config = config_from_dict(doc)
    assert [config.mapping("r").batches_at_once(i) for i in range(3)] == [3, 3, 2]
    assert config.mapping("k").batches_at_once(0) == 0  # no bound beyond the lanes
    assert not any("maximum_concurrency" in w for w in config.warnings())
    # A queue has pollers x parallelization_factor lanes: more concurrency cannot be reached.
    put(*M1, "parallelization_factor", value=2)(doc)
    assert (
        "mapping 'r': scaling_config.maximum_concurrency is 8, but a queue is read by pollers x"
        " parallelization_factor = 6 lane(s), one batch each at a time: raise"
        " parallelization_factor (or pollers) to run more batches at once"
    ) in config_from_dict(doc).warnings()


def test_top_level_x_keys_hold_anchors_and_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text(
        """
x-kafka: &kafka
  type: kafka
  bootstrap_servers: 127.0.0.1:9092
functions:
  f: {handler: "app:handle"}
event_source_mappings:
  - {name: a, function: f, source: {<<: *kafka, topics: [a]}}
  - {name: b, function: f, source: {<<: *kafka, topics: [b]}}
"""
    )
    config = load_config(path)
    topics = []
    for mapping in config.event_source_mappings:
        assert isinstance(mapping.source, KafkaSource)
        topics.append(mapping.source.topics)
    assert topics == [["a"], ["b"]]
    # Elsewhere an unknown key is still an error.
    path.write_text(path.read_text().replace("functions:", "y-extra: 1\nfunctions:"))
    with pytest.raises(ConfigError, match="y-extra"):
        load_config(path)


def test_unlimited_retries_with_a_destination_stop_at_ten_as_on_lambda() -> None:
    from workers.app.wiring import RETRY_CAP_WITH_DESTINATION, policy_of

    doc = copy.deepcopy(BASE)
    doc["event_source_mappings"][0]["maximum_retry_attempts"] = -1
    doc["event_source_mappings"][0]["maximum_record_age_s"] = -1
    doc["event_source_mappings"][0]["destination_config"] = {
        "on_failure": {"type": "file", "path": "dlq"}
    }
    doc["event_source_mappings"][1]["maximum_retry_attempts"] = -1
    config = config_from_dict(doc)

    assert RETRY_CAP_WITH_DESTINATION == 10
    assert policy_of(config.mapping("k")).maximum_retry_attempts == 10
    # Without a destination, -1 keeps its meaning: until success or record age.
    assert policy_of(config.mapping("r")).maximum_retry_attempts == -1
    assert not any("'k' retries a failing record forever" in w for w in config.warnings())


# ----------------------------------------------------------------------------------------------
# Secrets


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:***@localhost:5672/%2F"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "rediss://user:p@ss@cache/0?ssl_cert_reqs=none",
            "rediss://user:***@cache/0?ssl_cert_reqs=none",
        ),
        ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=***"),
        ("amqp://user@localhost/", "amqp://user@localhost/"),
        ("redis://localhost", "redis://localhost"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_repr_hides_credentials() -> None:
    doc = copy.deepcopy(BASE)
    doc["event_source_mappings"][0]["source"]["client_config"] = {"sasl.password": "s3cret"}
    doc["event_source_mappings"][2]["source"]["url"] = "redis://:s3cret@localhost/0"
    doc["event_source_mappings"][2]["destination_config"] = {
        "on_failure": {"type": "redis", "url": "redis://:s3cret@dlq/1", "stream": "dlq"}
    }
    config = config_from_dict(doc)
    for text in (repr(config), str(config), repr(config.event_source_mappings[1].source)):
        assert "s3cret" not in text
    assert "amqp://guest:***@localhost:5672/%2F" in repr(config)
    assert "'sasl.password': '***'" in repr(config)


# ----------------------------------------------------------------------------------------------
# Handlers


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package on sys.path with good and bad handler modules; returns its name."""
    package = tmp_path / "cfg_handlers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text(
        "import os\nTABLE = os.environ['TABLE']\nNOT_CALLABLE = 1\n\n"
        "def handle(event, context):\n    return None\n\n"
        "async def handle_async(event, context):\n    return None\n"
    )
    (package / "regional.py").write_text(
        "import os\nREGION = os.environ['AWS_REGION']\n\n"
        "def handle(event, context):\n    return None\n"
    )
    (package / "broken.py").write_text("import missing_dependency_xyz\n")
    (package / "crashing.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TABLE", raising=False)
    importlib.invalidate_caches()
    yield package.name
    for name in [n for n in sys.modules if n.split(".")[0] == package.name]:
        del sys.modules[name]


@pytest.mark.parametrize("function", ["handle", "handle_async"])
@pytest.mark.parametrize("separator", [":", "."])
def test_check_handler_importable(handlers: str, function: str, separator: str) -> None:
    # "." is how Lambda names a handler (app.lambda_handler): it works unchanged.
    handler = f"{handlers}.good{separator}{function}"
    spec = FunctionSpec(name="f", handler=handler, environment={"TABLE": "t"})
    check_handler(spec, "x.yaml")


def test_check_handler_imports_with_lambdas_variables(
    handlers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that reads AWS_REGION at import (as boto3.client does) validates as it runs.
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    spec = FunctionSpec(name="f", handler=f"{handlers}.regional:handle", region="eu-west-1")
    check_handler(spec, "x.yaml")
    assert sys.modules[f"{handlers}.regional"].REGION == "eu-west-1"
    assert "AWS_REGION" not in os.environ  # applied for the import only


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        ("cfg_handlers.nope:handle", "cannot import 'cfg_handlers.nope': no module named"),
        ("cfg_handlers.good:absent", "module 'cfg_handlers.good' has no attribute 'absent'"),
        ("cfg_handlers.good:NOT_CALLABLE", "is not callable (it is int)"),
        ("cfg_handlers.broken:handle", "importing 'cfg_handlers.broken' failed: ModuleNotFound"),
        ("cfg_handlers.crashing:handle", "failed: RuntimeError: no config"),
        ("cfg_handlers", "must be 'module:function' or Lambda's 'module.function'"),
    ],
)
def test_check_handler_not_importable(handlers: str, handler: str, words: str) -> None:
    spec = FunctionSpec(name="orders", handler=handler, environment={"TABLE": "t"})
    with pytest.raises(ConfigError) as caught:
        check_handler(spec, "x.yaml")
    message = str(caught.value)
    assert message.startswith("x.yaml: functions.orders.handler: "), message
    assert words in message


def test_check_handler_applies_the_function_environment(handlers: str) -> None:
    spec = FunctionSpec(name="f", handler=f"{handlers}.good:handle")
    with pytest.raises(ConfigError, match="KeyError: 'TABLE'"):
        check_handler(spec)


def test_check_handlers_reports_every_function(handlers: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["functions"] = {
        "a": {"handler": f"{handlers}.good:handle", "environment": {"TABLE": "t"}},
        "b": {"handler": f"{handlers}.good:absent"},
        "c": {"handler": f"{handlers}.nope:handle"},
    }
    for mapping in doc["event_source_mappings"]:
        mapping["function"] = "a"
    with pytest.raises(ConfigError) as caught:
        config_from_dict(doc, "h.yaml").check_handlers()
    assert [p.path for p in caught.value.problems] == [
        "functions.b.handler",
        "functions.c.handler",
    ]


# ----------------------------------------------------------------------------------------------
# Schema and errors


def test_schema_file_is_in_sync() -> None:
    committed = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert committed == json_schema(), (
        "config/schema.json is stale; regenerate it with:"
        " .venv/bin/python -m workers.app.config --schema > config/schema.json"
    )


def test_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def test_config_error_pickles() -> None:
    error = ConfigError("x.yaml", [])
    with pytest.raises(ConfigError):
        parse_config("functions: {}\n", "x.yaml", {})
    try:
        parse_config("functions: {}\n", "x.yaml", {})
    except ConfigError as exc:
        error = exc
    copy_ = pickle.loads(pickle.dumps(error))
    assert (str(copy_), copy_.problems) == (str(error), error.problems)


def test_config_model_can_be_built_in_code() -> None:
    config = Config.model_validate(copy.deepcopy(BASE))
    assert config.function_spec("orders").handler == "app.handlers:handle_orders"
    with pytest.raises(ConfigError, match="no function named 'nope' \\(known: 'orders'\\)"):
        config.function_spec("nope")
