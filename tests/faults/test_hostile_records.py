"""Hostile records among good ones, on every broker, through `workers run --until-idle`: every
good record handled once and in order per key, every hostile record handled or dead-lettered,
the run ends with exit 0.

Tests marked xfail(strict) reproduce issue 12 cases that are being fixed; once a fix merges,
they pass, pytest reports XPASS as a failure, and the marker goes.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pika.data
import pytest
import redis

from tests import brokers
from tests.brokers import KafkaRecord, Tansu, unique_name
from tests.faults.hostile import (
    FaultRun,
    Message,
    RabbitQueues,
    SQSMessage,
    SQSQueues,
    as_bytes,
    check_run,
    good,
    kafka_item_bytes,
    kafka_ref,
    kafka_source,
    letter_refs,
    poison,
    rabbit,
    rabbitmq_source,
    redis_client,
    redis_item_fields,
    redis_source,
    run_mapping,
    sqs,
    sqs_source,
    stream,
    tally_ids,
    tally_refs,
    xadd,
)
from tests.faults.results import Tally, letter_ids

pytestmark = [pytest.mark.faults, pytest.mark.integration]
__all__ = ["rabbit", "redis_client", "sqs", "stream"]  # fixtures

HOSTILE = "tests.faults.handlers:hostile"
# Payload cap per invocation in these scenarios, and a record past it.
BATCH_BYTES = 6 * 1024 * 1024  # Lambda's default, room for a 1 MB header as JSON numbers
TOO_LARGE = b"x" * (BATCH_BYTES + 1)
HUGE_HEADER = b"h" * (1024 * 1024)
# AMQP properties must fit in one frame (RabbitMQ's frame_max is 128 KB by default).
HUGE_AMQP_HEADER = "h" * (120 * 1024)
NOT_UTF8 = b"\xff\xfe\x80 not utf-8 \xc3\x28"
# 2**50 ms is past the year 9999 (issue 12 case 2); 2**40 s as an AMQP timestamp (case 3).
ABSURD_MS = 2**50
ABSURD_S = 2**40
# A Kafka producer that may send records larger than librdkafka's default 1 MB.
BIG_PRODUCER = {"message.max.bytes": 16 * 1024 * 1024}


# --- Kafka -----------------------------------------------------------------------------------


def produce_kafka(bootstrap: str, topic: str, records: list[KafkaRecord]) -> list[str]:
    coords = brokers.produce(bootstrap, topic, records, config=BIG_PRODUCER)
    return [kafka_ref(topic, p, o) for p, o in coords]


@pytest.mark.kafka
def test_kafka_hostile_records(kafka_broker: Tansu, tmp_path: Path) -> None:
    topic = kafka_broker.create_topic(unique_name("hostile-records"))
    keys = [f"k{i % 3}" for i in range(30)]
    hostile = {
        3: KafkaRecord(NOT_UTF8, key="k0"),
        6: KafkaRecord(b"", key="k0"),  # empty value
        9: KafkaRecord(good(9), key=None),  # null key
        12: KafkaRecord(None, key="k0"),  # tombstone
        15: KafkaRecord(TOO_LARGE, key="k0"),
        18: KafkaRecord(good(18), key="k0", headers=[(f"h{i}", b"v") for i in range(1000)]),
        21: KafkaRecord(good(21), key="k0", headers=[("huge", HUGE_HEADER)]),
        24: KafkaRecord(good(24), key="k0", timestamp_ms=1),
        27: KafkaRecord(good(27), key="k0", timestamp_ms=-5),
        28: KafkaRecord(NOT_UTF8, key=NOT_UTF8, headers=[("bin", NOT_UTF8)]),
        29: KafkaRecord(good(29), key="k0", headers=[("esm-replay-count", b"x"), ("nil", None)]),
    }
    records = [hostile.get(i) or KafkaRecord(good(i), key=keys[i]) for i in range(30)]
    produced = produce_kafka(kafka_broker.bootstrap, topic, records)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-kafka"),
        source=kafka_source(kafka_broker.bootstrap, topic),
        batch_size=10,
        maximum_batch_bytes=BATCH_BYTES,
        keep_events=True,
    )
    result = tally_refs("hostile records", "kafka", produced, run)
    key_of = {ref: str(r.key) for ref, r in zip(produced, records, strict=True) if r.key}
    check_run(result, run, key_of=key_of)
    too_large = produced[15]
    assert run.conditions() == {too_large: "MaximumPayloadSizeExceeded"}
    items = run.items()
    for ref, record in zip(produced, records, strict=True):
        value, key, headers = kafka_item_bytes(items[ref])
        assert value == (as_bytes(record.value) or b""), ref
        assert key == as_bytes(record.key), ref
        # A null header value reaches the handler empty, as a tombstone's value does.
        assert headers == [(name, as_bytes(data) or b"") for name, data in record.headers], ref
    result.record()


@pytest.mark.kafka
def test_kafka_timestamp_past_year_9999(kafka_broker: Tansu, tmp_path: Path) -> None:
    """One record stamped 2**50 ms is handled, another fails and must become a letter (whose
    batch info shows the timestamp); the records behind them on the partition still flow."""
    topic = kafka_broker.create_topic(unique_name("hostile-ts"))
    records = [KafkaRecord(good(i), key=f"k{i % 2}") for i in range(20)]
    records[5] = KafkaRecord(good(5), key="k1", timestamp_ms=ABSURD_MS)
    records[7] = KafkaRecord(poison(7), key="k1", timestamp_ms=ABSURD_MS)
    brokers.produce(kafka_broker.bootstrap, topic, records)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-kafka-ts"),
        source=kafka_source(kafka_broker.bootstrap, topic),
        handler=HOSTILE,
        batch_size=5,
        timeout_s=60,
    )
    result = tally_ids("absurd timestamp", "kafka", 20, run)
    check_run(result, run, key_of={str(i): f"k{i % 2}" for i in range(20)})
    assert letter_ids(run.letters) == ["7"]
    result.record()


def kafka_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.value() or b"null") for m in brokers.read_topic(bootstrap, topic)]


def run_to_kafka_destination(
    kafka_broker: Tansu, tmp_path: Path, records: list[KafkaRecord], **mapping: Any
) -> tuple[FaultRun, list[dict[str, Any]]]:
    """Run `hostile` on `records` with a Kafka on-failure destination (librdkafka's default
    message.max.bytes of 1 MB); the run and the letters on the destination topic."""
    topic = kafka_broker.create_topic(unique_name("hostile-big-letter"))
    dlq = kafka_broker.create_topic(unique_name("hostile-dlq"))
    brokers.produce(kafka_broker.bootstrap, topic, records, config=BIG_PRODUCER)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-kafka-dlq"),
        source=kafka_source(kafka_broker.bootstrap, topic),
        handler=HOSTILE,
        timeout_s=30,
        destination_config={"on_failure": {"type": "kafka", "topic": dlq}},
        **mapping,
    )
    # The letters are on the destination topic, not in a file: count those.
    run.letters = kafka_letters(kafka_broker.bootstrap, dlq)
    return run, run.letters


def offsets_as_ids(letters: list[dict[str, Any]]) -> list[str]:
    """Ids of the records letters name, where a record's id is its offset (one partition)."""
    return [ref.rsplit("@", 1)[1] for ref in letter_refs(letters)]


