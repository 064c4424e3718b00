"""The Redis source's records of entries as the server sends them, without a server: entries in
flight are skipped, one that cannot be read becomes a letter and stops nothing else."""

from __future__ import annotations

from connectors.redis.shape import parse_stream_id
from connectors.redis.source import RedisSource
from workers.app import config as cfg
from workers.engine.ports import UNDECODABLE_ERROR_TYPE


def redis_source() -> RedisSource:
    """A source that is never opened."""
    mapping = cfg.EventSourceMapping.model_validate(
        {
            "name": "entries",
            "function": "f",
            "source": {
                "type": "redis",
                "url": "redis://127.0.0.1:1/0",
                "streams": ["s"],
                "partition_key_field": "k",
            },
        }
    )
    return RedisSource(mapping, 0)


def test_entries_in_flight_are_not_handed_out_twice() -> None:
    source = redis_source()
    entries = [(b"5-0", [b"k", b"a", b"v", b"1"]), (b"5-1", [b"v", b"2"])]
    first = source._records("s", entries, 1.0)
    assert [(r.position, r.key, r.value, r.timestamp_ms) for r in first] == [
        (parse_stream_id("5-0"), b"a", b"1", 5),
        (parse_stream_id("5-1"), None, b"2", 5),
    ]
    assert source._records("s", entries, 2.0) == []
    assert source._in_flight["s"] == {"5-0": 1.0, "5-1": 1.0}
    del source._in_flight["s"]["5-0"]  # acked
    (again,) = source._records("s", entries, 3.0)
    assert again.meta.entry_id == "5-0"
    assert source._entries.last_seen == {"s": "5-1"}


def test_an_entry_that_cannot_be_read_becomes_a_letter_and_the_others_records() -> None:
    source = redis_source()
    source._in_flight["s"]["7-0"] = 0.5
    entries = [
        (b"6-0", [b"v", b"1"]),
        (b"7-0", [b"v", b"held"]),
        (b"7-1", [b"k", b"a", b"v"]),  # a name without a value: no server sends this
        (b"8-0", [b"v", b"3"]),
        (b"8-1", [b"x", b"y", b"z"]),
    ]
    records = source._records("s", entries, 1.0)
    assert [r.meta.entry_id for r in records] == ["6-0", "7-1", "8-0", "8-1"]
    assert [r.fault is not None for r in records] == [False, True, False, True]
    letter = records[1]
    assert letter.fault is not None and letter.fault.error_type == UNDECODABLE_ERROR_TYPE
    assert letter.position == parse_stream_id("7-1") and letter.source == "s"
    assert [r.value for r in records if r.fault is None] == [b"1", b"3"]
    # Letters are held as records are, so that their ack forgets them.
    assert source._in_flight["s"] == {"7-0": 0.5, "6-0": 1.0, "7-1": 1.0, "8-0": 1.0, "8-1": 1.0}
    assert source._entries.last_seen == {"s": "8-0"}
