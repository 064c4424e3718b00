"""`workers rewind`: move a stopped mapping's consumer group on its source, to replay records
from a time, from the oldest the source holds, or to skip to the end.

The connector does the broker's part (`workers.engine.rewind.Rewinder`); this module refuses
what cannot be done safely, prints each unit's position now and after, and applies.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from workers.app.config import ConfigError
from workers.app.loader import CONFIG_HELP, add_template_options, load
from workers.engine.ports import ConnectorConfigError
from workers.engine.redact import describe
from workers.engine.rewind import Move, Rewinder, RewindRefused, RewindTarget
from workers.engine.settings import timestamp_ms

log = logging.getLogger("workers.rewind")

# Exit codes: refused (nothing changed, nothing to retry as it is) and failed (the broker).
REFUSED = 2
FAILED = 1


def add_parser(sub: Any, epilog: str) -> None:
    rewind = sub.add_parser(
        "rewind",
        help="replay from the source: move a mapping's consumer group",
        description=(
            "Move MAPPING's consumer group on its source, so that the next `workers run` reads"
            " from there: --to earliest (the oldest record the source holds), latest (skip"
            " everything not yet read), or a TIME (the first record at or after it). Kafka:"
            " the group's committed offset per partition; Redis Streams: the group's"
            " last-delivered id per stream. Not possible on a queue (RabbitMQ, SQS, kombu)."
            " Refused while the mapping runs. Exit 2 when refused, 1 when the broker failed."
        ),
        epilog=epilog,
    )
    rewind.add_argument("config", help=CONFIG_HELP)
    rewind.add_argument("mapping", help="the mapping whose group to move")
    add_template_options(rewind)
    rewind.add_argument(
        "--to",
        required=True,
        metavar="TIME|earliest|latest",
        help="ISO-8601 (UTC unless it says otherwise) or epoch milliseconds, as"
        " starting_position_timestamp takes it; or earliest, or latest",
    )
    rewind.add_argument(
        "--dry-run", action="store_true", help="show what would change, change nothing"
    )
    rewind.set_defaults(command=cmd_rewind)


def parse_target(text: str) -> RewindTarget:
    """`--to`: earliest, latest, or a time as epoch milliseconds."""
    if text.lower() in ("earliest", "latest"):
        return "earliest" if text.lower() == "earliest" else "latest"
    try:
        return timestamp_ms(text)
    except ValueError as exc:
        raise RewindRefused(f"--to {exc}, or earliest, or latest") from None


def cmd_rewind(args: argparse.Namespace) -> int:
    from workers.app.registry import open_rewinder

    rewinder = None
    try:
        target = parse_target(args.to)
        mapping = load(args.config, args.overrides).config.mapping(args.mapping)
        rewinder = open_rewinder(mapping)
        return _rewind(args, rewinder, target)
    except (ConfigError, ConnectorConfigError, RewindRefused) as exc:
        # Before the broker answered, the error names what is wrong by itself.
        where = "" if rewinder is None else f"rewind {args.mapping}: "
        print(f"error: {where}{exc}", file=sys.stderr)
        return REFUSED
    except Exception as exc:
        log.debug("workers rewind %s failed", args.mapping, exc_info=True)
        print(f"error: rewind {args.mapping}: {describe(exc)}", file=sys.stderr)
        return FAILED
    finally:
        if rewinder is not None:
            rewinder.close()


def _rewind(args: argparse.Namespace, rewinder: Rewinder, target: RewindTarget) -> int:
    running = rewinder.running_consumers()
    if running:
        print(
            f"error: mapping {args.mapping} is running ({'; '.join(running)}): stop it before"
            f" rewinding {rewinder.group_label}. Running means: {rewinder.running_rule}.",
            file=sys.stderr,
        )
        return REFUSED
    moves = rewinder.plan(target)
    shown = args.to if isinstance(target, str) else f"{args.to} ({iso_time(target)})"
    print(f"mapping {args.mapping}, {rewinder.group_label}: rewind to {shown}")
    _print_moves(moves)
    moving = sum(1 for m in moves if m.changes)
    if args.dry_run:
        print(f"dry run: {moving} of {len(moves)} would move; nothing changed")
        return 0
    # Checked again right before changing anything: the plan may have taken a while.
    running = rewinder.running_consumers()
    if running:
        raise RewindRefused(f"the mapping started meanwhile ({'; '.join(running)})")
    rewinder.apply(moves)
    print(f"rewound: {moving} of {len(moves)} moved; the next `workers run` reads from there")
    return 0


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _print_moves(moves: list[Move]) -> None:
    width = max((len(m.unit) for m in moves), default=0)
    for move in moves:
        same = "" if move.changes else "  (unchanged)"
        print(f"  {move.unit.ljust(width)}  {move.current} -> {move.new}{same}")
        if move.note:
            print(f"  {' ' * width}  {move.note}")
