"""The PostgreSQL store's own vacuum of its messages table, beside autovacuum.

Every message becomes at least two dead row versions (its claim's update, its ack's
delete), so the messages table churns at the rate of the queues. Autovacuum looks at a
table at most once a `autovacuum_naptime` (a minute by default, a server-wide setting no
table can lower), and a database may run with autovacuum off altogether: in either case
dead rows pile up, the table and its indexes grow, and every claim, which starts at the
head of its queue's index, steps over the dead entries there. So each node checks the
table's dead rows every CHECK_EVERY_S (one read of its statistics, `pg_stat_user_tables`)
and, once MIN_DEAD_ROWS and DEAD_SHARE of the live ones have died since the last vacuum
(rows an old snapshot keeps alive stay dead through a vacuum, and are not counted again),
runs a plain `VACUUM` of it in the background: one node at a time (an advisory lock
tried, not waited for), skipped when autovacuum holds the table (`SKIP_LOCKED`). A plain
vacuum takes no lock that adds, claims or acks wait for. It does not `ANALYZE`: the
claim's plan does not need statistics (pg_store._configure); they are autovacuum's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0
MIN_DEAD_ROWS = 50_000
DEAD_SHARE = 0.2

DEAD_ROWS = """
    SELECT n_dead_tup, n_live_tup FROM pg_stat_user_tables
    WHERE relid = 'messages'::regclass
"""
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(current_schema() || ':vacuum'))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext(current_schema() || ':vacuum'))"
VACUUM = "VACUUM (SKIP_LOCKED) messages"

Connection = Callable[[], AbstractAsyncContextManager[Any]]


class Vacuumer:
    """Started by the store's background loop (`poke`, cheap to call every turn); at most
    one vacuum of this node runs at a time, outside that loop, so the leases and delays
    it serves never wait for a vacuum."""

    def __init__(self, every_s: float = CHECK_EVERY_S, min_dead_rows: int = MIN_DEAD_ROWS) -> None:
        self._every_s = every_s
        self._min_dead = min_dead_rows
        self._left = 0  # dead rows the last vacuum could not remove (an old snapshot's)
        self._next = 0.0
        self._task: asyncio.Task[None] | None = None
        self.vacuums = 0
        """Vacuums this node ran (tests and logs)."""

    def poke(self, connection: Connection) -> None:
        if time.monotonic() < self._next or (self._task is not None and not self._task.done()):
            return
        self._next = time.monotonic() + self._every_s
        self._task = asyncio.ensure_future(self._check(connection))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _needs_vacuum(self, dead: int, live: int) -> bool:
        """Enough new dead rows: counted from what the last vacuum left, so that rows an
        old snapshot keeps do not make every check vacuum the whole table again."""
        new = dead - self._left
        return new >= self._min_dead and new >= DEAD_SHARE * live

    async def _check(self, connection: Connection) -> None:
        try:
            async with connection() as conn:
                cursor = await conn.execute(DEAD_ROWS)
                row = await cursor.fetchone()
                if row is None or not self._needs_vacuum(int(row[0]), int(row[1])):
                    return
                cursor = await conn.execute(TRY_LOCK)
                locked = await cursor.fetchone()
                if not (locked and locked[0]):
                    return  # another node vacuums it now
                try:
                    started = time.monotonic()
                    await conn.execute(VACUUM)
                    self.vacuums += 1
                    cursor = await conn.execute(DEAD_ROWS)
                    after = await cursor.fetchone()
                    self._left = int(after[0]) if after else 0
                    log.info(
                        "vacuumed the messages table (%d dead rows) in %.1f s",
                        int(row[0]),
                        time.monotonic() - started,
                    )
                finally:
                    await conn.execute(UNLOCK)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("vacuuming the messages table failed; the next check tries again")
