"""Queue depths of the PostgreSQL store for the metrics: one bounded query now and then,
never one per scrape.

The embedded store keeps every queue's counts in memory; this one would have to count
rows, and a count reads every row of the queue (seconds for millions), so a count per
scrape, from every Prometheus that scrapes every node, would be a load of its own. The
depths are read instead by one grouped statement over the messages table, run by the
store's background loop (pg_store._due_loop) only once a scrape has asked for them, at
most every DEPTHS_EVERY_S, and cut off by a statement timeout of DEPTHS_TIMEOUT_MS. A
scrape answers the last depths read, so they are up to DEPTHS_EVERY_S (plus a scrape
interval) old; a read cut off by its timeout keeps the previous figures and waits a
whole period before it tries again. Dead letters count as messages of their dead-letter
queue, as they do on the embedded store; the same read also counts them apart, and finds
the first add of each queue's oldest ready message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from qm_server.store.base import QueueCounts
from qm_server.store.pg_driver import psycopg

log = logging.getLogger(__name__)

DEPTHS_EVERY_S = 10.0
DEPTHS_TIMEOUT_MS = 2000

# Every queue with its ready, in-flight and delayed messages, the first add of its oldest
# ready one and the dead letters it holds: one pass over each table.
DEPTHS = """
    SELECT q.name, coalesce(c.ready, 0), coalesce(c.held, 0), coalesce(c.waiting, 0),
           coalesce(d.dead, 0), coalesce(c.oldest, 0)
    FROM queues q LEFT JOIN (
        SELECT queue_id, count(*) FILTER (WHERE state = 0) AS ready,
               count(*) FILTER (WHERE state = 1) AS held,
               count(*) FILTER (WHERE state = 2) AS waiting,
               min(enqueued_at) FILTER (WHERE state = 0) AS oldest
        FROM messages GROUP BY queue_id
    ) c ON c.queue_id = q.id LEFT JOIN (
        SELECT holder, count(*) AS dead FROM dead_letters GROUP BY holder
    ) d ON d.holder = q.id
"""


class DepthCache:
    """The last depths read, and when to read them again. `published` is called from the
    metrics thread; `refresh` on the store's event loop."""

    def __init__(
        self, every_s: float = DEPTHS_EVERY_S, timeout_ms: int = DEPTHS_TIMEOUT_MS
    ) -> None:
        self._every_s = every_s
        self._timeout_ms = timeout_ms
        self._asked = False
        self._next = 0.0
        self._depths: dict[str, QueueCounts] | None = None

    def published(self) -> dict[str, QueueCounts] | None:
        """The depths as last read (None until the first read), and a request for more."""
        self._asked = True
        depths = self._depths
        return None if depths is None else dict(depths)

    async def refresh(self, connection: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        """Read the depths again when a scrape asked and the period has passed."""
        if not self._asked or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self._every_s
        try:
            async with connection() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL statement_timeout = {int(self._timeout_ms)}")
                cursor = await conn.execute(DEPTHS)
                rows = await cursor.fetchall()
        except psycopg.errors.QueryCanceled:
            log.warning(
                "queue depths not read: counting took over %d ms (the metrics keep the last)",
                self._timeout_ms,
            )
            return
        self._depths = {
            str(name): QueueCounts(*(int(figure) for figure in figures)) for name, *figures in rows
        }
