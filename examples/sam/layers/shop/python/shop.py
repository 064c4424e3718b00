"""The shop's shared code, deployed as a Lambda layer (python/ is what Lambda puts on the path)."""

import json


class InvalidOrder(ValueError):
    pass


def parse(body: str | bytes) -> dict:
    """An order or a payment from a message body; InvalidOrder when it cannot be taken."""
    try:
        item = json.loads(body)
        amount = float(item["amount"])
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidOrder(f"not an order: {exc}") from None
    if amount < 0:
        raise InvalidOrder(f"{item.get('id')}: negative amount {amount}")
    return item
