"""The PostgreSQL store vacuums its own messages table when dead rows pile up, whether or
not the database's autovacuum runs (qm_server/store/pg_vacuum.py), one node at a time.
The schema is the test's own (tests/pg_fixtures.py); without a reachable PostgreSQL the
test skips, saying why.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pg_fixtures import URL, pg_store

from qm_server.quotas import Room
from qm_server.store import pg_vacuum
from qm_server.store.pg_driver import psycopg
from qm_server.store.pg_vacuum import Vacuumer

MIB = 1 << 20
ROOM = Room.server_wide("queues", 100)
DEAD = 3000


async def vacuum_count(store: object) -> int:
    async with store._conn() as conn:  # type: ignore[attr-defined]
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        cursor = await conn.execute(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'messages'::regclass"
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def until_checked(vacuumer: Vacuumer, store: object, want: int, timeout_s: float) -> None:
    """Poke until this node has vacuumed `want` times (the table's statistics reach the
    check within about a second of the deletes), or the time is up."""
    deadline = time.monotonic() + timeout_s
    while vacuumer.vacuums < want and time.monotonic() < deadline:
        vacuumer.poke(store._conn)  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
    await vacuumer.stop()


def test_dead_rows_past_the_threshold_are_vacuumed_by_one_node_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        store = pg_store(tmp_path, timed=False)
        await store.open()
        try:
            await store.create_queue("q", ROOM)
            await store.enqueue("q", ["m"] * DEAD)
            claimed = await store.claim("q", 1, DEAD, 16 * MIB)
            assert len(claimed) == DEAD
            await store.ack(1, [d.message_id for d in claimed], True)
            before = await vacuum_count(store)

            # Another node holds the vacuum's lock: this one leaves the table to it.
            with psycopg.connect(URL, autocommit=True) as other:
                other.execute(f"SET search_path TO {store.schema}")
                assert other.execute(pg_vacuum.TRY_LOCK).fetchone() == (True,)
                busy = Vacuumer(every_s=0.0, min_dead_rows=DEAD)
                await until_checked(busy, store, 1, timeout_s=3.0)
                assert busy.vacuums == 0
                assert await vacuum_count(store) == before

            free = Vacuumer(every_s=0.0, min_dead_rows=DEAD)
            await until_checked(free, store, 1, timeout_s=30.0)
            assert free.vacuums == 1
            assert await vacuum_count(store) == before + 1
            # Below the threshold now: no vacuum more.
            await until_checked(free, store, 2, timeout_s=1.5)
            assert free.vacuums == 1
        finally:
            await store.close()

    asyncio.run(main())
