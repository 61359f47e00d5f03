"""The message lifecycle every store promises (qm_server/store/base.py): leases, delays,
retry backoff, max_deliveries and dead letters, max_age, max_length, purge, redrive,
queue info, and what of it survives a restart.

Run against every store of tests/test_store_contract.py's STORES; each factory takes
`clock=` (Unix time in seconds), and these tests pass a fake one: they move it and call
`run_due`, so every time is exact. One test lets the store's own timer fire on the real
clock. The tests at the end are the SQLite store's own (its claim path, its rollback).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from test_store_contract import STORES
from test_store_faults import FailingWrites

from qm_server import errors, lifecycle
from qm_server.errors import Code
from qm_server.lifecycle import QueueSettings, RetryPolicy, SettingsChange
from qm_server.quotas import Room
from qm_server.store.base import DeadLetter, Delivery, LeaseOutcome, QueueCounts, Store
from qm_server.store.sqlite import SqliteStore

ALICE, BOB = 11, 22
MIB = 1 << 20
T0 = 1_800_000_000_000  # the fake clock's start, Unix ms
ROOM = Room.server_wide("queues", 100)
OK, NOT_FOUND, EXPIRED = Code.OK, Code.MESSAGE_NOT_FOUND, Code.LEASE_EXPIRED


class FakeClock:
    """Unix time in seconds, moved by hand in whole milliseconds."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


class Harness:
    """A store on a data directory and a fake clock; `reopen` is a clean restart."""

    def __init__(self, name: str, data_dir: Path, clock: Callable[[], float]) -> None:
        self._factory = cast(Callable[..., Store], STORES[name])
        self._data_dir = data_dir
        self._clock = clock
        # Nothing falls due behind the test's back: it calls run_due after moving the clock.
        self.store = self._factory(data_dir, clock=clock, timed=False)
        self.ready: list[str] = []
        self.woken = asyncio.Event()

    def _wake(self, name: str) -> None:
        self.ready.append(name)
        self.woken.set()

    async def open(self) -> Store:
        self.store.set_ready_listener(self._wake)
        await self.store.open()
        return self.store

    async def reopen(self) -> Store:
        await self.store.close()
        self.store = self._factory(self._data_dir, clock=self._clock, timed=False)
        return await self.open()


Body = Callable[[Harness, FakeClock], Awaitable[None]]


@pytest.fixture(params=sorted(STORES))
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Body], None]:
    name = request.param

    def go(body: Body) -> None:
        async def main() -> None:
            clock = FakeClock()
            harness = Harness(name, tmp_path, clock)
            await harness.open()
            try:
                await body(harness, clock)
            finally:
                await harness.store.close()

        asyncio.run(main())

    return go


def counts(ready: int, in_flight: int = 0, delayed: int = 0) -> QueueCounts:
    return QueueCounts(ready, in_flight, delayed)


def shape(deliveries: list[Delivery]) -> list[tuple[int, str, int]]:
    return [(d.message_id, d.element, d.delivery_count) for d in deliveries]


DLQ_AFTER_2 = QueueSettings(max_deliveries=2, dead_letter_queue="dlq")


async def queue_with_dlq(store: Store, settings: QueueSettings = DLQ_AFTER_2) -> None:
    await store.create_queue("dlq", ROOM)
    await store.create_queue("q", ROOM, settings)


# Leases -----------------------------------------------------------------------------------