@pytest.mark.kafka
def test_kafka_letter_too_large_for_the_destination(kafka_broker: Tansu, tmp_path: Path) -> None:
    """A failing 2 MB record makes a letter the destination refuses: it must be dead-lettered
    without its payload, with its coordinates, and the partition must move on."""
    records = [KafkaRecord(good(i), key=f"k{i % 2}") for i in range(10)]
    big = orjson.dumps({"id": 4, "act": "raise", "pad": "x" * (2 * 1024 * 1024)})
    records[4] = KafkaRecord(big, key="k0")
    run, letters = run_to_kafka_destination(kafka_broker, tmp_path, records, batch_size=5)
    result = Tally(
        "letter too large for destination",
        "kafka",
        [str(i) for i in range(10)],
        run.handled,
        offsets_as_ids(letters),
        recovery_s=run.elapsed_s,
    )
    check_run(result, run, key_of={str(i): f"k{i % 2}" for i in range(10)})
    assert [letter.get("payloadOmitted") for letter in letters] == [True]
    assert letters[0]["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    result.record()


@pytest.mark.kafka
@pytest.mark.faults_full
def test_kafka_failed_batch_too_large_for_one_letter(kafka_broker: Tansu, tmp_path: Path) -> None:
    """100 failing 10 KB records with bisect off make one letter past the destination's limit:
    it must be split per record, so that every record is dead-lettered with its payload."""
    pad = "x" * 10_000
    records = [
        KafkaRecord(orjson.dumps({"id": i, "act": "raise", "pad": pad}), key="k")
        for i in range(100)
    ]
    run, letters = run_to_kafka_destination(
        kafka_broker, tmp_path, records, batch_size=100, bisect_batch_on_function_error=False
    )
    result = Tally(
        "batch too large for one letter",
        "kafka",
        [str(i) for i in range(100)],
        run.handled,
        letter_ids(letters),
        recovery_s=run.elapsed_s,
    )
    check_run(result, run)
    assert not any(letter.get("payloadOmitted") for letter in letters)
    result.record()


# --- Redis -----------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_hostile_entries(
    redis_client: redis.Redis, redis_url: str, stream: str, tmp_path: Path
) -> None:
    entries: list[Any] = [{"v": good(i)} for i in range(30)]
    entries[3] = {"v": NOT_UTF8}
    entries[6] = {"v": b""}  # empty value
    entries[9] = {f"f{i}": str(i) for i in range(1000)}  # many fields
    entries[12] = {"huge": b"h" * (1024 * 1024), "v": good(12)}  # a huge field
    entries[15] = {"v": TOO_LARGE}
    entries[18] = {"k": NOT_UTF8, "v": NOT_UTF8}
    entries[21] = {"": b"empty field name"}
    entries[24] = {"k": "k0", "v": good(24), "other": b"\x00\x01"}
    entries[27] = {"v": good(27), "esm-replay-count": NOT_UTF8}
    produced = xadd(redis_client, stream, entries)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-redis"),
        source=redis_source(redis_url, stream),
        batch_size=10,
        maximum_batch_bytes=BATCH_BYTES,
        keep_events=True,
    )
    result = tally_refs("hostile records", "redis", produced, run)
    check_run(result, run, key_of=dict.fromkeys(produced, stream))
    assert run.conditions() == {produced[15]: "MaximumPayloadSizeExceeded"}
    assert not redis_client.xpending(stream, run.mapping)["pending"]
    items = run.items()
    for ref, fields in zip(produced, entries, strict=True):
        expected = {as_bytes(k): as_bytes(v) for k, v in fields.items()}
        assert redis_item_fields(items[ref]) == expected, ref
    result.record()


