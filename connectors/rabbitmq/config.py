"""The `rabbitmq` source and destination settings of a mapping."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, Field

from connectors.rabbitmq.url import query_problems
from workers.engine.redact import redact_url
from workers.engine.settings import (
    DestinationSettings,
    NonEmptyStr,
    Range,
    SourceSettings,
    here,
    url_checker,
)


def _check_amqp_query(value: str) -> str:
    problems = query_problems(value)
    if problems:
        raise here("bad URL: " + "; ".join(problems))
    return value


AmqpUrl = Annotated[str, url_checker("amqp", "amqps"), AfterValidator(_check_amqp_query)]


class RabbitMQSource(SourceSettings):
    """A RabbitMQ queue; the virtual host comes from the URL's path."""

    ordered: ClassVar[bool] = False  # a requeued message goes back; the others keep flowing
    single_unit: ClassVar[bool] = True

    type: Literal["rabbitmq"]
    url: AmqpUrl = Field(description="amqp://user:pass@host:5672/vhost (amqps:// for TLS)")
    queue: NonEmptyStr
    prefetch_count: Annotated[int, Range(1, 65535)] | None = Field(
        default=None,
        description="Unacknowledged messages the broker sends ahead; unset: connector's choice",
    )

    @property
    def virtual_host(self) -> str:
        # As pika reads it: no path or "/" is the default vhost "/", otherwise the unquoted path.
        path = urlsplit(self.url).path
        return "/" if path in ("", "/") else unquote(path[1:])


class RabbitMQDestination(DestinationSettings):
    """Dead letters published to a RabbitMQ exchange."""

    type: Literal["rabbitmq"]
    url: AmqpUrl
    exchange: str = Field(
        default="", description="'' is the default exchange (routing_key = queue name)"
    )
    routing_key: str
    queue: str = Field(
        default="",
        description=(
            "The queue the letters land in, read by `workers dlq`; default: routing_key when"
            " exchange is '' (the default exchange routes by queue name)"
        ),
    )

    @property
    def letters_queue(self) -> str:
        return self.queue or (self.routing_key if not self.exchange else "")

    def warnings(self, mapping: str) -> list[str]:
        if self.letters_queue:
            return []
        return [
            f"mapping {mapping!r} dead-letters to exchange {self.exchange!r} with no"
            " `queue`: `workers dlq` cannot read those letters back"
        ]

    def where(self) -> str:
        return f"{redact_url(self.url)} queue {self.letters_queue!r}"
