"""Operations that share one transaction of the SQLite store.

The writer stages adds, claims and ack deletions and writes them together before the
commit. These tests hold the writer on a blocking operation so that the operations
under test are queued behind it and are sure to land in one transaction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qm_server.store.base import Delivery
from qm_server.store.sqlite import SqliteStore

StoreTest = Callable[[SqliteStore], Awaitable[None]]


def run(tmp_path: Path, *tests: StoreTest) -> None:
    """Each test on the same data directory, each with a freshly opened store."""

    async def main() -> None:
        for test in tests:
            store = SqliteStore(tmp_path)
            await store.open()
            try:
                await test(store)
            finally:
                await store.close()

    asyncio.run(main())


async def in_one_transaction(store: SqliteStore, *calls: Awaitable[Any]) -> list[Any]:
    """Queue the calls behind an operation that holds the writer, then let it go."""
    release = threading.Event()
    gate = store._submit(lambda: release.wait(10))  # holds the writer thread
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)  # every call is now queued behind the gate
    release.set()
    await gate
    return list(await asyncio.gather(*tasks))


def described(deliveries: list[Delivery]) -> list[tuple[int, str, int]]:
    return [(d.message_id, d.element, d.delivery_count) for d in deliveries]


def test_claims_in_one_transaction_share_the_queue_in_arrival_order(tmp_path: Path) -> None:
    async def fill(store: SqliteStore) -> None:
        await store.create_queue("q", 10)
        await store.enqueue("q", [f"m{i}" for i in range(1, 11)])
        held = await store.claim("q", 9, 2, 1 << 20)
        assert await store.ack(9, [d.message_id for d in held], done=False) == [True, True]

    async def claim_together(store: SqliteStore) -> None:
        late_add = store.enqueue("q", ["m11"])
        a, b, c, d, ids = await in_one_transaction(
            store,
            store.claim("q", 1, 3, 1 << 20),
            store.claim("q", 2, 2, 1),  # a byte budget of 1: one message only
            store.claim("q", 3, 6, 1 << 20),
            store.claim("q", 4, 5, 1 << 20),
            late_add,
        )
        assert described(a) == [(1, "m1", 2), (2, "m2", 2), (3, "m3", 1)]
        assert described(b) == [(4, "m4", 1)]
        assert described(c) == [(i, f"m{i}", 1) for i in range(5, 11)]
        assert described(d) == [(11, "m11", 1)]
        assert ids == [11]
        counts = await store.queue_counts("q")
        assert (counts.ready, counts.in_flight) == (0, 11)
        # Acks of several sessions in one transaction, done and not.
        found = await in_one_transaction(
            store,
            store.ack(1, [1, 2, 3], done=True),
            store.ack(2, [4, 5], done=True),  # 5 is session 3's
            store.ack(3, [5, 6, 7, 8, 9, 10], done=False),
        )
        assert found == [[True, True, True], [True, False], [True] * 6]
        counts = await store.queue_counts("q")
        assert (counts.ready, counts.in_flight) == (6, 1)

    async def after_restart(store: SqliteStore) -> None:
        again = await store.claim("q", 5, 100, 1 << 20)
        assert described(again) == [(i, f"m{i}", 2) for i in range(5, 12)]

    run(tmp_path, fill, claim_together, after_restart)


def test_adds_queued_together_keep_every_row_in_id_order(tmp_path: Path) -> None:
    """Unary adds queued together share one run of ids and one INSERT; a run holding a NUL
    character goes row by row (json_each would unescape it): both commit every row, in id
    order, across a restart."""

    async def add(store: SqliteStore) -> None:
        await store.create_queue("q", 10)
        assert await store.enqueue("q", ["lone"]) == [1]
        # Unary adds queued together share one run of ids: one INSERT of three rows.
        shared = await in_one_transaction(
            store, *(store.enqueue("q", [e]) for e in ("a", "b", "c"))
        )
        assert shared == [[2], [3], [4]]
        with_nul = await in_one_transaction(
            store, store.enqueue("q", ["n\x00l"]), store.enqueue("q", ["after"])
        )
        assert with_nul == [[5], [6]]

    async def after_restart(store: SqliteStore) -> None:
        claimed = await store.claim("q", 1, 100, 1 << 20)
        elements = ["lone", "a", "b", "c", "n\x00l", "after"]
        assert described(claimed) == [(i, e, 1) for i, e in enumerate(elements, start=1)]

    run(tmp_path, add, after_restart)
