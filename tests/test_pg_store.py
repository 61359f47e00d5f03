"""The PostgreSQL store's own promises, beyond the contract every store keeps
(tests/test_store_contract.py and its siblings run that against PostgreSQL too): the
server on --store, migrations applied once by nodes starting together, several nodes on
one database (claims skip each other's rows, acks are fenced by the holder session, a
start releases nothing, an expired session's messages come back exactly once however many
nodes sweep), the claim plan, and the fail-fast start without the driver.

Each test takes a schema of its own (tests/pg_fixtures.py); without a reachable
PostgreSQL they skip, saying why.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from pg_fixtures import URL, pg_config, pg_store, schema_of, skip_unless_available

from conftest import ADMIN_PASSWORD, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.config import ServerConfig
from qm_server.errors import Code
from qm_server.quotas import Room
from qm_server.store import pg_sql
from qm_server.store.backends import StoreRefused, open_store
from qm_server.store.base import QueueCounts

MIB = 1 << 20
ROOM = Room.server_wide("queues", 100)
ALICE = 11
BOB = 12
T0 = 1_800_000_000_000
TTL_S = 30.0
TTL_MS = int(TTL_S * 1000)


class FakeClock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> float:
        return self.ms / 1000


def test_the_server_serves_queues_and_maps_from_postgresql(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    skip_unless_available()
    data_dir = tmp_path / "node"
    config = pg_config(data_dir)
    server = make_server(data_dir, store=config.store, store_schema=config.store_schema)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q")).code == 0
        added = stub.Add(pb.AddRequest(token=token, queue_name="q", element="hello\x00"))
        assert added.code == pb.CODE_OK
        polled = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=1000))
        assert (polled.code, polled.element, polled.message_id) == (
            pb.CODE_OK,
            "hello\x00",
            added.message_id,
        )
        assert polled.delivery_count == 1
        assert polled.enqueued_at_ms > 0
        acked = stub.Ack(pb.AckRequest(token=token, message_id=polled.message_id))
        assert acked.code == pb.CODE_OK
        again = stub.Ack(pb.AckRequest(token=token, message_id=polled.message_id))
        assert again.code == pb.CODE_MESSAGE_NOT_FOUND
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 0
        put = stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v"))
        assert put.code == pb.CODE_OK
        assert stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k")).value == "v"
    server.stop()
    # It was PostgreSQL that served them.
    from qm_server.store.pg_driver import psycopg

    with psycopg.connect(URL) as conn:
        conn.execute(
            psycopg.sql.SQL("SET search_path TO {}").format(
                psycopg.sql.Identifier(config.store_schema)
            )
        )
        assert conn.execute("SELECT name FROM queues").fetchall() == [("q",)]
        assert conn.execute("SELECT name FROM maps").fetchall() == [("m",)]
        assert conn.execute("SELECT name FROM users").fetchall() == [("admin",)]
    # The admin the first start created lives in the database: a second start finds it.
    server = make_server(data_dir, store=config.store, store_schema=config.store_schema)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k")).value == "v"


def test_a_missing_driver_fails_the_start_with_an_install_hint(tmp_path: Path) -> None:
    # psycopg made unimportable, as on a machine without the extra.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
        "from qm_server.__main__ import main\n"
        f"sys.exit(main(['--data-dir', {str(tmp_path / 'd')!r}, '--store', {URL!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'queue-manager[postgresql]'" in lines[0]


def test_a_store_url_that_is_not_postgresql_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreRefused, match="postgresql://"):
        open_store(ServerConfig(data_dir=tmp_path, store="mysql://db/qm"))


def test_nodes_starting_together_apply_each_migration_once(tmp_path: Path) -> None:
    skip_unless_available()
    from qm_server.store.pg_driver import psycopg
    from qm_server.store.pg_migrate import current_version, migrate

    schema = schema_of(tmp_path)

    async def node() -> int:
        async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
            return await migrate(conn, schema)

    async def main() -> tuple[list[int], int]:
        applied = await asyncio.gather(*(node() for _ in range(6)))
        async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
            return list(applied), await current_version(conn, schema)

    applied, version = asyncio.run(main())
    assert sorted(applied) == [0] * 5 + [len(pg_sql.MIGRATIONS)]
    assert version == len(pg_sql.MIGRATIONS)


def test_a_schema_from_a_newer_server_is_refused_without_a_traceback(tmp_path: Path) -> None:
    """`qm-server user` and a start on a schema migrated further than this server knows:
    exit status 2 and what to do (they used to end with a traceback); nothing written."""
    skip_unless_available()
    from qm_server.store.pg_driver import psycopg
    from qm_server.store.pg_migrate import current_version, migrate

    schema = schema_of(tmp_path)

    async def newer() -> int:
        async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
            await migrate(conn, schema)
            await conn.execute(
                f"UPDATE {schema}.meta SET value = '99' WHERE key = 'schema_version'"
            )
            return await current_version(conn, schema)

    assert asyncio.run(newer()) == 99
    store = ["--store", URL, "--store-schema", schema]
    listed = subprocess.run(
        [sys.executable, "-m", "qm_server", *store, "user", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "qm_server",
            *store,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "data"),
            "--rsa-bits",
            "2048",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for result in (listed, served):
        assert result.returncode == 2, result.stderr
        assert f"schema {schema!r} is at version 99, newer than this qm-server" in result.stderr
        assert "Traceback" not in result.stderr


def test_two_nodes_share_queues_and_fence_acks_by_the_holder_session(tmp_path: Path) -> None:
    async def main() -> None:
        one = pg_store(tmp_path, timed=False)
        await one.open()
        two = pg_store(tmp_path, timed=False)
        try:
            await one.create_queue("q", ROOM)
            await one.enqueue("q", ["a", "b", "c"])
            [a] = await one.claim("q", ALICE, 1, MIB)
            # A node starting does not release what sessions hold.
            await two.open()
            assert await two.queue_counts("q") == QueueCounts(2, 1)
            # Another session's ack or extension is fenced, on any node.
            assert await two.ack(BOB, [a.message_id], True) == [Code.MESSAGE_NOT_FOUND]
            assert await one.extend_leases(BOB, [a.message_id], 5000) == [
                (Code.MESSAGE_NOT_FOUND, 0)
            ]
            [b] = await two.claim("q", BOB, 1, MIB)
            assert (a.element, b.element) == ("a", "b")
            # Session ids are the cluster's: the holder acks through any node.
            assert await two.ack(ALICE, [a.message_id], True) == [Code.OK]
            assert await one.ack(BOB, [b.message_id], True) == [Code.OK]
            assert await one.queue_counts("q") == QueueCounts(1, 0)
        finally:
            await two.close()
            await one.close()

    asyncio.run(main())


async def sessions_of(store: Any, clock: FakeClock) -> Any:
    """A PgSessions on `store` (opened), on the test's clock, as a node's engine has."""
    from qm_server.store.pg_sessions import PgSessions

    await store.open()
    return PgSessions(store, TTL_S, clock)


async def log_in(sessions: Any, clock: FakeClock, user: str = "alice") -> Any:
    _, session = await sessions.create(user, "cred", clock(), Room.server_wide("sessions", 100))
    return session


def test_an_expired_sessions_messages_come_back_once_with_every_node_sweeping(
    tmp_path: Path,
) -> None:
    """A node dies: its sessions stop being refreshed, expire after the TTL, and of the
    nodes that all sweep at once exactly one deletes each and releases what it held."""

    async def main() -> None:
        clock = FakeClock()
        # No notify: its listening connection would outlive the crash below.
        dead = pg_store(tmp_path, clock=clock, timed=False, notify=False)
        dead_sessions = await sessions_of(dead, clock)
        await dead.create_queue("q", ROOM)
        await dead.enqueue("q", ["a", "b"])
        alice = await log_in(dead_sessions, clock)
        claimed = await dead.claim("q", alice.id, 2, MIB)
        await dead._pool.close()  # a crash: no close, no release
        nodes = [pg_store(tmp_path, clock=clock, timed=False) for _ in range(3)]
        survivors = [await sessions_of(store, clock) for store in nodes]
        expired: list[list[int]] = []
        for registry in survivors:
            registry._expire = spy(registry._expire, expired)
        try:
            clock.ms += TTL_MS // 2
            await asyncio.gather(*(s.sweep(0) for s in survivors))
            assert await nodes[0].queue_counts("q") == QueueCounts(0, 2)  # not yet
            clock.ms += TTL_MS // 2
            # Every survivor sweeps at once; each message is released exactly once.
            await asyncio.gather(*(s.sweep(0) for s in survivors))
            assert sorted(i for ids in expired for i in ids) == [alice.id]
            assert await nodes[0].queue_counts("q") == QueueCounts(2, 0)
            bob = await log_in(survivors[1], clock, "bob")
            again = await nodes[1].claim("q", bob.id, 2, MIB)
            assert [(d.message_id, d.delivery_count) for d in again] == [
                (d.message_id, 2) for d in claimed
            ]
            # The dead session's late ack changes nothing.
            assert await nodes[2].ack(alice.id, [claimed[0].message_id], True) == [
                Code.MESSAGE_NOT_FOUND
            ]
        finally:
            for store in nodes:
                await store.close()

    asyncio.run(main())


def spy(expire: Any, seen: list[list[int]]) -> Any:
    async def run(conn: Any) -> Any:
        ids, ready = await expire(conn)
        seen.append(ids)
        return ids, ready

    return run


def test_a_claim_that_commits_after_its_session_ended_is_released_by_the_sweep(
    tmp_path: Path,
) -> None:
    """Claims do not check that their session exists (pg_sessions.py says why): one that
    commits just after its session's end released what it held leaves messages held by
    no session, which the next sweep of any node releases."""

    async def main() -> None:
        clock = FakeClock()
        store = pg_store(tmp_path, clock=clock, timed=False)
        sessions = await sessions_of(store, clock)
        try:
            await store.create_queue("q", ROOM)
            await store.enqueue("q", ["a", "b"])
            alice = await log_in(sessions, clock)
            await sessions.end(alice)
            [late] = await store.claim("q", alice.id, 1, MIB)  # the race, in slow motion
            bob = await log_in(sessions, clock, "bob")
            [held] = await store.claim("q", bob.id, 1, MIB)
            assert await store.queue_counts("q") == QueueCounts(0, 2)
            await sessions.sweep(0)
            assert await store.queue_counts("q") == QueueCounts(1, 1)  # bob's stays held
            [again] = await store.claim("q", bob.id, 1, MIB)
            assert (again.message_id, again.delivery_count) == (late.message_id, 2)
            assert await store.ack(bob.id, [held.message_id], True) == [Code.OK]
        finally:
            await store.close()

    asyncio.run(main())


def test_a_node_whose_sweep_stalled_expires_nobody_that_round(tmp_path: Path) -> None:
    """After a stall (or an outage of the database) longer than half the TTL, no node
    has written its sessions' activity meanwhile: the first node back must not expire
    the sessions of the others, which write theirs at their next flush."""

    async def main() -> None:
        clock = FakeClock()
        one_store = pg_store(tmp_path, clock=clock, timed=False)
        two_store = pg_store(tmp_path, clock=clock, timed=False)
        one = await sessions_of(one_store, clock)
        two = await sessions_of(two_store, clock)
        try:
            await one_store.create_queue("q", ROOM)
            await one_store.enqueue("q", ["a"])
            alice = await log_in(one, clock)
            [a] = await one_store.claim("q", alice.id, 1, MIB)
            clock.ms += 2 * TTL_MS  # the database was out of reach that long
            one.touch(alice, clock())  # a call served from the cache meanwhile
            await two.sweep(0)
            assert await two_store.queue_counts("q") == QueueCounts(0, 1)
            await one.sweep(0)  # back: alice's activity written
            await two.sweep(0)
            assert await one_store.ack(alice.id, [a.message_id], True) == [Code.OK]
        finally:
            await two_store.close()
            await one_store.close()

    asyncio.run(main())


def test_claims_walk_the_ready_index_past_any_number_of_waiting_rows(tmp_path: Path) -> None:
    """The claim's plan reads the partial index of ready rows, in id order, even on
    statistics that have never been gathered: delayed messages cost it nothing."""

    async def main() -> None:
        store = pg_store(tmp_path, timed=False)
        await store.open()
        try:
            await store.create_queue("q", ROOM)
            await store.enqueue("q", [f"d{i}" for i in range(2000)], delay_ms=3_600_000)
            await store.enqueue("q", ["ready"])
            async with store._conn() as conn:
                params = store._p(name="q", session=1, node=0, limit=10, max_bytes=MIB, lease=None)
                cursor = await conn.execute(
                    "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, FORMAT TEXT) " + pg_sql.CLAIM, params
                )
                plan = "\n".join(str(row[0]) for row in await cursor.fetchall())
            assert "Index Scan using messages_ready on messages" in plan, plan
            # It read the one ready row, not the waiting ones.
            assert "actual rows=1 loops=1" in plan.split("messages_ready")[1].splitlines()[0]
        finally:
            await store.close()

    asyncio.run(main())


def test_a_claim_on_a_freshly_filled_queue_walks_the_ready_index(tmp_path: Path) -> None:
    """A queue filled faster than autovacuum analyzes it: on statistics that say the table
    is tiny, the planner read every ready row through a bitmap and sorted them (41 ms
    instead of 0.1 ms for 200,000 rows). The claim must still walk the ready index in id
    order and stop at its limit."""

    async def main() -> None:
        store = pg_store(tmp_path, timed=False)
        await store.open()
        try:
            await store.create_queue("q", ROOM)
            async with store._conn() as conn:  # statistics of an empty table, gone stale
                await conn.execute("ANALYZE messages")
            for start in range(0, 200_000, 5000):
                await store.enqueue("q", [f"m{i}" for i in range(start, start + 5000)])
            async with store._conn() as conn:
                params = store._p(name="q", session=1, node=0, limit=10, max_bytes=MIB, lease=None)
                cursor = await conn.execute(
                    "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, FORMAT TEXT) " + pg_sql.CLAIM, params
                )
                plan = "\n".join(str(row[0]) for row in await cursor.fetchall())
            assert "Bitmap" not in plan, plan
            assert "Index Scan using messages_ready on messages" in plan, plan
            assert "actual rows=10 loops=1" in plan.split("messages_ready")[1].splitlines()[0]
        finally:
            await store.close()

    asyncio.run(main())


def test_adds_at_once_on_many_connections_replay_their_own_ids(tmp_path: Path) -> None:
    """Adds on several connections draw from the one sequence at the same time, so an
    add's ids increase but may interleave with another's: a repeat answers exactly the
    ids the first call got."""
    from qm_server.store.base import IdempotencyKey

    async def main() -> None:
        store = pg_store(tmp_path, timed=False)
        await store.open()
        try:
            await store.create_queue("q", ROOM)

            def key(n: int) -> IdempotencyKey:
                return IdempotencyKey("alice", f"r{n}", b"fp%d" % n)

            adds = [store.enqueue("q", ["x"] * 500, idempotency=key(n)) for n in range(16)]
            first = await asyncio.gather(*adds)
            for added in first:
                assert added.ids == sorted(added.ids) and not added.replayed
            every = sorted(i for added in first for i in added.ids)
            assert len(set(every)) == 16 * 500
            again = await asyncio.gather(
                *(store.enqueue("q", ["x"] * 500, idempotency=key(n)) for n in range(16))
            )
            assert [a.ids for a in again] == [a.ids for a in first]
            assert all(a.replayed for a in again)
            assert (await store.queue_counts("q")).ready == 16 * 500
        finally:
            await store.close()

    asyncio.run(main())


def test_a_lost_connection_is_unavailable_and_unhealthy_until_calls_work_again(
    tmp_path: Path,
) -> None:
    from qm_server import errors
    from qm_server.store.pg_driver import psycopg

    async def main() -> None:
        store = pg_store(tmp_path, timed=False, pool_size=1)
        health: list[bool] = []
        store.set_health_listener(health.append)
        await store.open()
        try:
            await store.create_queue("q", ROOM)
            async with store._conn() as conn:
                pid = conn.info.backend_pid
            with psycopg.connect(URL, autocommit=True) as admin:
                # Waits until it ended: the connection died while idle (not while a
                # statement was in flight, whose outcome could not be known).
                admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
            with pytest.raises(errors.Unavailable, match="database is unavailable"):
                await store.enqueue("q", ["a"])
            assert health == [False]
            assert "PostgreSQL" in store.unhealthy_reason()
            # The pool replaced the connection: the next call works, and says so.
            assert (await store.enqueue("q", ["b"])).ids
            assert health == [False, True]
            assert await store.queue_counts("q") == QueueCounts(1, 0)
        finally:
            await store.close()

    asyncio.run(main())
