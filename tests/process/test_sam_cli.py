"""`workers` given a SAM template: validate (what does not run, the access configurations,
--strict), sam convert, and the one-line errors when the overrides are missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from workers.app.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sam"


def workers(*args: str, cwd: Path = EXAMPLE) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_URL", "_BOOTSTRAP"))}
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, "PYTHONPATH": str(ROOT)},
    )


def test_validate_says_what_does_not_run_and_what_to_supply() -> None:
    done = workers("validate", "template.yaml", "--overrides", "overrides.yaml")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert (
        "warning: template.yaml: events that are not event source mappings, left alone:"
        " PaymentsFunction.Reconcile (Schedule)"
    ) in out
    assert "note: template.yaml: ignored, no meaning here: OrdersFunction: Architectures" in out
    assert (
        "access: PaymentsFunction-Payments: the template's SourceAccessConfigurations are"
        " SASL_SCRAM_512_AUTH arn:aws:secretsmanager:us-east-1:123456789012:secret:"
        "kafka-payments"
    ) in out
    assert out.rstrip().endswith("template.yaml: ok (2 function(s), 2 mapping(s))")


def test_strict_refuses_what_does_not_run() -> None:
    done = workers("validate", "template.yaml", "--overrides", "overrides.yaml", "--strict")
    assert done.returncode == 2
    assert done.stderr == (
        "error: template.yaml: --strict: not an event source mapping:"
        " PaymentsFunction.Reconcile (Schedule)\n"
    )


def test_a_template_without_its_overrides_says_what_is_missing() -> None:
    done = workers("run", "template.yaml", "--until-idle", "1")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "error: template.yaml: Resources.OrdersFunction.Properties.Events.Orders.Properties"
        ".Queue: SQS queue OrdersQueue (arn:aws:sqs:us-east-1:123456789012:orders): the"
        " overrides file needs an entry saying where it is here"
    ), done.stderr
    assert "template.yaml: Resources.PaymentsFunction.Properties.Events.Payments" in done.stderr


def test_sam_convert_prints_a_mapping_file(tmp_path: Path) -> None:
    done = workers("sam", "convert", "template.yaml", "--overrides", "overrides.yaml")
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)
    orders, payments = (
        {m["name"]: m for m in data["event_source_mappings"]}[name]
        for name in ("OrdersFunction-Orders", "PaymentsFunction-Payments")
    )
    # The overrides' ${VAR} as written; the parameters' resolved (their defaults here).
    assert orders["source"]["queue_url"] == (
        "${ORDERS_QUEUE_URL:-http://127.0.0.1:4566/123456789012/orders}"
    )
    assert payments["source"]["bootstrap_servers"] == "127.0.0.1:9092"
    assert payments["source"]["topics"] == ["payments"]
    assert payments["source"]["consumer_group_id"] == "local-payments"
    # Saved beside the template, it is the same configuration.
    folder = shutil.copytree(EXAMPLE, tmp_path / "sam")
    saved = folder / "mappings.yaml"
    saved.write_text(done.stdout)
    config = parse_config(done.stdout, saved, {})
    assert config.function_spec("OrdersFunction").code_paths == (
        str(folder / "orders"),
        str(folder / "layers" / "shop" / "python"),
    )
    validated = workers("validate", saved.name, cwd=folder)
    assert validated.returncode == 0, validated.stderr


def test_sam_convert_wants_a_template() -> None:
    done = workers("sam", "convert", "overrides.yaml")
    assert done.returncode == 2
    assert "not a SAM or CloudFormation template" in done.stderr


def test_invoke_a_templates_function(tmp_path: Path) -> None:
    """`workers invoke TEMPLATE FUNCTION` runs the function from its CodeUri, with its layer."""
    record = {"messageId": "m1", "body": '{"id": 1, "amount": 5}', "eventSource": "aws:sqs"}
    poison = {**record, "messageId": "m2", "body": '{"id": 2, "amount": -1}'}
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"Records": [record, poison]}))
    done = workers(
        "invoke",
        "template.yaml",
        "OrdersFunction",
        "--event",
        str(event),
        "--overrides",
        "overrides.yaml",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"batchItemFailures": [{"itemIdentifier": "m2"}]}
    assert "order 1: 5.00 (INFO)" in done.stderr


def test_rewind_and_dlq_take_a_template() -> None:
    overrides = ("--overrides", "overrides.yaml")
    done = workers(
        "rewind", "template.yaml", "OrdersFunction-Orders", "--to", "earliest", *overrides
    )
    assert done.returncode == 2
    assert done.stderr.startswith(
        "error: mapping OrdersFunction-Orders: a sqs source cannot be rewound"
    ), done.stderr
    done = workers("dlq", "list", "template.yaml", "OrdersFunction-Orders", *overrides)
    assert done.returncode == 1
    assert "OrdersFunction-Orders has no on-failure destination" in done.stderr, done.stderr
