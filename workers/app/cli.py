"""The `workers` command: run mappings, validate configuration, invoke a function locally."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from workers.app.config import Config, ConfigError
from workers.app.control import add_parser as add_mappings_parser
from workers.app.loader import CONFIG_HELP, Loaded, add_template_options, load
from workers.app.rewind import add_parser as add_rewind_parser
from workers.engine.redact import describe

T = TypeVar("T")

log = logging.getLogger("workers")

EPILOG = (
    "Configuration format: see the README (config/example.yaml, config/schema.json). CONFIG may"
    " also be a SAM or CloudFormation template, with --overrides FILE saying where its sources"
    " and destinations are here (docs/coming-from-lambda.md)."
)


def _load(args: argparse.Namespace) -> Loaded:
    return load(args.config, args.overrides, strict=getattr(args, "strict", False))


def main(argv: list[str] | None = None) -> int:
    # Handlers are named 'module:function' relative to where `workers` runs, as Lambda's task root.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    from workers.app.logs import FORMAT_ENV, configure_logging

    # Through the environment, so poller processes log in the same format.
    os.environ[FORMAT_ENV] = args.log_format
    configure_logging(getattr(logging, args.log_level), fmt=args.log_format)
    from workers.engine.ports import ConnectorConfigError

    try:
        code: int = args.command(args)
    except (ConfigError, ConnectorConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # `workers dlq` mostly fails on a destination it cannot reach: that is one line for the
        # user, not a traceback (which --log-level DEBUG still shows).
        if getattr(args, "dlq_command", None) is None:
            raise
        log.debug("workers dlq %s failed", args.dlq_command, exc_info=True)
        where = _destination_label(args)
        print(
            f"error: dlq {args.dlq_command} {args.mapping}{where}: {describe(exc)}",
            file=sys.stderr,
        )
        return 1
    return code


def _destination_label(args: argparse.Namespace) -> str:
    """` (<type> destination <where>)` of the mapping's on-failure destination, if it has one."""
    try:
        mapping = _load(args).config.mapping(args.mapping)
    except ConfigError:
        return ""
    if mapping.destination_config is None:
        return ""
    dst = mapping.destination_config.on_failure
    where = dst.where()
    return f" (on-failure destination {dst.type} {where})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workers",
        description=(
            "Self-hosted event source mappings: read Kafka, RabbitMQ or Redis Streams, batch"
            " records and invoke Lambda-style handlers with retries, bisect and dead letters."
        ),
        epilog=EPILOG,
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("WORKERS_LOG_LEVEL", "INFO").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO, or $WORKERS_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("WORKERS_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="log lines as text or as JSON objects (default: text, or $WORKERS_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run event source mappings until stopped",
        description=(
            "Start one poller process per mapping instance (a mapping's `pollers`). SIGTERM or"
            " SIGINT stops polling, lets in-flight invocations finish, checkpoints and exits 0."
        ),
        epilog=EPILOG,
    )
    run.add_argument("config", help=CONFIG_HELP)
    add_template_options(run, strict=True)
    run.add_argument(
        "--mapping",
        action="append",
        metavar="NAME",
        help="run only this mapping (repeatable; default: every mapping)",
    )
    run.add_argument(
        "--until-idle",
        type=float,
        metavar="SECONDS",
        help="exit once every mapping is assigned, caught up and idle this long",
    )
    run.add_argument(
        "--summary-json",
        metavar="PATH",
        help="write per-mapping counters and last checkpoints here on exit",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz, /readyz and /status on this port (0: any free port)",
    )
    run.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address for the metrics endpoint (default: the config's metrics.host, 127.0.0.1)",
    )
    run.set_defaults(command=cmd_run)

    validate = sub.add_parser(
        "validate",
        help="check a configuration file",
        description=(
            "Parse and validate the file, check that every handler imports, print warnings."
            " With --connect, also connect to every source and check that every on-failure"
            " destination exists and can be written."
        ),
        epilog=EPILOG,
    )
    validate.add_argument("config", help=CONFIG_HELP)
    add_template_options(validate, strict=True)
    validate.add_argument(
        "--connect",
        action="store_true",
        help="also connect to each mapping's source and check its on-failure destination",
    )
    validate.set_defaults(command=cmd_validate)

    invoke = sub.add_parser(
        "invoke",
        help="invoke a function once with an event from a file",
        description=(
            "Run FUNCTION's handler once in an execution environment, like `sam local invoke`,"
            " and print its response as JSON. Exits 1 if the invocation failed."
        ),
        epilog=EPILOG,
    )
    invoke.add_argument("config", help=CONFIG_HELP)
    invoke.add_argument(
        "function", help="a key of `functions` in the file (a template's: its logical id)"
    )
    add_template_options(invoke)
    invoke.add_argument(
        "--event", required=True, metavar="FILE", help="JSON event ('-' reads standard input)"
    )
    invoke.set_defaults(command=cmd_invoke)
    _add_dlq(sub)
    add_rewind_parser(sub, EPILOG)
    add_mappings_parser(sub)
    from workers.app.sam.command import add_sam_parser

    add_sam_parser(sub, EPILOG)

    demo = sub.add_parser(
        "demo",
        help="run a sample stream through an embedded broker",
        description=(
            "Start an embedded Kafka-protocol broker, produce a sample order stream with a few"
            " bad records, run a mapping over it until idle and print a summary."
        ),
        epilog=EPILOG,
    )
    demo.set_defaults(command=cmd_demo)
    return parser


def _add_dlq(sub: Any) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="inspect and replay dead letters",
        description="List, show and replay what a mapping sent to its on-failure destination.",
        epilog=EPILOG,
    )
    dsub = dlq.add_subparsers(title="dlq commands", metavar="DLQ_COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help=CONFIG_HELP)
        p.add_argument("mapping", help="the mapping whose dead letters to read")
        add_template_options(p)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--since",
            metavar="TIME",
            help="only letters written at or after TIME (ISO-8601 or epoch ms)",
        )
        p.add_argument(
            "--error-type",
            metavar="NAME",
            help="only letters whose error type is NAME (e.g. ValueError)",
        )
        p.add_argument("--limit", type=int, metavar="N", help="at most N letters")

    lst = dsub.add_parser(
        "list",
        help="list dead letters not yet replayed",
        description="A line per letter: id, time, condition, error type, records, replays, source.",
    )
    common(lst)
    filters(lst)
    lst.add_argument("--json", action="store_true", help="print JSON Lines instead of a table")
    lst.set_defaults(command=cmd_dlq_list, dlq_command="list")

    show = dsub.add_parser(
        "show",
        help="print one dead letter in full",
        description="The full letter as JSON, each record's payload also decoded (JSON or text).",
    )
    common(show)
    show.add_argument("id", help="the letter's id (its requestContext.requestId)")
    show.set_defaults(command=cmd_dlq_show, dlq_command="show")

    replay = dsub.add_parser(
        "replay",
        help="replay dead letters to the handler or back onto the source",
        description=(
            "Replay the letters pending now. --to handler invokes the mapping's function with the"
            " stored records under its retry policy; --to source publishes them back onto the"
            " source with their keys, headers and a replay header. A letter is marked replayed"
            " once done; records that fail again go back to the destination with their replay"
            " count raised, and are not replayed again in the same run. SIGTERM stops after the"
            " letter in progress; running again resumes."
        ),
    )
    common(replay)
    filters(replay)
    replay.add_argument(
        "--to",
        choices=["handler", "source"],
        default="handler",
        help="where records go (default: handler)",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="show what would be replayed, change nothing"
    )
    replay.add_argument(
        "--rate", type=float, metavar="PER_S", help="at most this many records per second"
    )
    replay.set_defaults(command=cmd_dlq_replay, dlq_command="replay")


