"""What the PostgreSQL store gives back, and what falls due: messages released by an
ended session or an expired lease (dead-lettered past max_deliveries, or waiting out
their retry backoff), delays that end, and ready messages past their queue's max_age.

A mixin of PgStore (pg_base.py says why mixins). `run_due` is what each node's
background loop (pg_store._due_loop) runs: one transaction whose row updates make each
expiry happen once, whichever node runs it. Releases run in the caller's transaction
(an ack's, a claim's, or pg_sessions' end of a session), so that what a session held is
ready again exactly when its end commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qm_server import lifecycle
from qm_server.store import pg_sql as sql
from qm_server.store.pg_base import PgBase
from qm_server.store.pg_driver import Conn
from qm_server.store.settings_json import settings_from_json

# Rows one statement of run_due moves at most (it loops until none is left).
DUE_CHUNK = 1000


class PgDue(PgBase):
    async def release_session(self, session_id: int) -> None:
        self._notify(await self._tx(lambda conn: self.release_sessions(conn, [session_id])))

    async def release_sessions(self, conn: Conn, session_ids: list[int]) -> set[str]:
        """In the caller's transaction: make what the sessions held ready again (past
        max_deliveries, dead-lettered) and forget them as holders of expired leases. The
        names of the queues that got ready messages, for `_notify` after the commit."""
        args = {"sessions": session_ids}
        cursor = await conn.execute(sql.RELEASE_SESSION, args)
        rows = await cursor.fetchall()
        await conn.execute(sql.FORGET_EXPIRED_HOLDER, args)
        return await self._released(conn, rows, lifecycle.CAUSE_SESSION_END, backoff=False)

    async def _released(
        self, conn: Conn, rows: Sequence[tuple[Any, ...]], cause: str, backoff: bool
    ) -> set[str]:
        """Rows (id, queue id, delivery count) just made ready in this transaction: those
        past their queue's max_deliveries go to its dead-letter queue (with `cause`), and
        with `backoff`, the others wait out the queue's retry delay. The names of the
        queues that got ready messages."""
        if not rows:
            return set()
        by_queue: dict[int, list[tuple[int, int]]] = {}
        for message_id, queue_id, count in rows:
            by_queue.setdefault(int(queue_id), []).append((int(message_id), int(count)))
        cursor = await conn.execute(sql.QUEUE_NAMES_OF, (list(by_queue),))
        queues = {int(i): (str(n), settings_from_json(t)) for i, n, t in await cursor.fetchall()}
        ready: set[str] = set()
        for queue_id, released in by_queue.items():
            if queue_id not in queues:
                continue
            name, settings = queues[queue_id]
            target = None
            if settings.max_deliveries and settings.dead_letter_queue not in ("", name):
                target = await self._queue_row(conn, settings.dead_letter_queue)
            dead = [m for m, n in released if target and n >= settings.max_deliveries]
            waits = []
            if backoff and settings.retry.initial_delay_ms:
                waits = [
                    (m, w)
                    for m, n in released
                    if m not in dead and (w := settings.retry.delay_ms(n)) > 0
                ]
            if dead and target is not None:
                await self._dead_letter(conn, int(target[0]), name, dead, cause)
                ready.add(settings.dead_letter_queue)
            if waits:
                await conn.execute(
                    sql.TO_WAITING,
                    self._p(ids=[m for m, _ in waits], waits=[w for _, w in waits]),
                )
                self._due_soon(min(w for _, w in waits))
            if len(dead) + len(waits) < len(released):
                ready.add(name)
        return ready

    async def _dead_letter(
        self, conn: Conn, target: int, origin: str, ids: list[int], cause: str
    ) -> None:
        args = self._p(target=target, ids=ids, origin=origin, cause=cause)
        await conn.execute(sql.DEAD_LETTER, args)

    async def run_due(self) -> None:
        ready = await self._tx(self._run_due)
        self._notify(ready)

    async def _run_due(self, conn: Conn) -> set[str]:
        ready: set[str] = set()
        while True:
            cursor = await conn.execute(sql.EXPIRE_LEASES, self._p(limit=DUE_CHUNK))
            rows = await cursor.fetchall()
            ready |= await self._released(conn, rows, lifecycle.CAUSE_LEASE_EXPIRY, False)
            if len(rows) < DUE_CHUNK:
                break
        while True:
            cursor = await conn.execute(sql.COME_DUE, self._p(limit=DUE_CHUNK))
            rows = await cursor.fetchall()
            if rows:
                ready |= await self._names_of(conn, {int(r[0]) for r in rows})
            if len(rows) < DUE_CHUNK:
                break
        await self._age_out(conn)
        return ready

    async def _age_out(self, conn: Conn) -> None:
        """Ready messages past their queue's max_age: dead-lettered, or dropped.

        Ids follow first add times (a sequence, and moves keep both), so each queue is
        walked from its smallest ready id and the walk stops at the first young one."""
        now = await self._now_ms(conn)
        cursor = await conn.execute(sql.ALL_QUEUE_SETTINGS)
        for queue_id, name, text in await cursor.fetchall():
            settings = settings_from_json(text)
            if not settings.max_age_ms:
                continue
            cutoff = now - settings.max_age_ms
            old: list[int] = []
            while True:
                cursor = await conn.execute(
                    sql.OLDEST_READY_ROWS + " OFFSET %s FOR UPDATE SKIP LOCKED",
                    (queue_id, DUE_CHUNK, len(old)),
                )
                rows = await cursor.fetchall()
                young = False
                for message_id, enqueued_at in rows:
                    if int(enqueued_at) > cutoff:
                        young = True
                        break
                    old.append(int(message_id))
                if young or len(rows) < DUE_CHUNK:
                    break
            if not old:
                continue
            target = None
            if settings.dead_letter_queue not in ("", name):
                target = await self._queue_row(conn, settings.dead_letter_queue)
            if target is not None:
                await self._dead_letter(conn, int(target[0]), name, old, lifecycle.CAUSE_MAX_AGE)
            else:
                await conn.execute(sql.DELETE_IDS, {"ids": old})
