"""What every part of the PostgreSQL store stands on: its connections (`_conn`, `_tx`),
its health, statement parameters with the clock, waking waiters, and the lookups of a
queue or map by name.

PgStore is put together from mixins, each a group of the Store interface's operations
in a module of its own (pg_queues.py: settings, listings, dead letters; pg_maps.py: maps;
pg_due.py: releases and what falls due), all on this base. Mixins rather than objects the
store delegates to: the store still IS one Store (store/base.py), its operations are its
own methods with no forwarding layer, and every part shares one pool, one health and one
set of hints. The state is created by PgStore.__init__; it is declared here, so that mypy
checks every mixin's use of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from qm_server import errors
from qm_server.store import pg_outcome
from qm_server.store import pg_sql as sql
from qm_server.store.base import HealthListener, QueueCounts, Store
from qm_server.store.pg_driver import Conn, psycopg, psycopg_pool
from qm_server.store.pg_notify import READY, ClusterSignals

log = logging.getLogger(__name__)

T = TypeVar("T")

# Runs of a transaction that the database rolls back for a deadlock.
TX_ATTEMPTS = 3


class PgBase(Store):
    """The state and helpers the PostgreSQL store's parts share (set by PgStore)."""

    _clock: Callable[[], float] | None
    _pool: psycopg_pool.AsyncConnectionPool[Conn]
    _closed: bool
    _healthy: bool
    _reason: str
    _health_listener: HealthListener | None
    _ready_listener: Callable[[str], None] | None
    _gone_listener: Callable[[str], None] | None
    _signals: ClusterSignals | None
    _hints: dict[str, int]
    _due_task: asyncio.Task[None] | None
    _sooner: asyncio.Event
    _wake_at: float
    _recheck_at: float

    def _due_soon(self, in_ms: int, recheck: bool = False) -> None:
        """Something of this node falls due in about `in_ms`: wake the due loop if it
        sleeps past that. `recheck`: run the fallback's recheck then too."""
        if recheck:
            self._recheck_at = 0.0
        if self._due_task is None:
            return
        if time.monotonic() + in_ms / 1000 < self._wake_at:
            self._sooner.set()

    def _p(self, **params: Any) -> dict[str, Any]:
        """Statement parameters with `now`: None (the database's clock) or the test's."""
        params["now"] = None if self._clock is None else int(self._clock() * 1000)
        return params

    async def _now_ms(self, conn: Conn) -> int:
        return await _scalar(conn, f"SELECT {sql.NOW}", self._p())

    def _notify(self, names: set[str]) -> None:
        """Messages became ready here (the write committed): wake this node's waiters
        and tell the other nodes."""
        self._wake(names)
        if self._signals is not None:
            self._signals.announce(READY, names)

    def _wake(self, names: set[str]) -> None:
        for name in names:
            self._hints[name] = max(1, self._hints.get(name, 0))
            if self._ready_listener is not None:
                self._ready_listener(name)

    def _gone(self, name: str) -> None:
        """Another node destroyed the queue: end this node's waits and streams on it."""
        self._hints.pop(name, None)
        if self._gone_listener is not None:
            self._gone_listener(name)

    @contextlib.asynccontextmanager
    async def _conn(self, commits: bool = True) -> AsyncIterator[Conn]:
        """A pooled connection; a database out of reach is errors.Unavailable (or
        OutcomeUnknown when a statement that `commits` by itself was in flight:
        pg_outcome.py), and the store reports itself unhealthy until a call works again."""
        if self._closed:
            raise errors.Unavailable("the store is closed")
        conn: Conn | None = None
        try:
            async with self._pool.connection() as conn:
                if commits:
                    pg_outcome.check_open(conn)  # a failure then applied nothing
                yield conn
        except psycopg.errors.TransactionRollback:
            raise  # the database is fine; _tx runs it again
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            self._set_healthy(False, f"PostgreSQL: {exc}")
            raise pg_outcome.failure(exc, conn, commits) from exc
        self._set_healthy(True, "")

    async def _tx(self, run: Callable[[Conn], Awaitable[T]], snapshot: bool = False) -> T:
        """`run` in one transaction (a read-only snapshot if `snapshot`); run again, in a
        new one, when the database rolled it back for a deadlock (rare: claims and
        sweeps skip locked rows, but two nodes' releases may meet)."""
        for attempt in range(TX_ATTEMPTS):
            try:
                async with self._conn(commits=False) as conn:
                    if snapshot:
                        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        try:
                            return await run(conn)
                        finally:
                            await conn.execute("ROLLBACK")
                    async with pg_outcome.transaction(conn):
                        return await run(conn)
            except psycopg.errors.TransactionRollback:
                if attempt == TX_ATTEMPTS - 1:
                    raise
                log.info("transaction rolled back by the database (deadlock); run again")
        raise AssertionError("unreachable")

    def _set_healthy(self, healthy: bool, reason: str) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        self._reason = reason
        if self._health_listener is not None:
            self._health_listener(healthy)

    async def _queue_row(self, conn: Conn, name: str) -> tuple[Any, ...] | None:
        cursor = await conn.execute(sql.QUEUE, (name,))
        return await cursor.fetchone()

    async def _queue(self, conn: Conn, name: str, lock: bool = False) -> tuple[int, Any, Any]:
        cursor = await conn.execute(sql.QUEUE_FOR_UPDATE if lock else sql.QUEUE, (name,))
        row = await cursor.fetchone()
        if row is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return int(row[0]), row[1], row[2]

    async def _names_of(self, conn: Conn, queue_ids: set[int]) -> set[str]:
        cursor = await conn.execute(sql.QUEUE_NAMES_OF, (list(queue_ids),))
        return {str(row[1]) for row in await cursor.fetchall()}

    async def _counts(self, conn: Conn, queue_id: int) -> QueueCounts:
        cursor = await conn.execute(sql.COUNTS, (queue_id,))
        ready, in_flight, delayed = _row(await cursor.fetchone())
        return QueueCounts(int(ready), int(in_flight), int(delayed))

    async def _map(self, conn: Conn, name: str) -> int:
        cursor = await conn.execute(sql.MAP_ID, (name,))
        row = await cursor.fetchone()
        if row is None:
            raise errors.MapNotFound(f"map {name!r} does not exist")
        return int(row[0])


def _row(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


def _one(row: tuple[Any, ...] | None) -> Any:
    return _row(row)[0]


async def _scalar(conn: Conn, statement: str, params: Any) -> int:
    cursor = await conn.execute(statement, params)
    return int(_one(await cursor.fetchone()) or 0)
