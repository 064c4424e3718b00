"""A handler that says which batches it ran, in order, for the tests of staged batches."""

from __future__ import annotations

import base64
import os
import time
from typing import Any


def log_batches(event: dict[str, Any], context: Any) -> Any:
    """Append the batch's first value to $STAGING_LOG; that value says what to do."""
    first = next(iter(event["records"].values()))[0]
    value = base64.b64decode(first["value"]).decode()
    with open(os.environ["STAGING_LOG"], "a") as log:
        log.write(value + "\n")
    if value.startswith("fail"):
        raise ValueError(value)
    if value.startswith("slow"):
        time.sleep(1.0)
    if value.startswith("hang"):
        time.sleep(60)
    if value.startswith("exit"):
        os._exit(3)
    if value.startswith("partial"):
        item = {"partition": f"{first['topic']}-{first['partition']}", "offset": first["offset"]}
        return {"batchItemFailures": [{"itemIdentifier": item}]}
    return {"ran": value}
