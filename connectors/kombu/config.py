"""The `kombu` source settings of a mapping: a kombu transport URL, a queue and the transport's
options."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from workers.engine.settings import NonEmptyStr, Range, SourceSettings, here, show

# Schemes that name kombu's SQS transport: SQS has a connector of its own, with Lambda's SQS
# semantics (visibility, receive counts, redrive policies) that kombu's transport does not keep.
SQS_SCHEMES = ("sqs",)


def transport_name(url: str) -> str:
    """The transport a kombu URL names: its scheme, without a `+driver` part
    ("sqla+postgresql://..." is the `sqla` transport)."""
    return urlsplit(url).scheme.lower().partition("+")[0]


def broker_address(url: str) -> str:
    """host[:port] of a kombu URL for events and messages (never its credentials); "" for the
    transports that have no host (memory://, filesystem://)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    return f"{host}:{port}" if host and port else host


def _check_kombu_url(value: str) -> str:
    shown = show(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise here(f"bad URL: {exc} (got {shown})") from None
    if "://" not in value or not parts.scheme:
        raise here(
            "bad URL: must be a kombu transport URL such as amqp://host:5672//,"
            f" redis://host:6379/0 or memory:// (got {shown})"
        )
    if transport_name(value) in SQS_SCHEMES:
        raise here(
            "sqs:// is not read through kombu: use `type: sqs`, the Amazon SQS source with"
            f" Lambda's SQS semantics (got {shown})"
        )
    return value


KombuUrl = Annotated[str, AfterValidator(_check_kombu_url)]


class KombuSource(SourceSettings):
    """A queue of any kombu transport (amqp://, redis://, memory://, ...)."""

    # Acks settle each message on its own; a message retried in place does not hold up others.
    ordered: ClassVar[bool] = False
    single_unit: ClassVar[bool] = True

    type: Literal["kombu"]
    url: KombuUrl = Field(
        description=(
            "A kombu transport URL: amqp://user:pass@host:5672/vhost, redis://host:6379/0,"
            " memory://, ... (not sqs://: use `type: sqs`)"
        )
    )
    queue: NonEmptyStr
    transport_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "kombu's transport_options for this transport (e.g. visibility_timeout for redis://)"
        ),
    )
    prefetch_count: Annotated[int, Range(1, 65535)] | None = Field(
        default=None,
        description="Unacknowledged messages the transport takes ahead; unset: connector's choice",
    )

    @property
    def transport(self) -> str:
        return transport_name(self.url)
