"""The query parameters pika accepts in an amqp:// URL, checked when the file is validated.

pika reads them only when it connects (`pika.URLParameters`), so a bad one would otherwise pass
`workers validate` and make every poller fail at start. The rules follow pika 1.x's
`URLParameters._set_url_*` setters and `Parameters` property checks; the engine does not import
pika, and tests/unit/test_amqp_url.py holds these rules against pika itself.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit


def _integer(low: int, high: int | None = None) -> Callable[[str], str | None]:
    def check(text: str) -> str | None:
        try:
            value = int(text)
        except ValueError:
            return f"must be an integer (got {text!r})"
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            return f"must be {bounds} (got {value})"
        return None

    return check


def _number(low: float, *, inclusive: bool) -> Callable[[str], str | None]:
    def check(text: str) -> str | None:
        try:
            value = float(text)
        except ValueError:
            return f"must be a number (got {text!r})"
        if math.isnan(value):
            return None  # pika lets NaN through its comparisons
        if value < low or (value == low and not inclusive):
            return f"must be {'at least' if inclusive else 'greater than'} {low:g} (got {text})"
        return None

    return check


def _anything(text: str) -> str | None:
    return None


def _literal_dict(*, none_ok: bool) -> Callable[[str], str | None]:
    # The value is not shown: ssl_options may carry a key file's password.
    def check(text: str) -> str | None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return "must be a Python dict literal, e.g. {'key': 'value'}"
        if value is None and none_ok:
            return None
        if not isinstance(value, dict):
            return "must be a Python dict literal" + (" or None" if none_ok else "")
        return None

    return check


_CHECKS: dict[str, Callable[[str], str | None]] = {
    "blocked_connection_timeout": _number(0, inclusive=True),
    "channel_max": _integer(1, 65535),
    "client_properties": _literal_dict(none_ok=True),
    "connection_attempts": _integer(1),
    "frame_max": _integer(4096, 131072),
    "heartbeat": _integer(0),
    "locale": _anything,
    "retry_delay": _number(-math.inf, inclusive=True),
    "socket_timeout": _number(0, inclusive=False),
    "ssl_options": _literal_dict(none_ok=True),
    "stack_timeout": _number(0, inclusive=False),
    "tcp_options": _literal_dict(none_ok=True),
}


def query_problems(url: str) -> list[str]:
    """What pika would reject in the query of `url` (an amqp:// or amqps:// URL), if anything."""
    problems = []
    # As pika: parse_qs, which drops parameters with blank values.
    for name, values in parse_qs(urlsplit(url).query).items():
        check = _CHECKS.get(name)
        if check is None:
            known = ", ".join(sorted(_CHECKS))
            problems.append(f"unknown URL parameter {name!r} (pika knows: {known})")
            continue
        if len(values) != 1:
            problems.append(f"URL parameter {name} is given {len(values)} times")
            continue
        problem = check(values[0])
        if name == "ssl_options" and problem is None:
            problem = _ssl_options_problem(values[0], urlsplit(url).scheme)
        if problem is not None:
            problems.append(f"URL parameter {name} {problem}")
    return problems


# pika hands these to SSLContext.load_verify_locations, which needs at least one of them.
_CA_KEYS = ("ca_certs", "cafile", "ca_path", "capath", "ca_data", "cadata")


def _ssl_options_problem(text: str, scheme: str) -> str | None:
    options = ast.literal_eval(text)
    if options is None:
        return "must not be None with amqps://" if scheme == "amqps" else None
    if not any(options.get(key) for key in _CA_KEYS):
        return f"must name CA certificates ({', '.join(_CA_KEYS)})"
    return None