@pytest.mark.redis
def test_redis_entry_id_past_year_9999(
    redis_client: redis.Redis, redis_url: str, stream: str, tmp_path: Path
) -> None:
    """An entry with id 2**50-0 fails and must become a letter; the entries after it (whose
    ids Redis takes from the same millisecond, so absurd too) are handled."""
    entries: list[Any] = [{"v": good(i)} for i in range(10)]
    entries += [(f"{ABSURD_MS}-0", {"v": poison(10)})] + [{"v": good(i)} for i in range(11, 20)]
    xadd(redis_client, stream, entries)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-redis-ts"),
        source=redis_source(redis_url, stream),
        handler=HOSTILE,
        batch_size=5,
        timeout_s=60,
    )
    result = tally_ids("absurd timestamp", "redis", 20, run)
    check_run(result, run, key_of={str(i): stream for i in range(20)})
    assert letter_ids(run.letters) == ["10"]
    result.record()


@pytest.mark.redis
def test_redis_field_names_not_utf8_keep_their_identity(
    redis_client: redis.Redis, redis_url: str, stream: str, tmp_path: Path
) -> None:
    produced = xadd(redis_client, stream, [{"v": good(0)}, {b"\xff": b"one", b"\xfe": b"two"}])
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-redis-names"),
        source=redis_source(redis_url, stream),
        keep_events=True,
    )
    result = tally_refs("non-UTF-8 field names", "redis", produced, run)
    check_run(result, run, key_of=dict.fromkeys(produced, stream))
    item = run.items()[produced[1]]
    assert redis_item_fields(item) == {b"\xff": b"one", b"\xfe": b"two"}, item
    result.record()


@pytest.mark.redis
def test_file_destination_on_a_full_disk(
    redis_client: redis.Redis, redis_url: str, stream: str, tmp_path: Path
) -> None:
    """Letters written while the disk fills up: the file keeps whole letters only, an entry
    whose letter did not fit stays pending, and once there is room again a second run settles
    every entry, none lost."""
    values = [poison(i) if i % 2 else good(i) for i in range(30)]
    xadd(redis_client, stream, [{"v": v} for v in values])
    name = unique_name("hostile-full-disk")
    options: dict[str, Any] = {
        "name": name,
        "source": redis_source(redis_url, stream),
        "handler": HOSTILE,
        "batch_size": 10,
    }
    # Room for a few letters of about 1 KB each: the run stalls on a letter it cannot write.
    full = run_mapping(tmp_path, timeout_s=15, file_size_limit=6000, **options)
    letters_file = tmp_path / name / "letters" / f"{name}.jsonl"
    lines = letters_file.read_bytes().splitlines() if letters_file.exists() else []
    torn = [line[:80] for line in lines if not _is_json(line)]
    assert not torn, f"partly written letters: {torn}"
    pending = redis_client.xpending(stream, name)["pending"]
    assert pending + len(set(full.dead_lettered_ids())) >= 15, full.stderr[-3000:]
    after = run_mapping(tmp_path, **options)
    result = tally_ids("file destination on a full disk", "redis", 30, after)
    # The first run was killed mid-stall: what it handled and had not acked comes again.
    check_run(result, after, max_duplicates=30)
    assert sorted(set(letter_ids(after.letters)), key=int) == [str(i) for i in range(1, 30, 2)]
    result.record()


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


