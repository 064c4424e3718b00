"""The round trips the Redis source does not wait for: XACKs whose replies are read later, and the
next XREADGROUP sent before the records of the last one are made.

Each keeps a connection of the client's pool to itself, so a reply it has not read yet never
stands in the way of another command. Both are used by the poller's loop thread only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from connectors.redis.client import RETRYABLE_ERRORS, chunks, log
from connectors.redis.entries import RawEntry, stream_replies
from workers.engine.records import Record
from workers.engine.redact import describe

Connection = Any  # redis.connection.AbstractConnection; its send/read methods are untyped


def _release(client: redis.Redis, conn: Connection, *, broken: bool) -> None:
    if broken:
        conn.disconnect()  # a reply may be half read: the connection cannot be reused
    client.connection_pool.release(conn)


class Acks:
    """XACKs sent without waiting for their replies. The replies are read before the next XACK
    goes out, and when the source is asked whether it is caught up or closes: by then the server
    has long answered, so acking costs the loop no round trip.

    The entries of an XACK stay in the source's in-flight table until its reply is read, so a
    re-read after a reconnect never hands them out again. An XACK whose reply never came (a lost
    connection) is kept in `unacked` and sent again by `flush`: XACK is idempotent.
    """

    def __init__(self, mapping: str, group: str, in_flight: dict[str, dict[str, float]]) -> None:
        self.mapping = mapping
        self.group = group
        self._in_flight = in_flight
        self._client: redis.Redis | None = None
        self._conn: Connection | None = None
        self._sent: list[tuple[str, list[str]]] = []  # XACKs whose replies are unread
        # Settled entries whose XACK may not have reached the server; sent again by `flush`.
        self.unacked: dict[str, set[str]] = {}

    def send(self, client: redis.Redis | None, by_stream: Mapping[str, list[str]]) -> None:
        """XACK these entries: one write, no wait. On a lost connection they are kept for
        `flush`, which the loop calls after reconnecting."""
        commands = [(s, list(c)) for s, ids in by_stream.items() for c in chunks(ids)]
        try:
            if client is None:
                raise RedisConnectionError("source closed")
            self.confirm()
            if self._conn is None:
                self._conn = client.connection_pool.get_connection()
                self._client = client
            conn = self._conn
            conn.send_packed_command(
                conn.pack_commands([("XACK", s, self.group, *ids) for s, ids in commands])
            )
        except RETRYABLE_ERRORS as exc:
            self._keep(commands)
            self._drop()
            log.warning(
                "mapping %s: acking %d entries failed (%s); retrying after reconnecting",
                self.mapping,
                sum(len(ids) for ids in by_stream.values()),
                describe(exc),
            )
            return
        self._sent += commands

    def confirm(self) -> None:
        """Reads the replies of the XACKs sent; their entries leave the in-flight table. A lost
        connection keeps them for `flush` and raises; an error reply is raised once every reply
        is read."""
        sent, self._sent = self._sent, []
        if not sent:
            return
        conn: Connection = self._conn
        error: ResponseError | None = None
        try:
            for _ in sent:
                try:
                    conn.read_response()
                except ResponseError as exc:
                    error = error or exc
        except RETRYABLE_ERRORS:
            self._keep(sent)
            self._drop()
            raise
        self._forget(sent)
        if error is not None:
            raise error

    def flush(self, client: redis.Redis) -> None:
        """Every XACK sent is confirmed and every kept one acked again, waiting for the replies."""
        self.confirm()
        pending = {s: sorted(ids) for s, ids in self.unacked.items() if ids}
        if not pending:
            return
        commands = [(s, list(c)) for s, ids in pending.items() for c in chunks(ids)]
        pipe = client.pipeline(transaction=False)
        for stream, ids in commands:
            pipe.xack(stream, self.group, *ids)
        pipe.execute()
        self.unacked.clear()  # nothing adds to it meanwhile: the loop thread alone acks
        self._forget(commands)
        log.info(
            "mapping %s: acked %d entries held back by a lost connection",
            self.mapping,
            sum(len(ids) for ids in pending.values()),
        )

    def lost(self) -> None:
        """After a lost connection: the XACKs whose replies are unread are sent again by
        `flush`, since they may not have reached the server."""
        self._keep(self._sent)
        self._sent = []
        self._drop()

    def left(self) -> int:
        """Entries settled and not known to be acked."""
        return sum(len(ids) for _, ids in self._sent) + sum(map(len, self.unacked.values()))

    def close(self) -> None:
        """Gives the connection back; call after `flush` (a reply still unread is given up, as
        after a lost connection)."""
        self.lost()

    def _keep(self, commands: Collection[tuple[str, list[str]]]) -> None:
        for stream, ids in commands:
            self.unacked.setdefault(stream, set()).update(ids)

    def _drop(self) -> None:
        if self._conn is not None and self._client is not None:
            _release(self._client, self._conn, broken=True)
        self._conn = self._client = None

    def _forget(self, commands: Collection[tuple[str, list[str]]]) -> None:
        for stream, ids in commands:
            held = self._in_flight.get(stream)
            if held is not None:
                pop = held.pop
                for entry_id in ids:
                    pop(entry_id, None)


class ReadAhead:
    """The next XREADGROUP, sent (without BLOCK) when a read came back full and all of it went
    to the engine: more entries are likely waiting. Its reply is read on the next poll, so the
    server's work on it overlaps the loop's work on the records before. Records of a reply that
    the engine did not ask for (a paused stream, a smaller budget) wait in `ready`, in flight
    already, so they are touched like the rest.

    The server delivers the entries to the consumer when it runs the command, so a reply sent
    for is read, or its connection dropped: those entries then stay pending for the consumer,
    which re-reads its own pending entries after a reconnect and on start.
    """

    def __init__(
        self, mapping: str, group: str, consumer: str, in_flight: dict[str, dict[str, float]]
    ) -> None:
        self.mapping = mapping
        self.group = group
        self.consumer = consumer
        self._in_flight = in_flight
        self._client: redis.Redis | None = None
        self._conn: Connection | None = None
        self.count = 0  # COUNT of the read sent last
        self.ready: list[Record] = []

    @property
    def sent(self) -> bool:
        return self._conn is not None

    @property
    def holding(self) -> bool:
        """A read is sent or records wait: the source is not caught up."""
        return self._conn is not None or bool(self.ready)

    @staticmethod
    def more_waiting(reply: Any, count: int, streams: Collection[str], budget: int) -> bool:
        """A stream's reply came back full (more entries are likely waiting), and every entry
        of it goes to the engine now (none of a paused stream, no more than it asked for)."""
        if not reply or not any(len(entries) >= count for _, entries in reply):
            return False
        return sum(len(e) for _, e in reply) <= budget and all(
            raw.decode() in streams for raw, _ in reply
        )

    def send(self, client: redis.Redis, streams: list[str], count: int) -> None:
        """Sends the read; one that cannot be sent is skipped (the loop's next command meets the
        lost connection), so the records of the reply before are still handed out."""
        try:
            conn: Connection = client.connection_pool.get_connection()
        except RETRYABLE_ERRORS as exc:
            log.debug("mapping %s: no read ahead: %s", self.mapping, describe(exc))
            return
        try:
            conn.send_command(
                "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, "STREAMS",
                *streams, *([">"] * len(streams)),
            )  # fmt: skip
        except RETRYABLE_ERRORS as exc:
            _release(client, conn, broken=True)
            log.debug("mapping %s: no read ahead: %s", self.mapping, describe(exc))
            return
        self._client, self._conn = client, conn
        self.count = count

    def take(self) -> list[tuple[bytes, list[RawEntry]]]:
        """The reply, as `stream_replies` gives it ([] when there was nothing to read)."""
        client, conn = self._client, self._conn
        if client is None or conn is None:
            return []
        self._client = self._conn = None
        broken = True
        try:
            reply = stream_replies(conn.read_response())
            broken = False
        except ResponseError:
            broken = False  # an error reply is read whole: the connection is fine
            raise
        finally:
            _release(client, conn, broken=broken)
        return list(reply)

    def hand_out(self, streams: Collection[str], budget: int) -> list[Record]:
        """Up to `budget` ready records of `streams`, in the order they were read."""
        out: list[Record] = []
        kept: list[Record] = []
        for r in self.ready:
            (out if r.source in streams and len(out) < budget else kept).append(r)
        self.ready = kept
        return out

    def drop(self) -> None:
        """After a lost connection: the unread reply is given up and the ready records leave the
        in-flight table, so the re-read of the consumer's pending entries hands them out."""
        if self._client is not None and self._conn is not None:
            _release(self._client, self._conn, broken=True)
        self._client = self._conn = None
        for r in self.ready:
            self._in_flight[r.source].pop(r.meta.entry_id, None)
        self.ready = []

    def give_back(self, client: redis.Redis) -> None:
        """On close: entries read ahead and never handed out stay pending with their delivery
        uncounted (XCLAIM ... RETRYCOUNT 0 JUSTID), so whoever reads them next, this consumer
        on its next start or another by XAUTOCLAIM, sees a first delivery and the retries of
        `maximum_retry_attempts` are all still theirs."""
        ids: dict[str, list[str]] = {}
        for r in self.ready:
            ids.setdefault(r.source, []).append(r.meta.entry_id)
        self.ready = []
        try:
            for raw, entries in self.take():
                ids.setdefault(raw.decode(), []).extend(e[0].decode() for e in entries)
            pipe = client.pipeline(transaction=False)
            for stream, stream_ids in ids.items():
                for chunk in chunks(stream_ids):
                    pipe.xclaim(
                        stream, self.group, self.consumer, 0, list(chunk), retrycount=0, justid=True
                    )
            pipe.execute()
        except RedisError as exc:  # they stay pending, counted as delivered once more
            log.debug(
                "mapping %s: entries read ahead keep their delivery count: %s",
                self.mapping,
                describe(exc),
            )