def test_a_delivery_carries_its_first_add_time_and_its_lease_end(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.create_queue("leased", ROOM, QueueSettings(ack_deadline_ms=2000))
        await s.enqueue("q", ["a", "b", "c"])
        await s.enqueue("leased", ["d"])
        clock.advance(1000)
        [none] = await s.claim("q", ALICE, 1, MIB)  # default settings: no deadline
        assert none == Delivery(1, "a", 1, T0, 0)
        [given] = await s.claim("q", ALICE, 1, MIB, lease_ms=5000)
        assert given == Delivery(2, "b", 1, T0, T0 + 6000)
        [zero] = await s.claim("q", ALICE, 1, MIB, lease_ms=0)
        assert zero.lease_expires_at_ms == 0
        [default] = await s.claim("leased", ALICE, 1, MIB)  # the queue's ack_deadline_ms
        assert default == Delivery(4, "d", 1, T0, T0 + 3000)

    run(body)


def test_an_expired_lease_releases_the_message_at_its_place(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["a", "b"])
        [a] = await s.claim("q", ALICE, 1, MIB, lease_ms=5000)
        clock.advance(4999)
        await s.run_due()
        assert await s.queue_counts("q") == counts(1, 1)
        h.ready.clear()
        clock.advance(1)
        await s.run_due()
        assert await s.queue_counts("q") == counts(2, 0)
        assert h.ready == ["q"]
        again = await s.claim("q", BOB, 2, MIB)
        assert shape(again) == [(a.message_id, "a", 2), (a.message_id + 1, "b", 1)]

    run(body)


def wake_on(event: asyncio.Event) -> Callable[[str], None]:
    return lambda queue: event.set()


def test_the_store_expires_a_lease_by_itself_on_the_real_clock(tmp_path: Path) -> None:
    """No run_due call: the store's one timer fires when the lease ends."""

    async def main() -> None:
        for name in sorted(STORES):
            store = cast(Callable[..., Store], STORES[name])(tmp_path / name)
            woken = asyncio.Event()
            store.set_ready_listener(wake_on(woken))
            await store.open()
            try:
                await store.create_queue("q", ROOM)
                await store.enqueue("q", ["a"])
                [a] = await store.claim("q", ALICE, 1, MIB, lease_ms=1000)
                woken.clear()
                await asyncio.wait_for(woken.wait(), 10)
                assert await store.queue_counts("q") == counts(1, 0)
                assert await store.ack(ALICE, [a.message_id], True) == [EXPIRED]
            finally:
                await store.close()

    for name in STORES:
        (tmp_path / name).mkdir()
    asyncio.run(main())


def test_an_ack_after_the_lease_ran_out_says_so_until_the_session_is_released(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["a", "b"])
        [a, b] = await s.claim("q", ALICE, 2, MIB, lease_ms=1000)
        clock.advance(1000)
        await s.run_due()
        assert await s.ack(ALICE, [a.message_id], True) == [EXPIRED]
        assert await s.ack(BOB, [a.message_id], True) == [NOT_FOUND]
        assert await s.queue_counts("q") == counts(2, 0)  # nothing changed for either
        [again, _] = await s.claim("q", BOB, 2, MIB)
        assert again.message_id == a.message_id
        # Held by another session now: still expired for the first.
        assert await s.ack(ALICE, [a.message_id, 999], False) == [EXPIRED, NOT_FOUND]
        assert await s.ack(BOB, [a.message_id], True) == [OK]
        assert await s.ack(ALICE, [a.message_id], True) == [NOT_FOUND]  # deleted: forgotten
        await s.release_session(ALICE)
        assert await s.ack(ALICE, [b.message_id], True) == [NOT_FOUND]  # released: forgotten
        assert await s.queue_counts("q") == counts(0, 1)

    run(body)


def test_extending_a_lease_moves_its_end_and_zero_gives_the_message_back(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["a", "b", "c"])
        a, b, c = (d.message_id for d in await s.claim("q", ALICE, 3, MIB, lease_ms=1000))
        clock.advance(900)
        assert await s.extend_leases(ALICE, [a, 77], 5000) == [
            LeaseOutcome(OK, T0 + 5900),
            LeaseOutcome(NOT_FOUND, 0),
        ]
        assert await s.extend_leases(BOB, [b], 5000) == [LeaseOutcome(NOT_FOUND, 0)]
        assert await s.extend_leases(ALICE, [b], 0) == [LeaseOutcome(OK, 0)]
        assert await s.queue_counts("q") == counts(1, 2)
        clock.advance(100)  # c's lease ends; a's was extended
        await s.run_due()
        assert await s.queue_counts("q") == counts(2, 1)
        assert await s.extend_leases(ALICE, [c], 5000) == [LeaseOutcome(EXPIRED, 0)]
        clock.advance(4899)
        await s.run_due()
        assert await s.queue_counts("q") == counts(2, 1)
        clock.advance(1)
        await s.run_due()
        assert await s.queue_counts("q") == counts(3, 0)
        # Given back at their places, counted.
        assert shape(await s.claim("q", BOB, 3, MIB)) == [(a, "a", 2), (b, "b", 2), (c, "c", 2)]

    run(body)


# Retry backoff and delays -----------------------------------------------------------------


def test_an_ack_error_waits_out_the_retry_backoff(run: Callable[[Body], None]) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        retry = RetryPolicy(initial_delay_ms=1000, multiplier=2.0, max_delay_ms=10_000)
        await s.create_queue("q", ROOM, QueueSettings(retry=retry))
        await s.enqueue("q", ["a", "b"])
        [a] = await s.claim("q", ALICE, 1, MIB)
        assert await s.ack(ALICE, [a.message_id], False) == [OK]
        assert await s.queue_counts("q") == counts(1, 0, 1)
        [b] = await s.claim("q", ALICE, 1, MIB)  # the younger one, while a waits
        assert b.message_id == a.message_id + 1
        clock.advance(999)
        await s.run_due()
        assert await s.queue_counts("q") == counts(0, 1, 1)
        h.ready.clear()
        clock.advance(1)
        await s.run_due()
        assert h.ready == ["q"]
        assert await s.queue_counts("q") == counts(1, 1, 0)
        [again] = await s.claim("q", ALICE, 1, MIB)
        assert (again.message_id, again.delivery_count, again.enqueued_at_ms) == (
            a.message_id,
            2,
            T0,
        )
        await s.ack(ALICE, [again.message_id], False)  # the second failure waits 2 s
        clock.advance(1999)
        await s.run_due()
        assert await s.queue_counts("q") == counts(0, 1, 1)
        clock.advance(1)
        await s.run_due()
        assert await s.queue_counts("q") == counts(1, 1, 0)
        # A session's end, a lease expiry and an extension to 0 do not back off.
        await s.release_session(ALICE)
        assert await s.queue_counts("q") == counts(2, 0, 0)

    run(body)


def test_without_backoff_an_ack_error_makes_the_message_ready_at_its_place(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["a", "b"])
        [a] = await s.claim("q", ALICE, 1, MIB)
        await s.ack(ALICE, [a.message_id], False)
        assert await s.queue_counts("q") == counts(2, 0, 0)
        assert shape(await s.claim("q", BOB, 2, MIB)) == [(1, "a", 2), (2, "b", 1)]

    run(body)


def test_a_delayed_add_is_ready_at_its_time_and_younger_ready_ones_go_first(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.create_queue("slow", ROOM, QueueSettings(delay_ms=500))
        [late] = (await s.enqueue("q", ["late"], delay_ms=3000)).ids
        assert await s.queue_counts("q") == counts(0, 0, 1)
        assert await s.claim("q", ALICE, 10, MIB) == []
        [now] = (await s.enqueue("q", ["now"])).ids
        assert shape(await s.claim("q", ALICE, 10, MIB)) == [(now, "now", 1)]
        clock.advance(2999)
        await s.run_due()
        assert await s.queue_counts("q") == counts(0, 1, 1)
        h.ready.clear()
        clock.advance(1)
        await s.run_due()
        assert h.ready == ["q"]
        assert await s.claim("q", ALICE, 10, MIB) == [Delivery(late, "late", 1, T0, 0)]
        # The queue's delay_ms when the add names none; 0 overrides it.
        await s.enqueue("slow", ["x"])
        await s.enqueue("slow", ["y"], delay_ms=0)
        assert await s.queue_counts("slow") == counts(1, 0, 1)
        clock.advance(500)
        await s.run_due()
        assert await s.queue_counts("slow") == counts(2, 0, 0)
        assert [d.element for d in await s.claim("slow", ALICE, 2, MIB)] == ["x", "y"]

    run(body)


def test_delayed_adds_keep_every_character(run: Callable[[Body], None]) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        odd = ["nul \x00 inside", "é ☃ \U0001f600", '"quoted" \\ back']
        await s.enqueue("q", odd, delay_ms=10)
        await s.enqueue("q", odd[1:], delay_ms=10)
        clock.advance(10)
        await s.run_due()
        assert [d.element for d in await s.claim("q", ALICE, 10, MIB)] == odd + odd[1:]

    run(body)


def test_delayed_messages_keep_a_queue_from_being_destroyed_and_go_with_it(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["later"], delay_ms=1000)
        with pytest.raises(errors.QueueNotEmpty):
            await s.destroy_queue("q", False)
        await s.destroy_queue("q", True)
        await s.create_queue("q", ROOM)
        clock.advance(1000)
        await s.run_due()
        assert await s.queue_counts("q") == counts(0, 0, 0)

    run(body)


# max_deliveries and dead letters ----------------------------------------------------------


def test_each_release_past_max_deliveries_dead_letters_with_its_cause(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await queue_with_dlq(s)
        ids = (await s.enqueue("q", ["ack", "lease", "extend", "lease too"])).ids
        for _ in range(2):
            clock.advance(10)
            taken = await s.claim("q", ALICE, 4, MIB, lease_ms=1000)
            assert [d.message_id for d in taken] == ids
            await s.ack(ALICE, [ids[0]], False)
            await s.extend_leases(ALICE, [ids[2]], 0)
            clock.advance(1000)
            await s.run_due()  # the leases of ids[1] and ids[3] run out
            assert await s.queue_counts("q") == (counts(4) if _ == 0 else counts(0))
        letters = await s.dead_letters("dlq", 0, 10, MIB)
        dead_at = T0 + 2020
        assert {d.message_id: (d.cause, d.dead_lettered_at_ms) for d in letters} == {
            ids[0]: (lifecycle.CAUSE_ACK_ERROR, T0 + 1010 + 10),
            ids[1]: (lifecycle.CAUSE_LEASE_EXPIRY, dead_at),
            ids[2]: (lifecycle.CAUSE_EXTEND_TO_ZERO, T0 + 1010 + 10),
            ids[3]: (lifecycle.CAUSE_LEASE_EXPIRY, dead_at),
        }
        assert letters[0] == DeadLetter(
            ids[0], "q", 2, T0, T0 + 1020, lifecycle.CAUSE_ACK_ERROR, "ack"
        )
        assert await s.queue_counts("dlq") == counts(4)
        # In the dead-letter queue they are ordinary messages, ids and counts kept.
        assert shape(await s.claim("dlq", BOB, 10, MIB)) == [
            (ids[0], "ack", 3),
            (ids[1], "lease", 3),
            (ids[2], "extend", 3),
            (ids[3], "lease too", 3),
        ]

    run(body)


def test_a_session_end_past_max_deliveries_dead_letters(run: Callable[[Body], None]) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await queue_with_dlq(s)
        [m] = (await s.enqueue("q", ["m"])).ids
        await s.claim("q", ALICE, 1, MIB)
        await s.release_session(ALICE)
        assert await s.queue_counts("q") == counts(1)
        await s.claim("q", ALICE, 1, MIB)
        h.ready.clear()
        await s.release_session(ALICE)
        assert await s.queue_counts("q") == counts(0)
        assert await s.queue_counts("dlq") == counts(1)
        assert h.ready == ["dlq"]
        [letter] = await s.dead_letters("dlq", 0, 10, MIB)
        assert letter == DeadLetter(m, "q", 2, T0, T0, lifecycle.CAUSE_SESSION_END, "m")

    run(body)


def test_without_its_dead_letter_queue_a_message_stays_in_its_queue(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await queue_with_dlq(s)
        await s.enqueue("q", ["m"])
        await s.destroy_queue("dlq", True)
        for count in (1, 2, 3):
            [d] = await s.claim("q", ALICE, 1, MIB)
            assert d.delivery_count == count
            await s.ack(ALICE, [d.message_id], False)
            assert await s.queue_counts("q") == counts(1)

    run(body)


# max_age ----------------------------------------------------------------------------------


def test_a_max_age_set_later_ages_the_messages_already_there(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["old"])
        clock.advance(5000)
        await s.enqueue("q", ["young"])
        await s.update_queue("q", SettingsChange(max_age_ms=2000))
        await s.run_due()
        assert [d.element for d in await s.claim("q", ALICE, 10, MIB)] == ["young"]

    run(body)


def test_messages_past_max_age_are_dropped_or_dead_lettered(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("dlq", ROOM)
        await s.create_queue("drop", ROOM, QueueSettings(max_age_ms=1000))
        aged = QueueSettings(max_age_ms=1000, dead_letter_queue="dlq")
        await s.create_queue("keep", ROOM, aged)
        [old, held] = (await s.enqueue("drop", ["old", "held"])).ids
        [kept_old] = (await s.enqueue("keep", ["k"])).ids
        clock.advance(500)
        [young] = (await s.enqueue("drop", ["young"])).ids
        [d_old, _] = await s.claim("drop", ALICE, 2, MIB)
        await s.ack(ALICE, [d_old.message_id], False)  # ready again, still old
        clock.advance(499)
        await s.run_due()
        assert await s.queue_counts("drop") == counts(2, 1)
        clock.advance(1)
        await s.run_due()
        # "old" is dropped; "held" is in flight, its holder's; "young" is young.
        assert await s.queue_counts("drop") == counts(1, 1)
        assert await s.queue_counts("keep") == counts(0)
        [letter] = await s.dead_letters("dlq", 0, 10, MIB)
        assert letter == DeadLetter(
            kept_old, "keep", 0, T0, T0 + 1000, lifecycle.CAUSE_MAX_AGE, "k"
        )
        assert await s.ack(ALICE, [old], True) == [NOT_FOUND]
        clock.advance(500)
        await s.run_due()
        assert await s.queue_counts("drop") == counts(0, 1)  # young aged out at T0 + 1500
        await s.release_session(ALICE)  # "held" comes back, long past its age
        await s.run_due()
        assert await s.queue_counts("drop") == counts(0, 0)
        # A dead letter of max_age is delivered from the dead-letter queue as a first one.
        assert shape(await s.claim("dlq", BOB, 1, MIB)) == [(kept_old, "k", 1)]
        assert (young, held) == (old + 3, old + 1)

    run(body)


# max_length, purge, redrive, info ---------------------------------------------------------


def test_max_length_refuses_a_whole_add_past_ready_plus_delayed(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM, QueueSettings(max_length=3))
        await s.enqueue("q", ["a"])
        await s.enqueue("q", ["b"], delay_ms=1000)
        with pytest.raises(errors.ResourceExhausted):
            await s.enqueue("q", ["c", "d"])
        assert await s.queue_counts("q") == counts(1, 0, 1)
        await s.enqueue("q", ["c"])
        with pytest.raises(errors.ResourceExhausted):
            await s.enqueue("q", ["d"], delay_ms=5)
        await s.claim("q", ALICE, 1, MIB)  # in flight: no longer counted
        assert (await s.enqueue("q", ["d"])).ids == [4]

    run(body)


def test_purge_removes_ready_and_delayed_and_keeps_what_is_in_flight(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await s.create_queue("q", ROOM)
        await s.enqueue("q", ["a", "b", "c"])
        await s.enqueue("q", ["later"], delay_ms=1000)
        [a] = await s.claim("q", ALICE, 1, MIB)
        [b] = await s.claim("q", ALICE, 1, MIB)
        await s.ack(ALICE, [b.message_id], False)  # given back: ready
        assert await s.purge("q") == 3
        assert await s.queue_counts("q") == counts(0, 1, 0)
        clock.advance(1000)
        await s.run_due()
        assert await s.claim("q", BOB, 10, MIB) == []
        await s.ack(ALICE, [a.message_id], False)
        assert shape(await s.claim("q", BOB, 10, MIB)) == [(a.message_id, "a", 2)]
        with pytest.raises(errors.QueueNotFound):
            await s.purge("nope")

    run(body)


def test_redrive_moves_dead_letters_back_with_ids_and_counts(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        one = QueueSettings(max_deliveries=1, dead_letter_queue="dlq")
        await queue_with_dlq(s, one)
        await s.create_queue("gone", ROOM, one)
        await s.create_queue("locked", ROOM, one)
        ids = {}
        for name in ("q", "gone", "locked"):
            [ids[name]] = (await s.enqueue(name, [name])).ids
            await s.claim(name, ALICE, 1, MIB)
        [extra] = (await s.enqueue("q", ["extra"])).ids
        await s.claim("q", ALICE, 1, MIB)
        await s.release_session(ALICE)
        await s.destroy_queue("gone", True)
        assert await s.queue_counts("dlq") == counts(4)
        [held] = await s.claim("dlq", BOB, 1, MIB)  # the oldest, q's, in flight now
        assert held.message_id == ids["q"]

        moved, failed = await s.redrive("dlq", None, lambda queue: queue != "locked")
        assert moved == 1
        assert failed == [
            (ids["q"], NOT_FOUND),
            (ids["gone"], Code.QUEUE_NOT_FOUND),
            (ids["locked"], Code.PERMISSION_DENIED),
        ]
        assert await s.queue_counts("q") == counts(1)
        assert shape(await s.claim("q", ALICE, 1, MIB)) == [(extra, "extra", 2)]
        await s.ack(BOB, [held.message_id], False)
        assert await s.redrive("dlq", [held.message_id, 12345], lambda queue: True) == (
            1,
            [(12345, NOT_FOUND)],
        )
        # Ready at once in its queue; its history is gone with it.
        assert [d.message_id for d in await s.dead_letters("dlq", 0, 10, MIB)] == [
            ids["gone"],
            ids["locked"],
        ]
        assert shape(await s.claim("q", BOB, 1, MIB)) == [(ids["q"], "q", 3)]
        with pytest.raises(errors.QueueNotFound):
            await s.redrive("nope", None, lambda queue: True)

    run(body)


def test_a_dead_letter_backing_off_in_its_dead_letter_queue_is_listed_and_redriven(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        retry = RetryPolicy(initial_delay_ms=5000, multiplier=2.0, max_delay_ms=5000)
        await s.create_queue("dlq", ROOM, QueueSettings(retry=retry))
        await s.create_queue("q", ROOM, QueueSettings(max_deliveries=1, dead_letter_queue="dlq"))
        [m] = (await s.enqueue("q", ["m"])).ids
        await s.claim("q", ALICE, 1, MIB)
        await s.release_session(ALICE)
        await s.claim("dlq", ALICE, 1, MIB)
        await s.ack(ALICE, [m], False)  # backs off in the dead-letter queue
        assert await s.queue_counts("dlq") == counts(0, 0, 1)
        [letter] = await s.dead_letters("dlq", 0, 10, MIB)
        assert (letter.message_id, letter.element, letter.enqueued_at_ms) == (m, "m", T0)
        assert await s.redrive("dlq", [m], lambda queue: True) == (1, [])
        assert await s.queue_counts("dlq") == counts(0, 0, 0)
        assert (await s.queue_info("dlq")).dead_letters_held == 0
        assert shape(await s.claim("q", BOB, 1, MIB)) == [(m, "m", 3)]

    run(body)


def test_dead_letters_page_by_id_count_and_bytes(run: Callable[[Body], None]) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await queue_with_dlq(s, QueueSettings(max_deliveries=1, dead_letter_queue="dlq"))
        ids = (await s.enqueue("q", ["a" * 100, "b" * 100, "c" * 100])).ids
        await s.claim("q", ALICE, 3, MIB)
        await s.release_session(ALICE)
        letters = s.dead_letters
        assert [d.message_id for d in await letters("dlq", 0, 2, MIB)] == ids[:2]
        assert [d.message_id for d in await letters("dlq", ids[0], 10, MIB)] == ids[1:]
        assert [d.message_id for d in await letters("dlq", 0, 10, 150)] == ids[:1]
        assert [d.message_id for d in await letters("dlq", 0, 10, 1)] == ids[:1]
        assert await letters("q", 0, 10, MIB) == []
        await s.claim("dlq", BOB, 1, MIB)
        await s.ack(BOB, [ids[0]], True)  # consumed: no longer a dead letter
        assert [d.message_id for d in await letters("dlq", 0, 10, MIB)] == ids[1:]
        with pytest.raises(errors.QueueNotFound):
            await letters("nope", 0, 10, MIB)

    run(body)


def test_queue_info_counts_everything_from_one_state(run: Callable[[Body], None]) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        settings = QueueSettings(max_deliveries=1, dead_letter_queue="dlq", ack_deadline_ms=9000)
        await queue_with_dlq(s, settings)
        empty = await s.queue_info("q")
        assert (empty.settings, empty.counts, empty.oldest_ready_enqueued_at_ms) == (
            settings,
            counts(0),
            0,
        )
        await s.enqueue("q", ["dead", "dead2"])
        await s.claim("q", ALICE, 2, MIB)
        await s.release_session(ALICE)
        clock.advance(100)
        await s.enqueue("q", ["a", "b", "c"])
        await s.enqueue("q", ["later"], delay_ms=1000)
        await s.claim("q", ALICE, 1, MIB)
        await s.claim("q", BOB, 1, MIB)
        info = await s.queue_info("q")
        assert info.counts == counts(1, 2, 1)
        assert (info.dead_lettered, info.dead_letters_held, info.holding_sessions) == (2, 0, 2)
        assert info.oldest_ready_enqueued_at_ms == T0 + 100
        dlq = await s.queue_info("dlq")
        assert (dlq.dead_lettered, dlq.dead_letters_held, dlq.counts) == (0, 2, counts(2))
        assert dlq.oldest_ready_enqueued_at_ms == T0
        with pytest.raises(errors.QueueNotFound):
            await s.queue_info("nope")

    run(body)


# Restarts ---------------------------------------------------------------------------------


def test_delays_and_backoff_keep_their_ready_time_across_a_restart(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        retry = RetryPolicy(initial_delay_ms=2000, multiplier=2.0, max_delay_ms=2000)
        s = h.store
        await s.create_queue("q", ROOM, QueueSettings(retry=retry))
        await s.enqueue("q", ["a", "b"])
        [later] = (await s.enqueue("q", ["later"], delay_ms=5000)).ids
        [a] = await s.claim("q", ALICE, 1, MIB)
        await s.ack(ALICE, [a.message_id], False)  # backs off until T0 + 2000
        s = await h.reopen()
        assert await s.queue_counts("q") == counts(1, 0, 2)
        clock.advance(1999)
        await s.run_due()
        assert await s.queue_counts("q") == counts(1, 0, 2)
        clock.advance(1)
        await s.run_due()
        assert await s.queue_counts("q") == counts(2, 0, 1)
        assert shape(await s.claim("q", ALICE, 2, MIB)) == [(1, "a", 2), (2, "b", 1)]
        clock.advance(3000)
        await s.run_due()
        assert await s.claim("q", ALICE, 2, MIB) == [Delivery(later, "later", 1, T0, 0)]

    run(body)


def test_counts_and_dead_letters_survive_a_restart_which_releases_what_was_in_flight(
    run: Callable[[Body], None],
) -> None:
    """A restart releases what was in flight but cannot tell it from what was released
    before (being in flight is not on disk): it dead-letters nothing, and a message in
    flight at its last allowed delivery gets one more, dead-lettered at its release."""

    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await queue_with_dlq(s)
        [x, y, z] = (await s.enqueue("q", ["x", "y", "z"])).ids
        await s.claim("q", ALICE, 3, MIB)
        await s.release_session(ALICE)
        clock.advance(10)
        await s.claim("q", ALICE, 2, MIB)  # x and y, each delivered twice now
        await s.ack(ALICE, [y], False)  # dead-lettered
        clock.advance(10)
        if not getattr(s, "releases_in_flight_at_open", True):
            # A store that keeps sessions in its database (PostgreSQL) releases nothing at
            # a restart: the session outlives the node, and its end releases x, at its
            # last delivery, so dead-lettered then.
            s = await h.reopen()
            assert await s.queue_counts("q") == counts(1, 1)
            await s.release_session(ALICE)
            assert await s.queue_counts("q") == counts(1)
            assert await s.dead_letters("dlq", 0, 10, MIB) == [
                DeadLetter(x, "q", 2, T0, T0 + 20, lifecycle.CAUSE_SESSION_END, "x"),
                DeadLetter(y, "q", 2, T0, T0 + 10, lifecycle.CAUSE_ACK_ERROR, "y"),
            ]
            assert shape(await s.claim("q", ALICE, 2, MIB)) == [(z, "z", 2)]
            return
        s = await h.reopen()  # x was in flight: released, ready again
        assert await s.queue_counts("q") == counts(2)
        assert await s.dead_letters("dlq", 0, 10, MIB) == [
            DeadLetter(y, "q", 2, T0, T0 + 10, lifecycle.CAUSE_ACK_ERROR, "y"),
        ]
        assert shape(await s.claim("q", ALICE, 2, MIB)) == [(x, "x", 3), (z, "z", 2)]
        await s.release_session(ALICE)  # both past max_deliveries now
        assert await s.queue_counts("q") == counts(0)
        assert [d.message_id for d in await s.dead_letters("dlq", 0, 10, MIB)] == [x, y, z]
        assert shape(await s.claim("dlq", ALICE, 3, MIB)) == [
            (x, "x", 4),
            (y, "y", 3),
            (z, "z", 3),
        ]

    run(body)


def test_a_restart_dead_letters_nothing_that_was_redriven(run: Callable[[Body], None]) -> None:
    async def body(h: Harness, clock: FakeClock) -> None:
        s = h.store
        await queue_with_dlq(s)
        [x] = (await s.enqueue("q", ["x"])).ids
        for _ in range(2):
            await s.claim("q", ALICE, 1, MIB)
            await s.ack(ALICE, [x], False)
        assert await s.queue_counts("dlq") == counts(1)
        assert await s.redrive("dlq", None, lambda _: True) == (1, [])
        s = await h.reopen()
        assert await s.queue_counts("q") == counts(1)
        assert await s.queue_counts("dlq") == counts(0)

    run(body)


# The SQLite store's own -------------------------------------------------------------------


def claim_steps(store: SqliteStore) -> Callable[[], Awaitable[int]]:
    """A claim of one ready message and its ack, measured in SQLite VM steps."""

    async def measure() -> int:
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        await store._submit(lambda: store._db.set_progress_handler(count, 1))
        [d] = await store.claim("q", ALICE, 1, MIB)
        await store._submit(lambda: store._db.set_progress_handler(None, 1))
        await store.ack(ALICE, [d.message_id], True)
        return steps[0]

    return measure


def test_sqlite_claims_never_step_over_delayed_messages(tmp_path: Path) -> None:
    """Delayed and backed-off messages wait outside the rows a claim reads: a claim costs
    the same with none or twenty thousand of them."""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        try:
            await store.create_queue("q", ROOM)
            measure = claim_steps(store)
            await store.enqueue("q", ["a"])
            alone = await measure()
            await store.enqueue("q", ["d"] * 20_000, delay_ms=60_000)
            await store.enqueue("q", ["b"])
            assert await measure() == alone
        finally:
            await store.close()

    asyncio.run(main())


class FailingCommits(FailingWrites):
    """The store's connection with COMMIT failing while `failing` is set: the transaction's
    operations have run by then, so all they changed in memory must be undone."""

    def _check(self, statement: str) -> None:
        if self.failing and statement.lstrip().upper().startswith("COMMIT"):
            raise sqlite3.OperationalError("disk I/O error (injected)")


@pytest.mark.parametrize("fault", [FailingWrites, FailingCommits])
def test_sqlite_a_failed_commit_undoes_expiries_extensions_and_moves(
    tmp_path: Path, fault: type[FailingWrites]
) -> None:
    """What run_due, extend_leases and a dead-lettering ack change in memory is undone
    with their transaction: after the store recovers they happen as if never tried."""

    async def main() -> None:
        clock = FakeClock()
        store = SqliteStore(tmp_path, clock=clock, timed=False)
        await store.open()
        assert store._writer._conn is not None
        writes = fault(store._writer._conn)
        await store._submit(lambda: setattr(store._writer, "_conn", writes))
        try:
            await store.create_queue("dlq", ROOM)
            dead_after_1 = QueueSettings(max_deliveries=1, dead_letter_queue="dlq")
            await store.create_queue("q", ROOM, dead_after_1)
            [a, b, c, d] = (await store.enqueue("q", ["a", "b", "c", "d"])).ids
            await store.claim("q", ALICE, 4, MIB, lease_ms=1000)

            async def fails(call: Awaitable[object]) -> None:
                writes.failing = True
                with pytest.raises(errors.Unavailable):
                    await call
                writes.failing = False
                assert await store.queue_counts("q") == counts(0, 4)  # recovered, as before

            await fails(store.extend_leases(ALICE, [a], 60_000))
            await fails(store.ack(ALICE, [b], False))  # would dead-letter it
            assert await store.queue_counts("dlq") == counts(0)
            clock.advance(1000)
            await fails(store.run_due())  # would expire all four
            # c was never expired: given back by its holder, it is simply not held.
            assert await store.extend_leases(ALICE, [c], 0) == [LeaseOutcome(OK, 0)]
            assert await store.ack(ALICE, [c], True) == [NOT_FOUND]
            assert await store.ack(ALICE, [b], False) == [OK]
            assert await store.queue_counts("dlq") == counts(2)
            await store.run_due()  # a's extension never happened: it expires with d
            assert await store.queue_counts("q") == counts(0, 0)
            assert await store.queue_counts("dlq") == counts(4)
            assert await store.ack(ALICE, [a, d], True) == [EXPIRED, EXPIRED]
        finally:
            with contextlib.suppress(errors.Unavailable):
                await store.close()

    asyncio.run(main())


def test_sqlite_migration_5_gives_existing_messages_the_migration_time(tmp_path: Path) -> None:
    from qm_server.store import sqlite_sql as sql
    from qm_server.store.sqlite_file import DB_FILE, transaction

    conn = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    with transaction(conn):
        for step in sql.MIGRATIONS[:4]:
            if callable(step):
                step(conn)
            else:
                for statement in step.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        conn.execute(sql.SET_SCHEMA_VERSION, ("4",))
        conn.execute("INSERT INTO queues (id, name) VALUES (1, 'q')")
        conn.execute(
            "CREATE TABLE messages_1 (id INTEGER PRIMARY KEY,"
            " delivery_count INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL)"
        )
        conn.execute("INSERT INTO messages_1 (id, payload) VALUES (1, 'old')")
    conn.close()

    async def main() -> None:
        before = int(time.time() * 1000)
        store = SqliteStore(tmp_path)
        await store.open()
        after = int(time.time() * 1000)
        try:
            [d] = await store.claim("q", ALICE, 1, MIB)
            assert (d.message_id, d.element, d.delivery_count) == (1, "old", 1)
            assert before <= d.enqueued_at_ms <= after
        finally:
            await store.close()

    asyncio.run(main())