# --- RabbitMQ --------------------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_rabbitmq_hostile_messages(rabbit: RabbitQueues, rabbitmq_url: str, tmp_path: Path) -> None:
    queue = rabbit.declare(unique_name("hostile-records"))
    messages = [Message(f"m{i}", good(i)) for i in range(30)]
    messages[3] = Message("m3", NOT_UTF8)
    messages[6] = Message("m6", b"")  # empty body
    messages[9] = Message("m9", good(9), headers={f"h{i}": i for i in range(1000)})
    messages[12] = Message("m12", good(12), headers={"huge": HUGE_AMQP_HEADER})
    messages[15] = Message("m15", TOO_LARGE)
    messages[18] = Message("m18", good(18), headers={"bin": NOT_UTF8, "nested": {"a": [1, "b"]}})
    messages[21] = Message("m21", good(21), timestamp=0)
    messages[24] = Message("m24", NOT_UTF8, extra={"content_type": "application/json"})
    # A delivery count forged by a publisher on a classic queue: still invoked before any
    # letter (README, Failure semantics), so handled here.
    messages[27] = Message("m27", good(27), headers={"x-delivery-count": 99})
    messages[28] = Message("m28", good(28), headers={"esm-replay-count": NOT_UTF8})
    produced = rabbit.publish(queue, messages)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-rmq"),
        source=rabbitmq_source(rabbitmq_url, queue),
        batch_size=10,
        maximum_batch_bytes=BATCH_BYTES,
        keep_events=True,
    )
    result = tally_refs("hostile records", "rabbitmq", produced, run)
    check_run(result, run)
    assert run.conditions() == {"m15": "MaximumPayloadSizeExceeded"}
    assert rabbit.ready(queue) == 0
    items = run.items()
    for m in messages:
        assert base64.b64decode(items[m.message_id]["data"]) == m.body, m.message_id
    assert len(items["m9"]["basicProperties"]["headers"]) == 1000
    assert len(items["m12"]["basicProperties"]["headers"]["huge"]["bytes"]) == len(HUGE_AMQP_HEADER)
    result.record()


@pytest.mark.rabbitmq
def test_rabbitmq_timestamp_property_past_year_9999(
    rabbit: RabbitQueues, rabbitmq_url: str, tmp_path: Path
) -> None:
    queue = rabbit.declare(unique_name("hostile-ts"))
    messages = [Message(f"m{i}", good(i)) for i in range(20)]
    messages[5] = Message("m5", good(5), timestamp=ABSURD_S)
    messages[7] = Message("m7", poison(7), timestamp=ABSURD_S)
    rabbit.publish(queue, messages)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-rmq-ts"),
        source=rabbitmq_source(rabbitmq_url, queue),
        batch_size=5,
        handler=HOSTILE,
        timeout_s=30,
    )
    result = tally_ids("absurd timestamp", "rabbitmq", 20, run)
    check_run(result, run)
    assert letter_ids(run.letters) == ["7"]
    result.record()


class _AbsurdTimestamp:
    """A header value that goes on the wire as an AMQP timestamp field of `ABSURD_S` seconds,
    which no `datetime` can hold (so pika itself cannot publish it)."""


@pytest.fixture
def absurd_timestamp_encoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    encode = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, _AbsurdTimestamp):
            pieces.append(struct.pack(">cQ", b"T", ABSURD_S))
            return 9
        return int(encode(pieces, value))

    monkeypatch.setattr(pika.data, "encode_value", encode_value)
    yield _AbsurdTimestamp()


