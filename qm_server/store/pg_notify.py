"""Wake-ups between nodes on one schema: PostgreSQL's LISTEN/NOTIFY, outside every write.

A node that made messages ready (an add, a release, a nack, an expiry it swept) or
destroyed a queue wakes its own waiters at once (pg_base._notify) and announces it here;
so does a node that ended sessions (pg_sessions), whose other nodes end their streams.
Announcing never runs inside the write's transaction: a NOTIFY in a transaction takes a
database-wide lock at commit, which would queue every notifying commit behind one another
and defeat the group commit. Instead the announcement is sent after the commit, from one
connection of this node's, and coalesced: names announced while a send is in flight or
within COALESCE_S of the last one go out together in the next, one notification per
queue. So a burst of adds to a queue costs one NOTIFY per COALESCE_S, not one per add.

Each node has ONE listening connection (never one per waiting poll). A notification from
another node calls the store's ready or queue-gone handler for that queue; a node ignores
its own (it woke its waiters already). Notifications can be lost (the listener's connection
dropped, a database without LISTEN, notify turned off): the store's fallback
(pg_store._recheck, once per DUE_POLL_S) wakes waiters of queues that this node thought
empty but that hold ready messages, and ends streams of queues that no longer exist, so a
lost notification costs latency, never a message. After the listener reconnects it asks
for that recheck at once (`on_gap`), since anything sent meanwhile was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from qm_server.store.pg_driver import psycopg

log = logging.getLogger(__name__)

# At most one notification per queue per this long (a burst's later adds ride along).
COALESCE_S = 0.002
# Wait before connecting the listener again after its connection failed.
RECONNECT_S = 0.5
CONNECT_TIMEOUT_S = 10
READY = "r"
GONE = "g"
ENDED = "e"  # a session ended (pg_sessions): the name is its id


def channel_of(schema: str) -> str:
    """The channel of a schema's nodes: short (channel names are identifiers, at most 63
    bytes) and distinct per schema, so two stores in one database never wake each other."""
    return "qm_" + hashlib.sha256(schema.encode()).hexdigest()[:24]


class ClusterSignals:
    """Sends this node's announcements and hands other nodes' to the store."""

    def __init__(
        self,
        url: str,
        schema: str,
        node: int,
        on_ready: Callable[[str], None],
        on_gone: Callable[[str], None],
        on_gap: Callable[[], None],
        on_ended: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._url = url
        self.channel = channel_of(schema)
        self._node = node
        self._on_ready = on_ready
        self._on_gone = on_gone
        self._on_gap = on_gap
        self._on_ended = on_ended
        self._pending: set[str] = set()
        self._sender: psycopg.AsyncConnection[Any] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._stopping = False
        self.sent = 0  # notifications sent, for the tests of the coalescing

    async def start(self) -> None:
        """Listen in the background; returns once the first LISTEN is in place (or failed:
        the fallback covers a node whose listener is not connected)."""
        self._listener = asyncio.ensure_future(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), CONNECT_TIMEOUT_S)
        with contextlib.suppress(psycopg.Error):
            await self._connect_sender()  # now, not on the first add's path

    async def stop(self) -> None:
        self._stopping = True
        if self._flusher is not None and not self._flusher.done():
            # What was announced last still goes out (a clean stop's releases).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flusher), 1.0)
        for task in (self._listener, self._flusher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._sender is not None:
            await self._sender.close()

    def announce(self, kind: str, names: set[str]) -> None:
        """Tell the other nodes, soon after this point (the caller's commit is done)."""
        if not names:
            return
        self._pending.update(f"{kind}{self._node}:{name}" for name in names)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch = sorted(self._pending)
            self._pending.clear()
            try:
                await self._send(batch)
            except psycopg.Error as exc:
                # Lost: the other nodes' fallback finds these messages within a second.
                log.info("could not notify the other nodes (%s); their fallback will", exc)
                await self._drop_sender()
            await asyncio.sleep(COALESCE_S)

    async def _connect_sender(self) -> psycopg.AsyncConnection[Any]:
        if self._sender is None or self._sender.closed:
            self._sender = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        return self._sender

    async def _send(self, payloads: list[str]) -> None:
        sender = await self._connect_sender()
        await sender.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (self.channel, payloads)
        )
        self.sent += len(payloads)

    async def _drop_sender(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(psycopg.Error):
                await self._sender.close()
            self._sender = None

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                )
                async with conn:
                    await conn.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel))
                    )
                    if self._listening.is_set():
                        self._on_gap()  # what was sent while we were away is lost
                    self._listening.set()
                    async for notification in conn.notifies():
                        self._dispatch(notification.payload)
            except psycopg.Error as exc:
                log.info("the listener's connection failed (%s); connecting again", exc)
            self._listening.set()  # start() waits no longer; the fallback covers us
            await asyncio.sleep(RECONNECT_S)

    def _dispatch(self, payload: str) -> None:
        kind, rest = payload[:1], payload[1:]
        node, _, name = rest.partition(":")
        if not name or node == str(self._node):
            return
        if kind == READY:
            self._on_ready(name)
        elif kind == GONE:
            self._on_gone(name)
        elif kind == ENDED:
            self._on_ended(name)
