"""`workers dlq` on a Redis dead-letter stream: the letters still to replay, and marking one
replayed, with the progress kept in a consumer group on that stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis

from connectors.redis import config as cfg
from connectors.redis.client import group_info, log, redis_client
from workers.engine.letters import belongs_to, parse_letter
from workers.engine.ports import StoredLetter
from workers.engine.redact import redact_url

if TYPE_CHECKING:
    from workers.app.config import EventSourceMapping

# Marks one dead letter replayed, atomically (see RedisDeadLetterStore). Entries after the group's
# last-delivered id up to the letter, at most ARGV[4] of them, are delivered to the group (into its
# pending entries list, where they stay offered), then the letter is acked once it is reached.
# Returns how many entries were delivered, or -1 when the stream is gone.
_DONE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
end
if last == nil then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')
  last = '0-0'
end
local limit = tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], '(' .. last, ARGV[3], 'COUNT', limit)
if #entries > 0 then
  redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', #entries, 'STREAMS', KEYS[1], '>')
end
if #entries < limit then redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) end
return #entries
"""
# Letters per XRANGE while listing or replaying: one letter carries a whole batch, up to megabytes.
LETTER_PAGE = 50
REPLAY_GROUP = "esm-replay"
REPLAY_CONSUMER = "replay"


class RedisDeadLetterStore:
    """Reads a dead-letter stream back for `workers dlq`; replay progress is the consumer group
    `esm-replay` on that stream, so an interrupted replay resumes where it stopped.

    A letter is replayed when its entry is at or before the group's last-delivered id and not in
    the group's pending entries list (PEL); every other entry is still to be replayed.

    `pending()` only reads (XINFO GROUPS, XPENDING, XRANGE), so listing, showing and dry runs
    change nothing, not even creating the group. It takes, when called, the group's
    last-delivered id and the stream's last entry id, then yields the group's pending entries
    (all at or before that last-delivered id) and then the entries after it up to that last entry,
    oldest first: letters a replay writes back later wait for the next replay.

    `done()` runs one script, atomic on the server: it creates the group at 0 if missing, delivers
    to the group every entry after its last-delivered id up to the letter (XREADGROUP, so letters
    skipped by `--error-type` or `--since`, or belonging to another mapping, land in the PEL and
    stay offered), and XACKs the letter. Entries past the letter are never touched. Since nothing
    is ever moved out of the "to replay" set except the one letter acked in the same script, a
    crash at any point loses nothing and repeats at most the letter being replayed.
    Large gaps are delivered in bounded steps, each itself a consistent state.

    The stream may be shared by several mappings: entries whose `mapping` field names another
    mapping are not offered. Entries that are no dead letter are skipped with a warning.
    Needs EVAL on the dead-letter stream (an ACL user must be allowed scripts).
    """

    def __init__(self, dst: cfg.RedisDestination, mapping: EventSourceMapping) -> None:
        self.stream = dst.stream
        self.mapping = mapping.name
        self.group = REPLAY_GROUP
        self.consumer = REPLAY_CONSUMER
        self._where = f"dead-letter stream {self.stream!r} at {redact_url(dst.url)}"
        self._client: redis.Redis | None = redis_client(dst.url)
        self._done = self._client.register_script(_DONE_SCRIPT)

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError(f"{self._where}: store used after close()")
        return self._client

    def pending(self) -> Iterator[StoredLetter]:
        client = self._redis()
        # The state is taken now, not at the first next(): "as the stream stands when called".
        newest: Any = client.xrevrange(self.stream, count=1)
        if not newest:
            kind: Any = client.type(self.stream)
            if kind not in (b"none", b"stream"):
                raise ValueError(f"{self._where}: the key is a {kind.decode()}, not a stream")
            return iter(())
        end = newest[0][0].decode()
        info = group_info(client.xinfo_groups(self.stream), self.group)
        delivered = None if info is None else info["last-delivered-id"].decode()
        return self._letters(client, delivered, end)

    def _letters(
        self, client: redis.Redis, delivered: str | None, end: str
    ) -> Iterator[StoredLetter]:
        """Pending entries of the group (None: there is no group yet), then the entries after
        the last delivered one up to `end`; every pending one comes before those."""
        if delivered is not None:
            yield from self._pending_entries(client, delivered)
        cursor = f"({delivered or '0-0'}"
        while True:
            entries: Any = client.xrange(self.stream, cursor, end, count=LETTER_PAGE)
            for entry_id, fields in entries:
                stored = self._stored(entry_id.decode(), fields)
                if stored is not None:
                    yield stored
            if len(entries) < LETTER_PAGE:
                return
            cursor = f"({entries[-1][0].decode()}"

    def _pending_entries(self, client: redis.Redis, delivered: str) -> Iterator[StoredLetter]:
        """The group's pending entries up to `delivered`, in id order, read page by page."""
        low = "-"
        while True:
            rows: Any = client.xpending_range(self.stream, self.group, low, delivered, LETTER_PAGE)
            if not rows:
                return
            pipe = client.pipeline(transaction=False)
            for row in rows:
                pipe.xrange(self.stream, row["message_id"], row["message_id"], count=1)
            for row, found in zip(rows, pipe.execute(), strict=True):
                # An entry trimmed away since it was delivered leaves its id in the PEL alone.
                if found:
                    stored = self._stored(row["message_id"].decode(), found[0][1])
                    if stored is not None:
                        yield stored
            if len(rows) < LETTER_PAGE:
                return
            low = f"({rows[-1]['message_id'].decode()}"

    def _stored(self, entry_id: str, fields: dict[bytes, bytes]) -> StoredLetter | None:
        owner = fields.get(b"mapping")
        if not belongs_to(self.mapping, owner):
            return None  # another mapping's letter on a shared stream
        letter, problem = parse_letter(fields.get(b"letter"))
        if letter is None:
            log.warning(
                "mapping %s: %s: entry %s skipped, not a dead letter: %s",
                self.mapping,
                self._where,
                entry_id,
                problem,
            )
            return None
        if owner is None and not belongs_to(self.mapping, None, letter):
            return None
        return StoredLetter(letter["requestContext"]["requestId"], letter, handle=entry_id)

    def done(self, stored: StoredLetter) -> None:
        entry_id = stored.handle
        if not isinstance(entry_id, str):
            raise ValueError(f"letter {stored.id} was not read from {self._where}")
        client = self._redis()
        while True:
            delivered: Any = self._done(
                keys=[self.stream],
                args=[self.group, self.consumer, entry_id, LETTER_PAGE],
                client=client,
            )
            if delivered < 0:
                log.warning(
                    "mapping %s: %s is gone; letter %s cannot be marked replayed",
                    self.mapping,
                    self._where,
                    stored.id,
                )
                return
            if delivered < LETTER_PAGE:
                return

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
