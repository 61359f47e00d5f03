"""Quotas per user, and the share of every server-wide limit kept for admins.

Before them, one user without privileges could take every session, long poll slot,
subscription, queue or map the server allows, and then even `admin` got
CODE_RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from test_engine import KEY, FakeClock, log_in
from test_store_migration import write_schema_2_file
from user_directory import as_user_command

from conftest import FAST_AUTH, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import errors
from qm_server.__main__ import build_parser, config_from_args
from qm_server.auth import PasswordHasher
from qm_server.config import Limits
from qm_server.engine import Engine
from qm_server.permissions import Grant
from qm_server.store import sqlite_file
from qm_server.store.base import UserDirectory, UserRecord
from qm_server.store.sqlite import SqliteStore

Stub = pb_grpc.QueueManagerServiceStub
GRANTS = (
    Grant("read", "queue", "*"),
    Grant("manage", "queue", "*"),
    Grant("write", "map", "*"),
    Grant("manage", "map", "*"),
)


def add_users(data_dir: Path, *names: str) -> None:
    """Users without admin rights who may read and manage every queue and write maps,
    written as `qm-server user add` and `user grant` write them."""
    hashed = PasswordHasher.from_settings(FAST_AUTH).hash("pw")

    async def add(users: UserDirectory) -> None:
        for name in names:
            await users.create_user(UserRecord(name, hashed, is_admin=False))
            await users.add_grants(name, GRANTS)

    as_user_command(data_dir, add)


@contextmanager
def stub_of(handle: ServerHandle) -> Iterator[Stub]:
    with grpc.insecure_channel(handle.target) as channel:
        yield Stub(channel)


def auth_code(stub: Stub, user: str, password: str) -> int:
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    reply = stub.Auth(pb.AuthRequest(username=user, password=encrypt_password(challenge, password)))
    return int(reply.code)


def test_sessions_per_user_and_the_admins_reserve(
    make_server: Callable[..., ServerHandle],
) -> None:
    # 10 % of 20 sessions are kept for admins: other users share 18, at most 10 each.
    handle = make_server(max_sessions=20, max_sessions_per_user=10, admin_reserve_percent=10)
    add_users(handle.data_dir, "bob", "carol")
    with stub_of(handle) as stub:
        assert [auth_code(stub, "bob", "pw") for _ in range(11)] == [pb.CODE_OK] * 10 + [
            pb.CODE_RESOURCE_EXHAUSTED  # bob's own quota
        ]
        assert [auth_code(stub, "carol", "pw") for _ in range(9)] == [pb.CODE_OK] * 8 + [
            pb.CODE_RESOURCE_EXHAUSTED  # 18 held: the rest is the admins'
        ]
        admin = [auth_code(stub, "admin", handle.admin_password) for _ in range(3)]
        assert admin == [pb.CODE_OK, pb.CODE_OK, pb.CODE_RESOURCE_EXHAUSTED]


def create(stub: Stub, token: str, kind: str, name: str) -> int:
    if kind == "queue":
        return int(stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name)).code)
    return int(stub.MapPut(pb.MapPutRequest(token=token, map=name, key="k", value="v")).code)


def destroy(stub: Stub, token: str, kind: str, name: str) -> int:
    if kind == "queue":
        request = pb.DestroyQueueRequest(token=token, queue_name=name, force=True)
        return int(stub.DestroyQueue(request).code)
    return int(stub.MapDestroy(pb.MapDestroyRequest(token=token, map=name)).code)


def test_queues_and_maps_per_user_hold_across_restarts(
    make_server: Callable[..., ServerHandle],
) -> None:
    # Half of 6 is the admins': others share 3, at most 2 each.
    limits = {
        "max_queues": 6,
        "max_maps": 6,
        "max_queues_per_user": 2,
        "max_maps_per_user": 2,
        "admin_reserve_percent": 50,
    }
    handle = make_server(**limits)
    add_users(handle.data_dir, "bob", "carol")
    ok, full = pb.CODE_OK, pb.CODE_RESOURCE_EXHAUSTED
    with stub_of(handle) as stub:
        bob, carol = login(stub, "bob", "pw"), login(stub, "carol", "pw")
        admin = login(stub, "admin", handle.admin_password)
        for kind in ("queue", "map"):
            assert [create(stub, bob, kind, f"b{i}") for i in range(3)] == [ok, ok, full]
            assert [create(stub, carol, kind, f"c{i}") for i in range(2)] == [ok, full]
            assert [create(stub, admin, kind, f"a{i}") for i in range(4)] == [ok, ok, ok, full]
    handle.stop()

    again = make_server(handle.data_dir, **limits)
    with stub_of(again) as stub:
        bob = login(stub, "bob", "pw")
        admin = login(stub, "admin", again.admin_password)
        for kind in ("queue", "map"):
            for name in ("a0", "a1", "a2", "c0"):
                assert destroy(stub, admin, kind, name) == ok
            assert create(stub, bob, kind, "b9") == full  # room left, but he holds two
            assert destroy(stub, bob, kind, "b0") == ok
            assert create(stub, bob, kind, "b9") == ok


def test_queues_and_maps_made_before_owners_were_kept_count_against_nobody(
    tmp_path: Path, make_server: Callable[..., ServerHandle]
) -> None:
    data_dir = tmp_path / "old"
    write_schema_2_file(data_dir)  # queues "jobs" and "idle", no owners
    handle = make_server(data_dir, max_queues_per_user=1)
    add_users(data_dir, "bob")
    with stub_of(handle) as stub:
        bob = login(stub, "bob", "pw")
        assert create(stub, bob, "queue", "mine") == pb.CODE_OK
        assert create(stub, bob, "queue", "more") == pb.CODE_RESOURCE_EXHAUSTED
    conn = sqlite3.connect(data_dir / sqlite_file.DB_FILE)
    try:
        owners = dict(conn.execute("SELECT name, owner FROM queues").fetchall())
    finally:
        conn.close()
    assert owners == {"jobs": None, "idle": None, "mine": "bob"}


def run_engine(tmp_path: Path, limits: Limits, scenario: Callable[[Engine], object]) -> None:
    """The engine on the real store with users bob and carol (see add_users)."""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        await store.create_user(
            UserRecord("admin", PasswordHasher.from_settings(FAST_AUTH).hash("pw"), True)
        )
        add_users(tmp_path, "bob", "carol")
        engine = Engine(store, KEY, limits=limits, auth=FAST_AUTH, clock=FakeClock())
        await engine.start()
        try:
            result = scenario(engine)
            assert asyncio.iscoroutine(result)
            await result
        finally:
            await engine.stop()
            await store.close()

    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def test_waiting_polls_per_user_and_the_admins_reserve(tmp_path: Path) -> None:
    limits = Limits(max_waiting_polls=10, max_waiting_polls_per_user=5, admin_reserve_percent=10)

    async def scenario(engine: Engine) -> None:
        tokens = {
            user: await log_in(engine, "pw", user, peer=user) for user in ("bob", "carol", "admin")
        }
        await engine.new_queue(tokens["admin"], "q")
        parked: list[asyncio.Future[object]] = []

        async def park(user: str, count: int) -> None:
            for _ in range(count):
                parked.append(asyncio.ensure_future(engine.take(tokens[user], "q", 1, 10_000)))
            await until(lambda: engine.signals.waiting() == len(parked))

        async def refused(user: str) -> str:
            try:
                await engine.take(tokens[user], "q", 1, 10_000)
            except errors.ResourceExhausted as exc:
                return str(exc)
            raise AssertionError("not refused")

        await park("bob", 5)
        assert "per-user limit" in await refused("bob")
        await park("carol", 4)  # 9 of 10 waiting: the last is the admins'
        assert "kept for admins" in await refused("carol")
        await park("admin", 1)
        assert "(limit)" in await refused("admin")
        for poll in parked:
            poll.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
        parked.clear()
        await park("carol", 5)  # the ended polls gave their room back
        for poll in parked:
            poll.cancel()
        await asyncio.gather(*parked, return_exceptions=True)

    run_engine(tmp_path, limits, scenario)


def test_subscriptions_per_user_and_the_admins_reserve(tmp_path: Path) -> None:
    limits = Limits(max_subscriptions=10, max_subscriptions_per_user=5, admin_reserve_percent=10)

    async def scenario(engine: Engine) -> None:
        tokens = {
            user: await log_in(engine, "pw", user, peer=user) for user in ("bob", "carol", "admin")
        }
        await engine.new_queue(tokens["admin"], "q")
        opened = []

        async def open_streams(user: str, count: int) -> None:
            for _ in range(count):
                opened.append(await engine.subscribe(tokens[user], "q", 1))

        async def refused(user: str) -> str:
            try:
                await engine.subscribe(tokens[user], "q", 1)
            except errors.ResourceExhausted as exc:
                return str(exc)
            raise AssertionError("not refused")

        await open_streams("bob", 5)
        assert "per-user limit" in await refused("bob")
        await open_streams("carol", 4)
        assert "kept for admins" in await refused("carol")
        await open_streams("admin", 1)
        assert "(limit)" in await refused("admin")
        for subscription in opened:
            await subscription.close()
        opened.clear()
        await open_streams("bob", 5)  # closing gave them back
        for subscription in opened:
            await subscription.close()

    run_engine(tmp_path, limits, scenario)


def test_the_quota_and_throttle_flags_reach_the_configuration() -> None:
    args = build_parser().parse_args(
        [
            *("--max-sessions-per-user", "11", "--max-waiting-polls-per-user", "12"),
            *("--max-subscriptions-per-user", "13", "--max-queues-per-user", "14"),
            *("--max-maps-per-user", "15", "--admin-reserve-percent", "16"),
            *("--host-login-failures", "17", "--user-login-failures", "18"),
        ]
    )
    config = config_from_args(args)
    limits = config.limits
    assert (
        limits.max_sessions_per_user,
        limits.max_waiting_polls_per_user,
        limits.max_subscriptions_per_user,
        limits.max_queues_per_user,
        limits.max_maps_per_user,
        limits.admin_reserve_percent,
        config.auth.host_failures_before_backoff,
        config.auth.user_failures_ceiling,
    ) == (11, 12, 13, 14, 15, 16, 17, 18)
