"""`workers demo`: an embedded broker, a sample order stream with a few bad records, a summary.

It shows the whole path in under a minute: batching, bisect isolating the bad records, the
dead-letter file, and `workers dlq list` to inspect them.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("workers.demo")

TOPIC = "demo-orders"
RECORDS = 5_000
BAD_EVERY = 997  # a few orders with a negative amount, which the handler refuses


def handle_orders(event: dict[str, Any], context: Any) -> None:
    """The demo's handler: a Lambda Kafka handler that refuses negative amounts."""
    for records in event["records"].values():
        for record in records:
            order = json.loads(base64.b64decode(record["value"]))
            if order["amount"] < 0:
                raise ValueError(f"order {order['id']} has a negative amount")


CONFIG = """\
functions:
  orders:
    handler: workers.app.demo:handle_orders
    timeout_s: 10
    concurrency: 2

event_source_mappings:
  - name: demo-orders
    function: orders
    source:
      type: kafka
      bootstrap_servers: {bootstrap}
      topics: [{topic}]
      client_config: {{session.timeout.ms: 6000}}
    batch_size: 200
    maximum_batching_window_s: 0.2
    parallelization_factor: 2
    bisect_batch_on_function_error: true
    maximum_retry_attempts: 2
    destination_config:
      on_failure: {{type: file, path: "{dead_letters}"}}
"""


def run_demo() -> int:
    from workers.app.progress import progress_for_terminal
    from workers.app.sample import produce_orders
    from workers.app.supervisor import Supervisor
    from workers.embedded import EmbeddedKafka

    workdir = Path(tempfile.mkdtemp(prefix="esm-demo-"))
    with EmbeddedKafka() as broker:
        log.info("embedded Kafka-protocol broker on %s", broker.bootstrap)
        bad = produce_orders(broker.bootstrap, TOPIC, RECORDS, BAD_EVERY)
        log.info("produced %d orders to %s (%d with a negative amount)", RECORDS, TOPIC, bad)
        config = workdir / "demo.yaml"
        config.write_text(
            CONFIG.format(
                bootstrap=broker.bootstrap, topic=TOPIC, dead_letters=workdir / "dead-letters"
            )
        )
        supervisor = Supervisor(config, [("demo-orders", 0)], until_idle_s=2.0)
        supervisor.install_signal_handlers()
        progress = progress_for_terminal()
        try:
            code = supervisor.run(on_tick=progress)
        finally:
            progress.close()
    stats = supervisor.summary().get("demo-orders", {})
    print(f"\nconfig: {config}")
    for name in ("polled", "invocations", "succeeded", "bisected", "dead_lettered"):
        print(f"  {name:>14}: {stats.get(name, 0)}")
    print(f"\ndead letters: {workdir / 'dead-letters' / 'demo-orders.jsonl'}")
    print(f"inspect them with: workers dlq list {config} demo-orders")
    ok = stats.get("dead_lettered") == bad and stats.get("succeeded") == RECORDS - bad
    print("\nevery good order handled, exactly the bad ones dead-lettered" if ok else "")
    return code if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo())
