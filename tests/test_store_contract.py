"""What every store promises (qm_server/store/base.py), run against each store.

These tests speak only the Store and UserDirectory interfaces, so a new backend joins by
adding its factory to STORES (or a fixture param that skips with a reason where its server
is missing); nothing below names a particular store. The user-directory tests run both on
the store itself and on the lighter directory that `qm-server user ...` opens beside it.
Behaviour that one store implements its own way (SQLite's staging of a transaction, its
file faults) is tested beside that store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from pg_fixtures import pg_config, pg_store

from qm_server import errors
from qm_server.config import ServerConfig
from qm_server.errors import Code
from qm_server.permissions import Grant
from qm_server.quotas import Room
from qm_server.store.backends import open_user_directory
from qm_server.store.base import Delivery, QueueCounts, Store, UserDirectory, UserRecord
from qm_server.store.sqlite import SqliteStore

StoreFactory = Callable[[Path], Store]
# The PostgreSQL store takes a schema of its own per test (tests/pg_fixtures.py), and
# skips, saying why, where no PostgreSQL is reachable.
STORES: dict[str, StoreFactory] = {"sqlite": SqliteStore, "postgresql": pg_store}

ALICE, BOB = 11, 22  # two sessions
MIB = 1 << 20

OK = Code.OK
NOT_FOUND = Code.MESSAGE_NOT_FOUND


def queues(limit: int) -> Room:
    return Room.server_wide("queues", limit)


def maps(limit: int) -> Room:
    return Room.server_wide("maps", limit)


class Harness:
    """A store opened on a data directory, and a way to close it and open it again there
    (a clean restart; in-flight state does not outlive it)."""

    def __init__(self, factory: StoreFactory, data_dir: Path) -> None:
        self._factory = factory
        self._data_dir = data_dir
        self.store = factory(data_dir)
        self.ready: list[str] = []

    async def open(self) -> Store:
        self.store.set_ready_listener(self.ready.append)
        await self.store.open()
        return self.store

    async def reopen(self) -> Store:
        await self.store.close()
        self.store = self._factory(self._data_dir)
        return await self.open()


Body = Callable[[Harness], Awaitable[None]]


@pytest.fixture(params=sorted(STORES))
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Body], None]:
    """Run an async test body against a freshly opened store of each kind."""
    factory = STORES[request.param]

    def go(body: Body) -> None:
        async def main() -> None:
            harness = Harness(factory, tmp_path)
            await harness.open()
            try:
                await body(harness)
            finally:
                await harness.store.close()

        asyncio.run(main())

    return go


def elements(deliveries: list[Delivery]) -> list[str]:
    return [d.element for d in deliveries]


def ids(deliveries: list[Delivery]) -> list[int]:
    return [d.message_id for d in deliveries]


# Queues ---------------------------------------------------------------------------------


def test_queue_names_are_unique_and_their_number_is_capped(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("a", queues(2))
        with pytest.raises(errors.QueueAlreadyExists):
            await h.store.create_queue("a", queues(2))
        await h.store.create_queue("b", queues(2))
        with pytest.raises(errors.ResourceExhausted):
            await h.store.create_queue("c", queues(2))
        with pytest.raises(errors.QueueNotFound):  # the refused one was not half made
            await h.store.queue_counts("c")

    run(body)


def test_a_missing_queue_is_reported_by_every_queue_operation(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        for call in (
            lambda: h.store.enqueue("nope", ["x"]),
            lambda: h.store.claim("nope", ALICE, 1, MIB),
            lambda: h.store.queue_counts("nope"),
            lambda: h.store.destroy_queue("nope", True),
        ):
            with pytest.raises(errors.QueueNotFound):
                await call()

    run(body)


def test_ids_increase_in_add_order_across_queues_and_restarts(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("a", queues(10))
        await h.store.create_queue("b", queues(10))
        first = (await h.store.enqueue("a", ["1", "2"])).ids
        second = (await h.store.enqueue("b", ["3"])).ids
        assert first[0] < first[1] < second[0]
        # The newest message is acked away; its id is still never handed out again.
        [last] = await h.store.claim("b", ALICE, 1, MIB)
        assert await h.store.ack(ALICE, [last.message_id], done=True) == [OK]
        store = await h.reopen()
        [after] = (await store.enqueue("a", ["4"])).ids
        assert after > second[0]

    run(body)


def test_claims_take_the_oldest_ready_messages_and_count_deliveries(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["m1", "m2", "m3"])
        claimed = await h.store.claim("q", ALICE, 2, MIB)
        assert elements(claimed) == ["m1", "m2"]
        assert [d.delivery_count for d in claimed] == [1, 1]
        assert await h.store.queue_counts("q") == QueueCounts(ready=1, in_flight=2)
        assert elements(await h.store.claim("q", BOB, 5, MIB)) == ["m3"]
        assert await h.store.claim("q", BOB, 5, MIB) == []

    run(body)


def test_a_claim_takes_the_first_message_whatever_its_size(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["x" * 1000, "y"])
        assert elements(await h.store.claim("q", ALICE, 2, 10)) == ["x" * 1000]

    run(body)


def test_only_the_holding_session_can_ack(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["m1"])
        [held] = ids(await h.store.claim("q", ALICE, 1, MIB))
        assert await h.store.ack(BOB, [held], done=True) == [NOT_FOUND]
        assert await h.store.queue_counts("q") == QueueCounts(ready=0, in_flight=1)
        assert await h.store.ack(ALICE, [held, held + 1000], done=True) == [OK, NOT_FOUND]
        assert await h.store.ack(ALICE, [held], done=True) == [NOT_FOUND]  # already acked
        assert await h.store.queue_counts("q") == QueueCounts(ready=0, in_flight=0)

    run(body)


def test_a_negative_ack_puts_the_message_back_at_its_place(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["m1", "m2"])
        [first] = ids(await h.store.claim("q", ALICE, 1, MIB))
        h.ready.clear()
        assert await h.store.ack(ALICE, [first], done=False) == [OK]
        assert h.ready == ["q"]  # waiting consumers are told
        again = await h.store.claim("q", BOB, 2, MIB)
        assert [(d.element, d.delivery_count) for d in again] == [("m1", 2), ("m2", 1)]

    run(body)


def test_ending_a_session_makes_its_messages_ready_in_order(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["m1", "m2", "m3"])
        await h.store.claim("q", ALICE, 2, MIB)
        await h.store.claim("q", BOB, 1, MIB)
        await h.store.release_session(ALICE)
        assert await h.store.queue_counts("q") == QueueCounts(ready=2, in_flight=1)
        assert elements(await h.store.claim("q", BOB, 5, MIB)) == ["m1", "m2"]

    run(body)


def test_messages_held_counts_each_sessions_in_flight_on_every_queue(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        assert await h.store.messages_held([ALICE, BOB]) == {}
        for name in ("q", "r"):
            await h.store.create_queue(name, queues(10))
            await h.store.enqueue(name, ["m1", "m2", "m3"])
        await h.store.claim("q", ALICE, 2, MIB)
        [held] = ids(await h.store.claim("r", ALICE, 1, MIB))
        await h.store.claim("r", BOB, 1, MIB)
        assert await h.store.messages_held([ALICE, BOB, 33]) == {ALICE: 3, BOB: 1}
        assert await h.store.messages_held([BOB]) == {BOB: 1}
        await h.store.ack(ALICE, [held], done=True)
        await h.store.release_session(BOB)
        assert await h.store.messages_held([ALICE, BOB]) == {ALICE: 2}

    run(body)


def test_ack_and_claim_acks_then_refills_for_the_same_session(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["m1", "m2", "m3"])
        [first] = ids(await h.store.claim("q", ALICE, 1, MIB))
        found, refill = await h.store.ack_and_claim(ALICE, [first, -1], True, "q", 5, MIB)
        assert found == [OK, NOT_FOUND]
        assert elements(refill) == ["m2", "m3"]
        assert await h.store.ack(ALICE, ids(refill), done=True) == [OK, OK]

    run(body)


def test_destroying_a_queue_with_messages_needs_force(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("ready", queues(10))
        await h.store.enqueue("ready", ["m"])
        await h.store.create_queue("held", queues(10))
        await h.store.enqueue("held", ["m"])
        [held] = ids(await h.store.claim("held", ALICE, 1, MIB))
        for name in ("ready", "held"):
            with pytest.raises(errors.QueueNotEmpty):
                await h.store.destroy_queue(name, False)
        assert await h.store.queue_counts("held") == QueueCounts(ready=0, in_flight=1)
        await h.store.destroy_queue("held", True)
        with pytest.raises(errors.QueueNotFound):
            await h.store.queue_counts("held")
        assert await h.store.ack(ALICE, [held], done=True) == [NOT_FOUND]  # gone with it
        await h.store.create_queue("empty", queues(10))
        await h.store.destroy_queue("empty", False)
        with pytest.raises(errors.QueueNotFound):
            await h.store.queue_counts("empty")

    run(body)


def test_a_restart_keeps_ready_messages_and_makes_in_flight_ones_ready(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", queues(10))
        await h.store.enqueue("q", ["m1", "m2", "m3"])
        [done, held] = ids(await h.store.claim("q", ALICE, 2, MIB))
        await h.store.ack(ALICE, [done], done=True)
        store = await h.reopen()
        assert await store.queue_counts("q") == QueueCounts(ready=2, in_flight=0)
        again = await store.claim("q", BOB, 5, MIB)
        assert [(d.message_id, d.element, d.delivery_count) for d in again] == [
            (held, "m2", 2),
            (held + 1, "m3", 1),
        ]

    run(body)


def test_ready_hint_is_one_for_an_unknown_queue(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        assert h.store.ready_hint("nope") == 1
        await h.store.create_queue("q", queues(10))
        h.ready.clear()
        await h.store.enqueue("q", ["m"])
        assert h.ready == ["q"]
        assert h.store.ready_hint("q") >= 1

    run(body)


# Maps -----------------------------------------------------------------------------------


def test_map_put_creates_overwrites_and_is_capped(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.map_put("m", [("k", "v1"), ("j", "w")], maps(1))
        await h.store.map_put("m", [("k", "v2")], maps(1))
        assert await h.store.map_get("m", "k") == "v2"
        with pytest.raises(errors.ResourceExhausted):
            await h.store.map_put("other", [("k", "v")], maps(1))
        with pytest.raises(errors.MapNotFound):  # all or nothing
            await h.store.map_get("other", "k")

    run(body)


def test_missing_maps_and_keys_are_reported(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        for call in (
            lambda: h.store.map_get("nope", "k"),
            lambda: h.store.map_remove("nope", "k"),
            lambda: h.store.map_get_all("nope", MIB),
            lambda: h.store.map_get_list("nope", 0, 10, MIB),
            lambda: h.store.map_destroy("nope"),
        ):
            with pytest.raises(errors.MapNotFound):
                await call()
        await h.store.map_put("m", [("k", "v")], maps(10))
        with pytest.raises(errors.KeyNotFound):
            await h.store.map_get("m", "absent")
        with pytest.raises(errors.KeyNotFound):
            await h.store.map_remove("m", "absent")
        await h.store.map_remove("m", "k")
        with pytest.raises(errors.KeyNotFound):
            await h.store.map_get("m", "k")
        await h.store.map_destroy("m")
        with pytest.raises(errors.MapNotFound):
            await h.store.map_get_all("m", MIB)

    run(body)


def test_map_pages_follow_utf8_byte_order(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        keys = ["b", "a", "Z", "é", "ä", "aa", "€", "😀"]
        await h.store.map_put("m", [(k, k.upper()) for k in keys], maps(10))
        in_byte_order = sorted(keys, key=lambda k: k.encode())
        pages = [await h.store.map_get_list("m", offset, 3, MIB) for offset in (0, 3, 6, 9)]
        assert [k for page in pages for k, _ in page] == in_byte_order
        assert pages[-1] == []  # past the end: an empty page
        assert await h.store.map_get_all("m", MIB) == {k: k.upper() for k in keys}

    run(body)


def test_map_get_all_refuses_a_map_past_its_byte_limit(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.map_put("m", [("k1", "x" * 600), ("k2", "y" * 600)], maps(10))
        with pytest.raises(errors.ResourceExhausted):
            await h.store.map_get_all("m", 1000)

    run(body)


def test_maps_outlive_a_restart(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.map_put("m", [("k", "v"), ("gone", "x")], maps(10))
        await h.store.map_remove("m", "gone")
        store = await h.reopen()
        assert await store.map_get_all("m", MIB) == {"k": "v"}

    run(body)


# Users ----------------------------------------------------------------------------------
# What every UserDirectory promises, held for each store itself (it serves logins) and for
# the directory `qm-server user ...` opens beside it (open_user_directory).

DirectoryFactory = Callable[[Harness, Path], UserDirectory]
DIRECTORIES: dict[str, DirectoryFactory] = {
    "store": lambda harness, data_dir: harness.store,
    "beside": lambda harness, data_dir: open_user_directory(config_of(harness.store, data_dir)),
}


def config_of(store: Store, data_dir: Path) -> ServerConfig:
    """The configuration that names this store (`qm-server user --store ...`)."""
    return pg_config(data_dir) if getattr(store, "url", None) else ServerConfig(data_dir=data_dir)


UsersBody = Callable[[UserDirectory, Harness], Awaitable[None]]

READ_Q = Grant("read", "queue", "q")
WRITE_M = Grant("write", "map", "m.*")
MANAGE_ALL = Grant("manage", "queue", "*")


@pytest.fixture(params=[(s, d) for s in sorted(STORES) for d in DIRECTORIES], ids="-".join)
def users_run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[UsersBody], None]:
    """Run an async test body against each store's user directory, with the store open."""
    store_kind, directory_kind = request.param

    def go(body: UsersBody) -> None:
        async def main() -> None:
            harness = Harness(STORES[store_kind], tmp_path)
            await harness.open()
            users = DIRECTORIES[directory_kind](harness, tmp_path)
            try:
                await body(users, harness)
            finally:
                if users is not harness.store:
                    await users.close()
                await harness.store.close()

        asyncio.run(main())

    return go


