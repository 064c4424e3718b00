"""One rule for keeping secrets out of anything shown: URLs, client settings, error descriptions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# Client settings (librdkafka's sasl.password, ssl.key.password, ...) and URL query parameters
# whose values are secrets.
_SECRET_NAME = re.compile(r"pass|secret|token|jaas|credential|private|\.pem$", re.IGNORECASE)
# A run of text that may be a URL or a host list: anything up to whitespace or a quote.
_TOKEN = re.compile(r"[^\s'\"`]+")
# `name=value` pairs, as in a URL's query or a `key=value` in a driver's message.
_PARAM = re.compile(r"(^|[?&;])([^=&;?#]*)=([^&;#]*)")


def is_secret_name(name: str) -> bool:
    """Whether a client setting or query parameter called `name` holds a secret."""
    return bool(_SECRET_NAME.search(name))


def redact_text(text: str) -> str:
    """`text` with the password of everything URL-like in it masked, whether or not it parses
    as a URL (`amqps//user:pw@host`, `user:pw@host`), and the values of secret-looking
    `name=value` parameters.

    The userinfo is taken up to the last `@` before any `?` or `#`, as URL parsers do, so a
    password holding `@` or `/` is masked whole; what that may also mask is never a secret's
    loss, only some of a path.
    """
    if "@" not in text and "=" not in text:
        return text
    return _TOKEN.sub(lambda m: _redact_token(m.group(0)), text)


def _redact_token(token: str) -> str:
    if "@" in token:
        authority = token.find("//")
        start = authority + 2 if authority != -1 and authority < token.rfind("@") else 0
        end = len(token)
        for stop in "?#":
            index = token.find(stop, start)
            if index != -1:
                end = min(end, index)
        at = token.rfind("@", start, end)
        colon = token.find(":", start, at) if at != -1 else -1
        if colon != -1:
            token = f"{token[: colon + 1]}{REDACTED}{token[at:]}"
    if "=" in token:
        token = _PARAM.sub(_redact_param, token)
    return token


def _redact_param(match: re.Match[str]) -> str:
    lead, name, value = match.groups()
    if value and value != REDACTED and is_secret_name(name):
        return f"{lead}{name}={REDACTED}"
    return match.group(0)


def redact_url(url: str) -> str:
    """`url` with its password (and password-like query parameters) replaced by `***`."""
    return redact_text(url)


def redact_client_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Client settings with the values of secret-looking ones replaced by `***`."""
    return {k: REDACTED if is_secret_name(k) else v for k, v in config.items()}


def describe(exc: BaseException) -> str:
    """An exception as one readable line, never empty, with secrets masked.

    `Type: message`; an exception whose str() is empty (pika's connection errors, a bare
    `TimeoutError()`) is shown by its repr, or by its cause, or at least by its type's name.
    """
    name = type(exc).__name__
    text = str(exc).strip()
    if text:
        line = text if text.startswith(f"{name}:") else f"{name}: {text}"
    else:
        shown = repr(exc)
        cause = exc.__cause__ or exc.__context__
        if shown not in (f"{name}()", name):
            line = shown
        elif cause is not None and cause is not exc:
            line = f"{name} (from {describe(cause)})"
        else:
            line = name
    return redact_text(" ".join(line.split()))
