"""A template's `AWS::Lambda::EventSourceMapping` resources as mappings of the native format.

Each CloudFormation property becomes the native key Lambda users know in snake_case; the source
comes from the template (Kafka bootstrap servers, topics, queues, consumer group ids) completed
by the overrides file's entry for it (where an SQS queue, an MSK cluster or an MQ broker is
here, credentials). Sources that cannot run here (Kinesis, DynamoDB streams, DocumentDB,
ActiveMQ) are named and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from workers.app.sam.intrinsics import Origin, Resolver, TemplateError
from workers.app.sam.overrides import Overrides
from workers.engine.settings import Loc

__all__ = ["Draft", "Skipped", "read_mapping"]

# CloudFormation property -> the mapping's key, for the settings that carry over as they are.
SETTINGS = {
    "BatchSize": "batch_size",
    "MaximumBatchingWindowInSeconds": "maximum_batching_window_s",
    "BisectBatchOnFunctionError": "bisect_batch_on_function_error",
    "MaximumRetryAttempts": "maximum_retry_attempts",
    "MaximumRecordAgeInSeconds": "maximum_record_age_s",
    "ParallelizationFactor": "parallelization_factor",
    "FunctionResponseTypes": "function_response_types",
    "Enabled": "enabled",
}
# Read for the source, the function or the destination.
_READ = {
    "EventSourceArn",
    "SelfManagedEventSource",
    "FunctionName",
    "Topics",
    "Queues",
    "StartingPosition",
    "StartingPositionTimestamp",
    "SelfManagedKafkaEventSourceConfig",
    "AmazonManagedKafkaEventSourceConfig",
    "SourceAccessConfigurations",
    "DestinationConfig",
    "FilterCriteria",
}
# Lambda's defaults where they differ from the native format's (by source kind).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sqs": {"batch_size": 10, "maximum_batching_window_s": 0},
    "kafka": {"batch_size": 100, "maximum_batching_window_s": 0.5},
    "msk": {"batch_size": 100, "maximum_batching_window_s": 0.5},
    "mq": {"batch_size": 100, "maximum_batching_window_s": 0.5},
}
_SOURCE_TYPE = {"sqs": "sqs", "kafka": "kafka", "msk": "kafka", "mq": "rabbitmq"}
_LABEL = {"sqs": "SQS queue", "kafka": "Kafka cluster", "msk": "MSK cluster", "mq": "MQ broker"}
# How a source must be completed by its overrides entry (an example for the message).
_NEEDED = {
    "sqs": "queue_url: http://127.0.0.1:4566/000000000000/QUEUE, endpoint_url: ...",
    "msk": "bootstrap_servers: HOST:PORT",
    "mq": "url: amqp://${USER}:${PASSWORD}@HOST:5672/VHOST",
}
_BY_TYPE = {
    "AWS::SQS::Queue": "sqs",
    "AWS::MSK::Cluster": "msk",
    "AWS::MSK::ServerlessCluster": "msk",
    "AWS::AmazonMQ::Broker": "mq",
    "AWS::Kinesis::Stream": "kinesis",
    "AWS::Kinesis::StreamConsumer": "kinesis",
    "AWS::DynamoDB::Table": "dynamodb",
    "AWS::DocDB::DBCluster": "documentdb",
}
_BY_SERVICE = {
    "sqs": "sqs",
    "kafka": "msk",
    "mq": "mq",
    "kinesis": "kinesis",
    "dynamodb": "dynamodb",
    "rds": "documentdb",
}
_CANNOT = {
    "kinesis": "Kinesis streams cannot be read here",
    "dynamodb": "DynamoDB streams cannot be read here",
    "documentdb": "DocumentDB change streams cannot be read here",
    "activemq": "ActiveMQ brokers cannot be read here (RabbitMQ ones can)",
}


# A SAM event's property names where they differ from the mapping resource's (by event type).
_SAM_NAMES = {
    ("EventSourceArn",): ("Queue", "Stream", "Broker"),
    ("SelfManagedEventSource", "Endpoints", "KafkaBootstrapServers"): ("KafkaBootstrapServers",),
    ("SelfManagedKafkaEventSourceConfig", "ConsumerGroupId"): ("ConsumerGroupId",),
    ("AmazonManagedKafkaEventSourceConfig", "ConsumerGroupId"): ("ConsumerGroupId",),
}


def written_path(where: str, keys: tuple[str | int, ...], event_type: str = "") -> str:
    """The path of a mapping's property as the template writes it: under a SAM event's
    Properties (with SAM's names) or the mapping resource's."""
    if ".Events." in where:
        for long, short in _SAM_NAMES.items():
            if keys[: len(long)] == long:
                index = {"SQS": 0, "MSK": 1, "MQ": 2}.get(event_type, 0) if len(short) > 1 else 0
                keys = (short[index], *keys[len(long) :])
                break
    out = where
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else f".{key}"
    return out


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class Draft:
    """One mapping read from the template, before the native format validates it."""

    name: str
    logical_id: str
    where: str  # the template path of its properties
    function: str
    kind: str
    mapping: dict[str, Any]
    # native key path ("batch_size", "source.url") -> (file or "", template or overrides path)
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)
    access: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Reader:
    def __init__(
        self,
        resolver: Resolver,
        overrides: Overrides,
        logical_id: str,
        name: str,
        where: str,
        event_type: str,
    ) -> None:
        self.event_type = event_type
        self.r = resolver
        self.o = overrides
        self.id = logical_id
        self.name = name
        self.where = where
        self.raw = resolver.resources.properties(logical_id)

    def loc(self, *keys: str | int) -> Loc:
        return self.r.resources.loc(self.id, *keys)

    def origin_of(self, *cfn: str) -> tuple[str, str]:
        return "", written_path(self.where, cfn, self.event_type)

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.raw:
            return default
        return self.r.value(self.raw[key], self.loc(key))

    def read(self, functions: dict[str, str]) -> Draft | Skipped:
        kind, arn, origin = self._kind()
        if kind not in _SOURCE_TYPE:
            what = f" ({arn})" if arn else ""
            reason = _CANNOT.get(kind, "its source cannot be recognised")
            return Skipped(self.name, f"{reason}{what}")
        function = self._function(functions)
        draft = Draft(self.name, self.id, self.where, function, kind, {})
        m = draft.mapping
        m["name"] = self.name
        m["function"] = function
        draft.origins["function"] = self.origin_of("FunctionName")
        m.update(_DEFAULTS[kind])
        for cfn, native in SETTINGS.items():
            if cfn in self.raw:
                m[native] = self.get(cfn)
                draft.origins[native] = self.origin_of(cfn)
        if kind == "sqs" and "maximum_retry_attempts" not in m:
            self._redrive(draft, origin)
        for key in self.raw:
            if key not in SETTINGS and key not in _READ and key != "ScalingConfig":
                draft.not_applied.append(key)
        self._scaling(draft)
        self._filters(draft)
        self._source(draft, kind, arn, origin)
        self._destination(draft)
        return draft

    # --- what the mapping reads ------------------------------------------------------------------

    def _kind(self) -> tuple[str, str | None, Origin | None]:
        if "SelfManagedEventSource" in self.raw:
            return "kafka", None, None
        if "EventSourceArn" not in self.raw:
            raise TemplateError(self.loc(), "has neither EventSourceArn nor SelfManagedEventSource")
        origin = self.r.origin(self.raw["EventSourceArn"], self.loc("EventSourceArn"))
        arn = self.r.text(self.raw["EventSourceArn"], self.loc("EventSourceArn"))
        kind = "unknown"
        if origin is not None and origin.kind == "resource":
            kind = _BY_TYPE.get(self.r.resources.type_of(origin.name), "unknown")
            engine = str(self.r.resources.prop(origin.name, "EngineType", "RABBITMQ")).upper()
            if kind == "mq" and engine != "RABBITMQ":
                kind = "activemq"
        elif arn.startswith("arn:") and arn.count(":") >= 5:
            kind = _BY_SERVICE.get(arn.split(":")[2], "unknown")
        return kind, arn, origin

    def _function(self, functions: dict[str, str]) -> str:
        if "FunctionName" not in self.raw:
            raise TemplateError(self.loc(), "FunctionName is required")
        loc = self.loc("FunctionName")
        node = self.raw["FunctionName"]
        for _ in range(5):  # an alias names a version, which names the function
            origin = self.r.origin(node, loc)
            if origin is None or origin.kind != "resource":
                break
            kind = self.r.resources.type_of(origin.name)
            if kind == "AWS::Lambda::Function":
                return origin.name
            if kind not in ("AWS::Lambda::Alias", "AWS::Lambda::Version"):
                break
            node = self.r.resources.properties(origin.name).get("FunctionName")
            loc = self.r.resources.loc(origin.name, "FunctionName")
        named = self.r.text(self.raw["FunctionName"], self.loc("FunctionName"))
        short = named.split(":function:", 1)[-1].split(":", 1)[0]
        if short in functions:
            return functions[short]
        raise TemplateError(loc, f"names no function of the template ({named!r})")

    def _source(self, draft: Draft, kind: str, arn: str | None, origin: Origin | None) -> None:
        src: dict[str, Any] = {"type": _SOURCE_TYPE[kind]}
        keys = [self.name]
        label = f"{_LABEL[kind]} {arn}" if arn else _LABEL[kind]
        if origin is not None:
            keys.append(origin.name)
            label = f"{_LABEL[kind]} {origin.name}" + (f" ({arn})" if arn else "")
        if arn:
            keys.append(arn)
        if kind == "kafka":
            servers = self._bootstrap(keys)
            src["bootstrap_servers"] = servers
            keys.append(servers)
            draft.origins["source.bootstrap_servers"] = self.origin_of(
                "", "SelfManagedEventSource", "Endpoints", "KafkaBootstrapServers"
            )
        if kind in ("kafka", "msk"):
            self._kafka(draft, src, kind, arn)
        if kind == "mq":
            queues = self.get("Queues") or []
            if not isinstance(queues, list) or len(queues) != 1:
                raise TemplateError(self.loc("Queues"), "must name one queue (as Lambda requires)")
            src["queue"] = queues[0]
            draft.origins["source.queue"] = self.origin_of("Queues")
        for access in self.get("SourceAccessConfigurations") or []:
            if isinstance(access, dict):
                uri = access.get("URI", "")
                draft.access.append(f"{access.get('Type', '?')} {uri}".strip())
        found = self.o.entry("sources", keys)
        if found is None:
            if kind in _NEEDED:
                raise TemplateError(
                    self.loc("EventSourceArn"),
                    f"{label}: the overrides file needs an entry saying where it is here"
                    f" (sources: {{{keys[1] if len(keys) > 1 else keys[0]}: {{{_NEEDED[kind]}}}}};"
                    f" keyed by {' or '.join(repr(k) for k in keys)})",
                )
        else:
            key, entry = found
            if entry.get("type", src["type"]) != src["type"]:
                src = {}  # another kind of source here: the entry says everything
            src.update(entry)
            for setting in entry:
                draft.origins[f"source.{setting}"] = (self.o.file, f"sources.{key}.{setting}")
        draft.mapping["source"] = src

    def _bootstrap(self, keys: list[str]) -> str:
        endpoints = self.raw["SelfManagedEventSource"]
        loc = self.loc("SelfManagedEventSource", "Endpoints", "KafkaBootstrapServers")
        written = (
            endpoints.get("Endpoints", {}).get("KafkaBootstrapServers")
            if isinstance(endpoints, dict) and isinstance(endpoints.get("Endpoints"), dict)
            else None
        )
        if written is None:
            raise TemplateError(loc, "is required for a self-managed Kafka source")
        for item in written if isinstance(written, list) else [written]:
            origin = self.r.origin(item, loc)
            if origin is not None:
                keys.append(origin.name)
        servers = self.r.value(written, loc)
        servers = servers if isinstance(servers, list) else [servers]
        return ",".join(str(s) for s in servers)

    def _kafka(self, draft: Draft, src: dict[str, Any], kind: str, arn: str | None) -> None:
        src["topics"] = self.get("Topics")
        draft.origins["source.topics"] = self.origin_of("Topics")
        config = (
            "SelfManagedKafkaEventSourceConfig"
            if kind == "kafka"
            else "AmazonManagedKafkaEventSourceConfig"
        )
        group = (self.get(config) or {}).get("ConsumerGroupId")
        if group:
            src["consumer_group_id"] = group
            draft.origins["source.consumer_group_id"] = self.origin_of(
                "", config, "ConsumerGroupId"
            )
        if "StartingPosition" in self.raw:
            src["starting_position"] = self.get("StartingPosition")
            draft.origins["source.starting_position"] = self.origin_of("StartingPosition")
        if "StartingPositionTimestamp" in self.raw:
            # CloudFormation's is in seconds; the native format's in milliseconds.
            seconds = self.get("StartingPositionTimestamp")
            try:
                src["starting_position_timestamp"] = round(float(seconds) * 1000)
            except (TypeError, ValueError):
                raise TemplateError(
                    self.loc("StartingPositionTimestamp"),
                    f"must be a number of seconds (got {seconds!r})",
                ) from None
            draft.origins["source.starting_position_timestamp"] = self.origin_of(
                "", "StartingPositionTimestamp"
            )
        if kind == "msk" and arn:
            src["event_source_arn"] = arn

    # --- settings --------------------------------------------------------------------------------

    def _scaling(self, draft: Draft) -> None:
        if "ScalingConfig" not in self.raw:
            return
        scaling = self.get("ScalingConfig") or {}
        if "MaximumConcurrency" in scaling:
            draft.mapping["scaling_config"] = {"maximum_concurrency": scaling["MaximumConcurrency"]}
            draft.origins["scaling_config"] = self.origin_of("ScalingConfig")

    def _filters(self, draft: Draft) -> None:
        criteria = self.get("FilterCriteria")
        if not isinstance(criteria, dict):
            return
        filters = criteria.get("Filters") or []
        draft.mapping["filter_criteria"] = {
            "filters": [{"pattern": f.get("Pattern")} for f in filters if isinstance(f, dict)]
        }
        draft.origins["filter_criteria"] = self.origin_of("FilterCriteria", "Filters")

    def _destination(self, draft: Draft) -> None:
        config = self.raw.get("DestinationConfig")
        if not isinstance(config, dict) or not isinstance(config.get("OnFailure"), dict):
            return
        written = config["OnFailure"].get("Destination")
        loc = self.loc("DestinationConfig", "OnFailure", "Destination")
        if written is None:
            return
        origin = self.r.origin(written, loc)
        value = self.r.text(written, loc)
        keys = ([origin.name] if origin else []) + [value]
        where = self.origin_of("DestinationConfig", "OnFailure", "Destination")
        destination: dict[str, Any] = {}
        if value.startswith("kafka://"):
            # Lambda's Kafka topic destination: a topic of the source's cluster.
            destination = {"type": "kafka", "topic": value.removeprefix("kafka://")}
        found = self.o.entry("destinations", keys)
        if found is not None:
            key, entry = found
            if entry.get("type", destination.get("type")) != destination.get("type"):
                destination = {}
            destination.update(entry)
            where = (self.o.file, f"destinations.{key}")
        elif not destination:
            raise TemplateError(
                loc,
                f"the on-failure destination {value}: the overrides file needs an entry saying"
                f" where letters go here (destinations: {{{keys[0]}: {{type: file, path:"
                f" ./dead-letters}}}}; keyed by {' or '.join(repr(k) for k in keys)})",
            )
        draft.mapping["destination_config"] = {"on_failure": destination}
        draft.origins["destination_config.on_failure"] = where

    def _redrive(self, draft: Draft, origin: Origin | None) -> None:
        """Lambda has no retry limit for SQS: the queue's redrive policy decides. A message is
        invoked maxReceiveCount times before SQS moves it to the dead-letter queue."""
        if origin is None or self.r.resources.type_of(origin.name) != "AWS::SQS::Queue":
            return
        policy = self.r.resources.prop(origin.name, "RedrivePolicy")
        if isinstance(policy, str):
            try:
                policy = json.loads(policy)
            except ValueError:
                return
        count = policy.get("maxReceiveCount") if isinstance(policy, dict) else None
        if count is None:
            return
        try:
            retries = max(0, int(count) - 1)
        except (TypeError, ValueError):
            return
        draft.mapping["maximum_retry_attempts"] = retries
        draft.notes.append(
            f"{self.name}: maximum_retry_attempts {retries}, from {origin.name}'s redrive"
            f" policy (maxReceiveCount {count})"
        )


def read_mapping(
    resolver: Resolver,
    overrides: Overrides,
    logical_id: str,
    *,
    name: str,
    where: str,
    event_type: str = "",
    functions: dict[str, str],
) -> Draft | Skipped:
    """One `AWS::Lambda::EventSourceMapping` resource. `functions` maps the template's function
    names (physical and logical) to logical ids; `where` and `event_type` say where the
    template writes it (a SAM event's Properties, or the resource's own)."""
    reader = _Reader(resolver, overrides, logical_id, name, where, event_type)
    return reader.read(functions)
