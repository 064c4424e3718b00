"""How letters and replayed records are written as SQS messages: bodies SQS accepts, and
message attributes from labels and record headers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from workers.engine.letters import letter_labels

# The characters SQS takes in a body or a string attribute:
# https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessage.html
_NOT_SQS_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

# A message attribute each letter carries: when it was sent, in nanoseconds of the sender's
# clock, to keep the letters SQS stamps with the same millisecond in order.
SENT_NS_ATTRIBUTE = "esm-sent-ns"
# SQS takes at most 10 message attributes per message.
MAX_ATTRIBUTES = 10


def sqs_text(text: str) -> bool:
    return _NOT_SQS_TEXT.search(text) is None


def letter_body(letter: Mapping[str, Any]) -> str:
    """The letter as JSON text SQS takes: UTF-8 as it is, or with every character past ASCII
    escaped when it holds one SQS refuses (U+FFFE, say)."""
    text = orjson.dumps(letter).decode()
    return text if sqs_text(text) else json.dumps(letter, ensure_ascii=True)


def letter_attributes(letter: Mapping[str, Any], mapping: str) -> dict[str, Any]:
    """The `esm-*` labels as String attributes (SQS refuses empty values: those are left out),
    and the send time."""
    out: dict[str, Any] = {
        name: {"DataType": "String", "StringValue": value}
        for name, value in letter_labels(letter, mapping).items()
        if value and sqs_text(value)
    }
    out[SENT_NS_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(time.time_ns())}
    return out


def header_attributes(headers: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """Record headers as message attributes: String when the value is text SQS takes, else
    Binary; the last value of a name wins, as a message has one attribute per name. An empty
    value is left out: SQS refuses empty attributes."""
    out: dict[str, Any] = {}
    for name, value in headers:
        if not value:
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text and sqs_text(text):
            out[name] = {"DataType": "String", "StringValue": text}
        else:
            out[name] = {"DataType": "Binary", "BinaryValue": value}
    return out