def test_users_are_kept_and_carry_their_admin_flag(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        before = await h.store.count_users()
        assert await h.store.create_user(UserRecord("carol", "hash-1", is_admin=False))
        assert await h.store.set_password("carol", "hash-2", make_admin=True)
        assert await h.store.count_users() == before + 1
        store = await h.reopen()
        assert await store.get_user("carol") == UserRecord("carol", "hash-2", is_admin=True)
        assert await store.get_user("nobody") is None
        carol = (await store.load_permissions())["carol"]
        assert carol.is_admin and carol.credential == "hash-2"

    run(body)


def test_a_taken_name_is_refused_and_left_as_it_was(users_run: Callable[[UsersBody], None]) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        before = await users.count_users()
        assert await users.create_user(UserRecord("carol", "hash-1", is_admin=False))
        assert not await users.create_user(UserRecord("carol", "hash-2", is_admin=True))
        assert await users.get_user("carol") == UserRecord("carol", "hash-1", is_admin=False)
        assert await users.count_users() == before + 1

    users_run(body)


def test_of_concurrent_creations_of_one_name_exactly_one_wins(
    users_run: Callable[[UsersBody], None],
) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        records = [UserRecord("dave", f"hash-{i}", is_admin=False) for i in range(8)]
        created = await asyncio.gather(*(users.create_user(r) for r in records))
        assert sum(created) == 1
        assert await users.get_user("dave") == records[created.index(True)]

    users_run(body)


def test_a_password_is_set_only_for_an_existing_user(
    users_run: Callable[[UsersBody], None],
) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        before = await users.count_users()
        assert not await users.set_password("erin", "hash-0")
        assert await users.get_user("erin") is None
        assert await users.count_users() == before  # not created
        await users.create_user(UserRecord("erin", "hash-1", is_admin=False))
        assert await users.set_password("erin", "hash-2")
        assert await users.get_user("erin") == UserRecord("erin", "hash-2", is_admin=False)
        assert await users.set_password("erin", "hash-3", make_admin=True)
        assert await users.set_password("erin", "hash-4")  # an admin stays one
        assert await users.get_user("erin") == UserRecord("erin", "hash-4", is_admin=True)

    users_run(body)


def test_grants_change_one_by_one_and_say_which_changed(
    users_run: Callable[[UsersBody], None],
) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        await users.create_user(UserRecord("frank", "hash", is_admin=False))
        assert await users.add_grants("frank", [READ_Q, WRITE_M]) == [True, True]
        assert await users.add_grants("frank", [READ_Q, MANAGE_ALL]) == [False, True]
        assert await users.remove_grants("frank", [WRITE_M, WRITE_M]) == [True, False]
        frank = (await users.load_permissions())["frank"]
        assert set(frank.grants) == {READ_Q, MANAGE_ALL}
        assert not frank.is_admin and frank.credential == "hash"

    users_run(body)


def test_grants_of_a_missing_user_change_nothing(users_run: Callable[[UsersBody], None]) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        assert await users.add_grants("ghost", [READ_Q]) is None
        assert await users.remove_grants("ghost", [READ_Q]) is None
        assert "ghost" not in await users.load_permissions()
        await users.create_user(UserRecord("ghost", "hash", is_admin=False))
        assert (await users.load_permissions())["ghost"].grants == ()

    users_run(body)


def test_a_removed_user_takes_their_grants_along(users_run: Callable[[UsersBody], None]) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        await users.create_user(UserRecord("gina", "hash", is_admin=False))
        await users.add_grants("gina", [READ_Q])
        assert await users.delete_user("gina")
        assert not await users.delete_user("gina")
        assert await users.get_user("gina") is None
        assert "gina" not in await users.load_permissions()
        await users.create_user(UserRecord("gina", "hash", is_admin=False))  # the name again
        assert (await users.load_permissions())["gina"].grants == ()

    users_run(body)


def test_users_come_in_name_order(users_run: Callable[[UsersBody], None]) -> None:
    async def body(users: UserDirectory, h: Harness) -> None:
        for name in ("b", "é", "a", "Z", "aa"):
            await users.create_user(UserRecord(name, "hash", is_admin=False))
        names = [u.name for u in await users.list_users()]
        assert names == sorted(names, key=str.encode)
        assert {"a", "aa", "b", "é", "Z"} <= set(names)
        assert list(await users.load_permissions()) == names

    users_run(body)


def test_what_the_directory_commits_the_store_reads_at_once(
    users_run: Callable[[UsersBody], None],
) -> None:
    """Logins read users through the store: a change made by `qm-server user ...` beside a
    running server must reach them without a restart."""

    async def body(users: UserDirectory, h: Harness) -> None:
        await users.create_user(UserRecord("hugo", "hash-1", is_admin=False))
        await users.add_grants("hugo", [READ_Q])
        assert await h.store.get_user("hugo") == UserRecord("hugo", "hash-1", is_admin=False)
        assert (await h.store.load_permissions())["hugo"].grants == (READ_Q,)
        await users.set_password("hugo", "hash-2")
        assert (await h.store.load_permissions())["hugo"].credential == "hash-2"
        await users.delete_user("hugo")
        assert await h.store.get_user("hugo") is None

    users_run(body)
