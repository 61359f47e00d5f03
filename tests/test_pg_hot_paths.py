"""What the PostgreSQL store's hot paths cost the database: a stream's ack and refill is
one statement, a claim sizes its answer with inlined expressions, and opening a stream
counts nothing. Each test takes a schema of its own (tests/pg_fixtures.py); without a
reachable PostgreSQL they skip, saying why.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from pg_fixtures import pg_config, pg_store

from conftest import ADMIN_PASSWORD, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.errors import Code
from qm_server.quotas import Room
from qm_server.store import pg_sql

MIB = 1 << 20
ROOM = Room.server_wide("queues", 100)
ALICE = 11


def with_queue(tmp_path: Path, body: Callable[[Any], Awaitable[None]]) -> None:
    """Run `body` on the test's store (no background work) holding an empty queue "q"."""

    async def main() -> None:
        store = pg_store(tmp_path, timed=False)
        await store.open()
        try:
            await store.create_queue("q", ROOM)
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def counting_statements(store: Any) -> list[str]:
    """Record every statement the store sends from now on (its connections' execute)."""
    sent: list[str] = []
    borrow = store._conn

    @asynccontextmanager
    async def conn(commits: bool = True) -> AsyncIterator[Any]:
        async with borrow(commits) as real:
            execute = real.execute

            async def recorded(statement: Any, *args: Any, **kwargs: Any) -> Any:
                sent.append(str(statement))
                return await execute(statement, *args, **kwargs)

            real.execute = recorded
            try:
                yield real
            finally:
                del real.execute

    store._conn = conn
    return sent


def test_a_streams_ack_and_refill_is_one_statement(tmp_path: Path) -> None:
    """Subscribe acks and refills through ack_and_claim: one round trip and one commit,
    not an ack's and then a claim's. The answer is the same: OK per acked id, the
    refill oldest first."""

    async def body(store: Any) -> None:
        await store.enqueue("q", [f"m{i}" for i in range(6)])
        first = await store.claim("q", ALICE, 2, MIB)
        sent = counting_statements(store)
        codes, refill = await store.ack_and_claim(
            ALICE, [d.message_id for d in first], True, "q", 3, MIB
        )
        assert codes == [Code.OK, Code.OK]
        assert [d.element for d in refill] == ["m2", "m3", "m4"]
        assert sent == [pg_sql.ACK_AND_CLAIM]
        # An id the session does not hold costs the lookup that names its code.
        codes, refill = await store.ack_and_claim(ALICE, [-1], True, "q", 1, MIB)
        assert codes == [Code.MESSAGE_NOT_FOUND]
        assert [d.element for d in refill] == ["m5"]
        counts = await store.queue_counts("q")
        assert (counts.ready, counts.in_flight) == (0, 4)

    with_queue(tmp_path, body)


def test_a_claim_sizes_its_answer_with_inlined_expressions(tmp_path: Path) -> None:
    """The claim's answer-size functions (element_info_size and the ones it calls) are
    SQL functions that the planner inlines only when no argument is a subquery; called as
    functions they cost the database about 35 us a claimed row, more than the rest of the
    claim and ack together."""

    async def body(store: Any) -> None:
        await store.enqueue("q", ["m"] * 10)
        async with store._conn() as conn:
            params = store._p(name="q", session=1, node=0, limit=10, max_bytes=MIB, lease=5)
            cursor = await conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + pg_sql.CLAIM, params)
            plan = "\n".join(str(row[0]) for row in await cursor.fetchall())
        assert "sum(" in plan, plan
        assert "element_info" not in plan and "varint_size" not in plan, plan

    with_queue(tmp_path, body)


def test_a_subscribe_opens_without_counting_its_queue(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """Opening a stream checks that its queue exists; on PostgreSQL a count of its
    messages scans them all (seconds for millions, and a stream per consumer opens
    at once), so the open must not count. A missing queue is still refused at once."""
    config = pg_config(tmp_path / "pg")
    handle = make_server(store=config.store, store_schema=config.store_schema)
    server = handle.thread.server
    assert server is not None and server.engine is not None
    store = server.engine.store
    counted: list[str] = []
    count = store.queue_counts

    async def spy(name: str) -> Any:
        counted.append(name)
        return await count(name)

    store.queue_counts = spy  # type: ignore[method-assign]
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q")).code == pb.CODE_OK
        assert stub.Add(pb.AddRequest(token=token, queue_name="q", element="e")).code == 0

        def first_push(queue: str) -> pb.SubscribeResponse:
            opened = pb.SubscribeOpen(token=token, queue_name=queue, max_unacked=5)
            done = threading.Event()

            def requests() -> Iterator[pb.SubscribeRequest]:
                yield pb.SubscribeRequest(open=opened)
                done.wait(10)  # keep the stream open until the first push is read

            call = stub.Subscribe(requests(), timeout=10)
            try:
                return next(call)
            finally:
                done.set()
                call.cancel()

        push = first_push("q")
        assert (push.code, [e.element for e in push.element_info]) == (pb.CODE_OK, ["e"])
        assert first_push("missing").code == pb.CODE_QUEUE_NOT_FOUND
    assert counted == []


def test_an_ack_finds_its_rows_by_id_whatever_the_session_holds(tmp_path: Path) -> None:
    """On statistics older than the table (here: of the empty table), the ack was planned
    as a walk of every row the session holds, filtered by id: 71 ms to ack 100 of 50,000
    held. It must look its rows up by their ids in the primary key."""

    async def body(store: Any) -> None:
        async with store._conn() as conn:
            await conn.execute("ANALYZE messages")
        await store.enqueue("q", ["m"] * 5000)
        held = await store.claim("q", ALICE, 5000, 16 * MIB)
        args = {"ids": [d.message_id for d in held[:100]]}
        async with store._conn() as conn:
            cursor = await conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + pg_sql.ACK_DONE,
                {**args, "session": ALICE},
            )
            plan = "\n".join(str(row[0]) for row in await cursor.fetchall())
        deleting = plan.split("Delete on messages")[1].splitlines()[1]
        assert "Index Scan using messages_pkey" in deleting, plan
        assert "actual rows=100 " in deleting, plan

    with_queue(tmp_path, body)


def test_a_claim_after_a_vacuum_of_an_emptied_table_looks_its_rows_up_by_id(
    tmp_path: Path,
) -> None:
    """A VACUUM of a table whose rows were all acked records it as empty; rows added since
    do not change that until ANALYZE runs. On those statistics the claim's update, a join
    with the rows it picked, was planned as a walk of the whole primary key with the
    picked rows rescanned for each (2.3 s for 100 beside 10,000 rows). It must look the
    picked ids up in the primary key."""

    async def body(store: Any) -> None:
        await store.enqueue("q", ["m"] * 3000)
        held = await store.claim("q", ALICE, 3000, 16 * MIB)
        await store.ack(ALICE, [d.message_id for d in held], True)
        async with store._conn() as conn:
            await conn.execute("VACUUM (TRUNCATE false) messages")
        await store.enqueue("q", ["m"] * 3000)
        async with store._conn() as conn:
            params = store._p(name="q", session=1, node=0, limit=10, max_bytes=MIB, lease=None)
            cursor = await conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + pg_sql.CLAIM, params
            )
            plan = "\n".join(str(row[0]) for row in await cursor.fetchall())
        assert "Join Filter" not in plan, plan
        assert "Index Cond: (id = ANY" in plan, plan

    with_queue(tmp_path, body)
