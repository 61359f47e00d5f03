"""Operations that share one transaction of the SQLite store.

The writer stages adds, claims and ack deletions and writes them together before the
commit. These tests hold the writer on a blocking operation so that the operations
under test are queued behind it and are sure to land in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.errors import Code
from qm_server.quotas import Room
from qm_server.store.base import Delivery
from qm_server.store.sqlite import ADDS, SqliteStore

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
    queued = asyncio.Event()
    with submits_counted(store, len(calls), queued.set):
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.wait_for(queued.wait(), 10)  # every call is queued behind the gate
    release.set()
    await gate
    return list(await asyncio.gather(*tasks))


@contextlib.contextmanager
def submits_counted(
    store: SqliteStore, count: int, then: Callable[[], None], stage: str | None = None
) -> Iterator[None]:
    """Call `then` once `count` operations (of `stage` only, if given) were handed to the
    store's writer, on the event loop, where operations are submitted."""
    submit = store._submit
    submitted = 0

    def counted(run: Any, op_stage: str = "", *args: Any) -> Any:
        nonlocal submitted
        future = submit(run, op_stage, *args)
        if stage is None or op_stage == stage:
            submitted += 1
            if submitted == count:
                then()
        return future

    store._submit = counted  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del store._submit  # the class's own again


def described(deliveries: list[Delivery]) -> list[tuple[int, str, int]]:
    return [(d.message_id, d.element, d.delivery_count) for d in deliveries]


def test_claims_in_one_transaction_share_the_queue_in_arrival_order(tmp_path: Path) -> None:
    async def fill(store: SqliteStore) -> None:
        await store.create_queue("q", Room.server_wide("queues", 10))
        await store.enqueue("q", [f"m{i}" for i in range(1, 11)])
        held = await store.claim("q", 9, 2, 1 << 20)
        assert await store.ack(9, [d.message_id for d in held], done=False) == [Code.OK, Code.OK]

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
        assert ids.ids == [11]
        counts = await store.queue_counts("q")
        assert (counts.ready, counts.in_flight) == (0, 11)
        # Acks of several sessions in one transaction, done and not.
        found = await in_one_transaction(
            store,
            store.ack(1, [1, 2, 3], done=True),
            store.ack(2, [4, 5], done=True),  # 5 is held by the session with id 3
            store.ack(3, [5, 6, 7, 8, 9, 10], done=False),
        )
        OK, NOT_FOUND = Code.OK, Code.MESSAGE_NOT_FOUND
        assert found == [[OK, OK, OK], [OK, NOT_FOUND], [OK] * 6]
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
        await store.create_queue("q", Room.server_wide("queues", 10))
        assert (await store.enqueue("q", ["lone"])).ids == [1]
        # Unary adds queued together share one run of ids: one INSERT of three rows.
        shared = await in_one_transaction(
            store, *(store.enqueue("q", [e]) for e in ("a", "b", "c"))
        )
        assert [added.ids for added in shared] == [[2], [3], [4]]
        with_nul = await in_one_transaction(
            store, store.enqueue("q", ["n\x00l"]), store.enqueue("q", ["after"])
        )
        assert [added.ids for added in with_nul] == [[5], [6]]

    async def after_restart(store: SqliteStore) -> None:
        claimed = await store.claim("q", 1, 100, 1 << 20)
        elements = ["lone", "a", "b", "c", "n\x00l", "after"]
        assert described(claimed) == [(i, e, 1) for i, e in enumerate(elements, start=1)]

    run(tmp_path, add, after_restart)


def test_concurrent_adds_share_one_commit(make_server: Callable[..., ServerHandle]) -> None:
    """Group commit groups: concurrent Add calls over gRPC that arrive while the writer
    is busy (with a slow fsync, say) are committed together, in one transaction, not one
    each."""
    handle = make_server()
    running = handle.thread.server
    loop = handle.thread._loop
    assert running is not None and loop is not None
    store = running.store
    assert isinstance(store, SqliteStore)
    calls = 50
    release, queued = threading.Event(), threading.Event()
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))

        async def hold_the_writer() -> None:
            store._submit(lambda: release.wait(10))

        asyncio.run_coroutine_threadsafe(hold_the_writer(), loop).result(10)
        commits_before = store.commits
        with submits_counted(store, calls, queued.set, ADDS):
            adds = [
                stub.Add.future(pb.AddRequest(token=token, queue_name="q", element=f"e{i}"))
                for i in range(calls)
            ]
            assert queued.wait(10)
        release.set()
        replies = [add.result(timeout=10) for add in adds]
        assert [r.code for r in replies] == [pb.CODE_OK] * calls
        assert len({r.message_id for r in replies}) == calls
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == calls
    # The holding operation's transaction and the adds' one; a sweep of the server's
    # may add one of its own.
    assert store.commits - commits_before <= 3 < calls