def _say_once(loaded: Loaded) -> None:
    for line in loaded.warnings:
        log.warning("%s", line)
    for line in loaded.notes:
        log.info("%s", line)


def _mappings_to_run(config: Config, names: list[str] | None) -> list[tuple[str, int]]:
    # A mapping with `enabled: false` runs too, disabled: `workers mappings enable` starts it.
    chosen = [config.mapping(n) for n in names] if names else config.event_source_mappings
    return [(m.name, i) for m in chosen for i in range(m.pollers)]


def cmd_run(args: argparse.Namespace) -> int:
    from workers.app import metrics
    from workers.app.progress import progress_for_terminal
    from workers.app.supervisor import Supervisor

    loaded = _load(args)
    _say_once(loaded)
    config = loaded.config
    config.check_handlers()
    for warning in config.warnings():
        log.warning("%s", warning)
    instances = _mappings_to_run(config, args.mapping)
    if not instances:
        log.error("no mapping to run")
        return 2
    enabled = {m: config.mapping(m).enabled for m, _ in instances}
    for mapping in sorted(m for m, on in enabled.items() if not on):
        log.info(
            "mapping %s is disabled (enabled: false): not polling until `workers mappings"
            " enable %s`",
            mapping,
            mapping,
        )
    longest = max(config.function_spec(config.mapping(m).function).timeout_s for m, _ in instances)
    supervisor = Supervisor(
        args.config,
        instances,
        until_idle_s=args.until_idle,
        drain_timeout_s=longest + 30.0,
        log_level=logging.getLogger().level,
        enabled=enabled,
        overrides_path=args.overrides,
    )
    supervisor.install_signal_handlers()
    port = args.metrics_port if args.metrics_port is not None else config.metrics.port
    if port is not None:
        host = args.metrics_host or config.metrics.host
        server = metrics.serve(supervisor, host, port)
        log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    progress = progress_for_terminal()
    try:
        code = supervisor.run(on_tick=progress)
    finally:
        progress.close()
        if args.summary_json:
            supervisor.write_summary(args.summary_json)
    for mapping, counts in supervisor.summary().items():
        log.info(
            "mapping %s: polled=%d succeeded=%d dead_lettered=%d dropped=%d throttled=%d",
            mapping,
            counts["polled"],
            counts["succeeded"],
            counts["dead_lettered"],
            counts["dropped"],
            counts["throttled"],
        )
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    config = loaded.config
    config.check_handlers()
    for line in loaded.warnings:
        print(f"warning: {line}")
    for line in loaded.notes:
        print(f"note: {line}")
    for line in loaded.access:
        print(f"access: {line}")
    for warning in config.warnings():
        print(f"warning: {warning}")
    if args.connect:
        from workers.app.registry import probe
        from workers.app.wiring import probe_warnings

        failed = False
        for mapping in config.event_source_mappings:
            try:
                probed = probe(mapping)
            except Exception as exc:
                failed = True
                print(f"{mapping.name}: cannot connect: {describe(exc)}", file=sys.stderr)
            else:
                print(f"{mapping.name}: connected")
                for what in probed.destination:
                    print(f"{mapping.name}: on-failure destination: {what}")
                for warning in probe_warnings(mapping, probed.source):
                    print(f"warning: {warning}")
        if failed:
            return 1
    n = len(config.event_source_mappings)
    print(f"{args.config}: ok ({len(config.functions)} function(s), {n} mapping(s))")
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    from workers.engine.invoker import InvocationRequest
    from workers.engine.outcomes import Success
    from workers.invoke import create_invoker

    config = _load(args).config
    if args.function not in config.functions:
        known = ", ".join(sorted(config.functions))
        print(f"error: no function named {args.function!r} (known: {known})", file=sys.stderr)
        return 2
    raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
    try:
        event: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        print(f"error: {args.event}: not JSON: {exc}", file=sys.stderr)
        return 2
    invoker = create_invoker(config.function_spec(args.function))
    try:
        request = InvocationRequest(str(uuid.uuid4()), mapping_name="", attempt=1)
        result = invoker.invoke(event, request)
    finally:
        invoker.close()
    if isinstance(result, Success):
        sys.stdout.buffer.write(orjson.dumps(result.response, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    print(orjson.dumps(result.error.as_json(), option=orjson.OPT_INDENT_2).decode())
    return 1


def _replay_progress(verb: str) -> Any:
    """A live count of letters and records on a terminal (how many remain is not known)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn(f"{verb} {{task.completed}} letter(s), {{task.fields[records]}} record(s)"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    progress.add_task("replay", total=None, records=0)
    return progress


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.app.demo import run_demo

    return run_demo()


def _letter_filter(args: argparse.Namespace) -> Any:
    from workers.app.dlq import LetterFilter, parse_time

    since = parse_time(args.since) if args.since else None
    return LetterFilter(since_ms=since, error_type=args.error_type)


def _store(args: argparse.Namespace) -> tuple[Config, Any, Any]:
    from workers.app.registry import open_dead_letter_store

    config = _load(args).config
    mapping = config.mapping(args.mapping)
    return config, mapping, open_dead_letter_store(mapping)


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from workers.app.dlq import matching, summary_row

    _, _, store = _store(args)
    rows: list[dict[str, Any]] = []
    pending = 0
    try:
        for stored in matching(store, _letter_filter(args)):
            if args.limit is None or len(rows) < args.limit:
                rows.append(summary_row(stored))
            elif args.json:
                break  # JSON Lines carry no count
            # Past the limit the table's heading still counts them, without decoding them.
            pending += 1
    finally:
        store.close()
    if args.json:
        for row in rows:
            sys.stdout.buffer.write(orjson.dumps(row) + b"\n")
        return 0
    # No borders and nothing cut: ids are what `dlq show` takes; long lines wrap in the terminal.
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "time", "condition", "error", "records", "replays", "source"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        when = str(row["time"]).replace("T", " ").rstrip("Z")[:19]
        table.add_row(*(when if c == "time" else str(row[c]) for c in row))
    console = Console(width=400)
    heading = f"{args.mapping}: {pending} dead letter(s) to replay"
    if len(rows) < pending:
        heading += f", showing the first {len(rows)}"
    console.print(heading, highlight=False)
    if rows:
        console.print(table)
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    from workers.app.dlq import decoded

    _, _, store = _store(args)
    try:
        for stored in store.pending():
            if stored.id == args.id:
                body = orjson.dumps(decoded(stored.letter), option=orjson.OPT_INDENT_2)
                sys.stdout.buffer.write(body + b"\n")
                return 0
    finally:
        store.close()
    print(f"error: no pending dead letter {args.id!r} for mapping {args.mapping}", file=sys.stderr)
    return 1


def _off_the_main_thread(run: Callable[[], T]) -> T:
    """`run()` on a thread of its own while this one waits for it.

    Signal handlers run on the main thread, between two of its bytecodes: one that sets an
    event (a stop) must not interrupt that thread inside the same event's `wait`, which holds
    the event's lock for a moment, or `set` waits for that lock forever.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(run())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=target, name="replay")
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failure:
        raise failure[0]
    return outcome[0]


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    import signal

    from workers.app.dlq import Replayer
    from workers.app.registry import open_destination, open_source_publisher
    from workers.app.wiring import policy_of
    from workers.invoke import create_invoker

    config, mapping, store = _store(args)
    invoker = publisher = destination = None
    if not args.dry_run:
        if args.to == "handler":
            invoker = create_invoker(config.function_spec(mapping.function))
            destination = open_destination(mapping)
        else:
            publisher = open_source_publisher(mapping)

    verb = "would replay" if args.dry_run else "replayed"
    bar = _replay_progress(verb) if sys.stderr.isatty() else None

    def on_letter(stored: Any, summary: Any, result: Any) -> None:
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1, records=summary.records)
        # Letters that failed again are named even beside the progress bar.
        if result.failed_again:
            log.warning("%s", result.describe(stored.id))
        elif bar is None:
            log.info("%s", result.describe(stored.id))

    replayer = Replayer(
        mapping=mapping.name,
        function=mapping.function,
        store=store,
        to=args.to,
        policy=policy_of(mapping),
        invoker=invoker,
        destination=destination,
        publisher=publisher,
        letter_filter=_letter_filter(args),
        rate_per_s=args.rate,
        limit=args.limit,
        on_letter=on_letter,
    )
    signal.signal(signal.SIGTERM, lambda *_: replayer.stop.set())
    signal.signal(signal.SIGINT, lambda *_: replayer.stop.set())
    try:
        if bar is not None:
            bar.start()
        summary = _off_the_main_thread(lambda: replayer.run(dry_run=args.dry_run))
    finally:
        if bar is not None:
            bar.stop()
        for closable in (invoker, publisher, destination):
            if closable is not None:
                closable.close()
    print(orjson.dumps(summary.as_json()).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
