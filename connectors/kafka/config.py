"""The `kafka` source and destination settings of a mapping."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from workers.engine.redact import redact_url
from workers.engine.settings import (
    Bootstrap,
    ClientConfig,
    DestinationSettings,
    Loc,
    NonEmptyStr,
    Positioned,
    SourceSettings,
    here,
    invalid,
)

_KAFKA_OWNED = {
    "bootstrap.servers": "set bootstrap_servers instead",
    "group.id": "set consumer_group_id instead",
    "auto.offset.reset": "set starting_position instead",
    "enable.auto.commit": "offsets are committed by the runtime once records have settled",
    "enable.auto.offset.store": "offsets are committed by the runtime once records have settled",
}

# An Amazon MSK cluster ARN: arn:<partition>:kafka:<region>:<account>:cluster/<name>/<uuid>. The
# partition (aws, aws-cn, aws-us-gov), the 12-digit account and the `cluster/` resource are held
# as Lambda holds them; the region is any lowercase name (`local` too, since no AWS call is made
# with it) and the cluster id any letters, digits and hyphens (MSK's are a UUID with a `-N`
# suffix). The ARN is only ever shown to the handler, in `eventSourceArn`.
_MSK_CLUSTER_ARN = re.compile(
    r"arn:aws(-[a-z]+)*:kafka:[a-z0-9-]+:[0-9]{12}:cluster/[A-Za-z0-9-]+/[A-Za-z0-9-]+"
)


class KafkaSource(Positioned):
    """A Kafka (or Kafka-protocol) consumer group reading topics."""

    type: Literal["kafka"]
    bootstrap_servers: Bootstrap = Field(description="host:port[,host:port...]")
    topics: list[NonEmptyStr] = Field(min_length=1)
    consumer_group_id: str = Field(default="", description="Default: the mapping's name")
    client_config: ClientConfig = Field(
        default_factory=dict,
        description="librdkafka properties passed as they are (SASL, TLS, session.timeout.ms...)",
    )
    event_source_arn: str | None = Field(
        default=None,
        description="An Amazon MSK cluster ARN: the handler's event is then Lambda's MSK event"
        ' ("eventSource": "aws:kafka", "eventSourceArn": this ARN) instead of the self-managed'
        " Kafka one",
    )

    def complete(self, mapping: str) -> None:
        if not self.consumer_group_id:
            self.consumer_group_id = mapping

    @field_validator("client_config")
    @classmethod
    def _no_owned_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = [
            ((key,), f"cannot be set here: {_KAFKA_OWNED[key]}")
            for key in value
            if key in _KAFKA_OWNED
        ]
        if owned:
            raise invalid(*owned)
        return value

    @field_validator("event_source_arn")
    @classmethod
    def _msk_cluster_arn(cls, value: str | None) -> str | None:
        if value is not None and not _MSK_CLUSTER_ARN.fullmatch(value):
            raise here(
                "must be an Amazon MSK cluster ARN,"
                f" arn:aws:kafka:<region>:<account>:cluster/<name>/<uuid> (got {value!r})"
            )
        return value


class KafkaDestination(DestinationSettings):
    """Dead letters produced to a Kafka topic."""

    type: Literal["kafka"]
    topic: NonEmptyStr
    bootstrap_servers: Bootstrap | None = Field(
        default=None, description="Default: the source's cluster (and its client_config)"
    )
    client_config: ClientConfig = Field(default_factory=dict)

    def complete(self, mapping: str, source: SourceSettings) -> list[tuple[Loc, str]]:
        if self.bootstrap_servers is None:
            if not isinstance(source, KafkaSource):
                return [
                    (
                        ("bootstrap_servers",),
                        f"is required when the source is not kafka (it is {source.type})",
                    )
                ]
            # Same cluster: the source's credentials and TLS settings are needed to reach it.
            self.bootstrap_servers = source.bootstrap_servers
            if not self.client_config:
                self.client_config = dict(source.client_config)
        if (
            isinstance(source, KafkaSource)
            and self.topic in source.topics
            and self.bootstrap_servers == source.bootstrap_servers
        ):
            # Lambda refuses this too: every letter would be read again as a record, in a loop.
            return [
                (
                    ("topic",),
                    f"must not be a topic the mapping reads ({self.topic!r}):"
                    " its letters would be read back as records",
                )
            ]
        return []

    def where(self) -> str:
        return f"{redact_url(self.bootstrap_servers or '')} topic {self.topic!r}"