@pytest.mark.rabbitmq
@pytest.mark.faults_full
def test_rabbitmq_timestamp_header_field_past_year_9999(
    rabbit: RabbitQueues, rabbitmq_url: str, tmp_path: Path, absurd_timestamp_encoder: object
) -> None:
    queue = rabbit.declare(unique_name("hostile-ts-header"))
    messages = [Message(f"m{i}", good(i)) for i in range(20)]
    messages[5] = Message("m5", good(5), headers={"when": absurd_timestamp_encoder})
    messages[7] = Message("m7", poison(7), headers={"when": absurd_timestamp_encoder})
    # A sane timestamp header beside it must still come through as a date.
    messages[8] = Message("m8", good(8), headers={"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})
    rabbit.publish(queue, messages)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-rmq-tsh"),
        source=rabbitmq_source(rabbitmq_url, queue),
        batch_size=5,
        handler=HOSTILE,
        timeout_s=30,
    )
    result = tally_ids("absurd timestamp header", "rabbitmq", 20, run)
    check_run(result, run)
    # Issue 12 lets a message whose frame the driver cannot decode be dead-lettered as poison,
    # so the good message with such a header may be handled or dead-lettered; nothing else may.
    assert "7" in letter_ids(run.letters)
    assert set(letter_ids(run.letters)) <= {"5", "7"}
    result.record()


# --- SQS -------------------------------------------------------------------------------------

# SQS bodies are text (what XML 1.0 allows), at most 1 MiB with their attributes (moto, as SQS
# since 2025): a record too large for an invocation needs a smaller payload cap.
SQS_BATCH_BYTES = 512 * 1024


def sqs_attribute(data_type: str, value: str | bytes) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"DataType": data_type, "BinaryValue": value}
    return {"DataType": data_type, "StringValue": value}


@pytest.mark.sqs
def test_sqs_hostile_messages(sqs: SQSQueues, tmp_path: Path) -> None:
    url = sqs.create(unique_name("hostile-records"))
    messages = [SQSMessage(good(i).decode()) for i in range(30)]
    messages[3] = SQSMessage("é ☃ 𝄞 \ufffd \ue000 \U0010ffff\r\n\t end")  # every plane SQS takes
    messages[6] = SQSMessage(" ")  # whitespace only: SQS refuses an empty body
    messages[9] = SQSMessage("[1, 2, 3]")  # JSON, not an object
    messages[12] = SQSMessage("y" * (400 * 1024))  # large, yet within the payload cap
    messages[15] = SQSMessage("z" * (1024 * 1024 - 1024))  # past the payload cap
    messages[18] = SQSMessage(
        good(18).decode(),
        {
            "text": sqs_attribute("String", "é ☃ 𝄞"),
            "number": sqs_attribute("Number", "-12345678901234567890.123456789"),
            "raw": sqs_attribute("Binary", NOT_UTF8),
            "custom": sqs_attribute("String.custom-type", "x"),
            "gz": sqs_attribute("Binary.gzip", b"\x1f\x8b\x08\x00"),
            **{f"a{i}": sqs_attribute("String", str(i)) for i in range(5)},
        },
    )
    messages[21] = SQSMessage(
        good(21).decode(), {"esm-replay-count": sqs_attribute("String", "not a number")}
    )
    messages[24] = SQSMessage(good(24).decode(), {"huge": sqs_attribute("String", "h" * 300_000)})
    # What kombu's SQS transport alters (docs/brokers.md): base64-looking text, a "properties" key.
    messages[27] = SQSMessage("aGVsbG8gd29ybGQ=")
    messages[28] = SQSMessage('{"properties": {"delivery_tag": 1}, "body": "x"}')
    produced = sqs.send(url, messages)
    run = run_mapping(
        tmp_path,
        name=unique_name("hostile-sqs"),
        source=sqs_source(url),
        batch_size=10,
        maximum_batch_bytes=SQS_BATCH_BYTES,
        keep_events=True,
    )
    result = tally_refs("hostile records", "sqs", produced, run)
    check_run(result, run)
    assert run.conditions() == {produced[15]: "MaximumPayloadSizeExceeded"}
    assert set(sqs.left(url).values()) == {"0"}, sqs.left(url)
    items = run.items()
    for ref, m in zip(produced, messages, strict=True):
        item = items[ref]
        assert item["body"] == m.body, ref
        assert set(item["messageAttributes"]) == set(m.attributes), ref
        for name, sent in m.attributes.items():
            got = item["messageAttributes"][name]
            assert got["dataType"] == sent["DataType"], (ref, name)
            if "BinaryValue" in sent:
                assert base64.b64decode(got["binaryValue"]) == sent["BinaryValue"], (ref, name)
            else:
                assert got["stringValue"] == sent["StringValue"], (ref, name)
    result.record()
