"""Live control of a running `workers run`: its `/mappings` endpoints and `workers mappings`.

`GET /mappings` lists each mapping and its state; `POST /mappings/<name>/enable|disable` changes
it. The endpoint only tells the supervisor, which tells the mapping's pollers; each poller's loop
thread acts on it (no other thread talks to a source). With `ESM_CONTROL_TOKEN` set, requests
need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol

import orjson

TOKEN_ENV = "ESM_CONTROL_TOKEN"
_ACTION = re.compile(r"/mappings/([^/]+)/(enable|disable)")
FINAL_STATES = ("Enabled", "Disabled")


class Controlled(Protocol):
    """What the endpoint needs of the supervisor."""

    def states(self) -> dict[str, str]: ...

    def set_enabled(self, mapping: str, enabled: bool) -> str: ...


def control_token() -> str | None:
    """The token requests must carry, or None when the endpoint is open (an empty one too)."""
    return os.environ.get(TOKEN_ENV) or None


def is_control_path(path: str) -> bool:
    return path == "/mappings" or path.startswith("/mappings/")


def respond(
    supervisor: Controlled,
    method: str,
    path: str,
    authorization: str | None,
    token: str | None,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for a request to a control path."""
    if token is not None and not _authorized(authorization, token):
        return 401, {"error": f"unauthorized: send Authorization: Bearer <{TOKEN_ENV}>"}
    if path == "/mappings":
        if method != "GET":
            return 405, {"error": f"{method} {path}: use GET"}
        return 200, {"mappings": [_row(n, s) for n, s in supervisor.states().items()]}
    action = _ACTION.fullmatch(path)
    if action is None:
        return 404, {"error": f"not found: {path}"}
    if method != "POST":
        return 405, {"error": f"{method} {path}: use POST"}
    name = urllib.parse.unquote(action[1])
    try:
        state = supervisor.set_enabled(name, action[2] == "enable")
    except KeyError:
        known = sorted(supervisor.states())
        return 404, {"error": f"no mapping named {name!r}", "mapping": name, "known": known}
    return 200, _row(name, state)


def _authorized(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    # Compared in constant time, so the answer's timing does not tell how much of it matched.
    match = hmac.compare_digest(given.strip().encode(), token.encode())
    return scheme.lower() == "bearer" and match


def _row(name: str, state: str) -> dict[str, Any]:
    return {"name": name, "state": state}


# --- the client: `workers mappings` --------------------------------------------------------------


class ControlError(Exception):
    """A request that failed, with the exit code `workers mappings` ends with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def call(url: str, method: str, path: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The endpoint's JSON answer; raises ControlError with a message for the user."""
    base = url.rstrip("/")
    if not re.match(r"https?://", base):
        raise ControlError(f"--url {url!r}: expected http://HOST:PORT", 2)
    data = b"" if method == "POST" else None
    request = urllib.request.Request(base + path, method=method, data=data)
    token = control_token()
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return _json(answer.read())
    except urllib.error.HTTPError as exc:
        body = _json(exc.read())
        if exc.code == 401:
            hint = "wrong token" if token else f"set {TOKEN_ENV} to the instance's token"
            raise ControlError(f"{base} refused the request: unauthorized ({hint})") from None
        if exc.code == 404 and "known" in body:
            known = ", ".join(body["known"]) or "none"
            message = f"no mapping named {body.get('mapping')!r} at {base} (known: {known})"
            raise ControlError(message, 2) from None
        if exc.code == 404:
            raise ControlError(f"{base} has no /mappings endpoint (is it `workers run`?)") from None
        raise ControlError(f"{base}{path}: HTTP {exc.code} {body.get('error', '')}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ControlError(f"cannot reach {base}: {reason}") from None
    except ValueError as exc:  # urllib's own refusals of a URL it cannot use
        raise ControlError(f"--url {url!r}: {exc}", 2) from None


def _json(data: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def add_parser(sub: Any) -> None:
    mappings = sub.add_parser(
        "mappings",
        help="list, enable and disable the mappings of a running instance",
        description=(
            "Talk to a running `workers run` through its metrics port. A disabled mapping stops"
            " polling; invocations running finish and its position is kept, so an enable"
            " resumes exactly there. Sends $ESM_CONTROL_TOKEN as a bearer token when set."
        ),
    )
    msub = mappings.add_subparsers(title="mappings commands", metavar="MAPPINGS_COMMAND")
    msub.required = True

    def url(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            required=True,
            metavar="URL",
            help="the instance's metrics endpoint, e.g. http://127.0.0.1:9090",
        )

    lst = msub.add_parser(
        "list",
        help="one line per mapping: its name and state",
        description=(
            "Print a line per mapping of the instance: its name and its state (Enabled,"
            " Enabling, Disabling, Disabled)."
        ),
    )
    url(lst)
    lst.set_defaults(command=cmd_list)
    for verb, what in (("enable", "start polling again"), ("disable", "stop polling")):
        p = msub.add_parser(
            verb,
            help=f"{what} (Enabling/Disabling until every poller did)",
            description=(
                f"{what.capitalize()} on every poller of the mapping and print its state:"
                f" {verb.capitalize()}d once every poller has, {verb.capitalize()[:-1]}ing until"
                " then. Unknown mappings exit 2, an unreachable instance 1."
            ),
        )
        p.add_argument("name", help="the mapping's name")
        url(p)
        p.add_argument(
            "--wait",
            type=float,
            metavar="SECONDS",
            help=f"wait up to SECONDS for the mapping to be {verb}d (exit 1 if it is not)",
        )
        p.set_defaults(command=cmd_switch, enable=verb == "enable")


def _print_rows(rows: list[dict[str, Any]]) -> None:
    width = max((len(str(r["name"])) for r in rows), default=0)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']}")


def _guarded(run: Any, args: argparse.Namespace) -> int:
    try:
        code: int = run(args)
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return code


def cmd_list(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        _print_rows(call(args.url, "GET", "/mappings").get("mappings", []))
        return 0

    return _guarded(run, args)


def cmd_switch(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        verb = "enable" if args.enable else "disable"
        path = f"/mappings/{urllib.parse.quote(args.name, safe='')}/{verb}"
        row = call(args.url, "POST", path)
        want = "Enabled" if args.enable else "Disabled"
        if args.wait is not None:
            deadline = time.monotonic() + args.wait
            while row.get("state") != want and time.monotonic() < deadline:
                time.sleep(0.2)
                rows = call(args.url, "GET", "/mappings").get("mappings", [])
                row = next((r for r in rows if r.get("name") == args.name), row)
        _print_rows([row])
        if args.wait is not None and row.get("state") != want:
            print(f"error: {args.name} is not {want} after {args.wait:g}s", file=sys.stderr)
            return 1
        return 0

    return _guarded(run, args)
