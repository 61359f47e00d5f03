"""What every store promises about queue settings, listings, map key cursors and
idempotent adds (qm_server/store/base.py), run against each store of
tests/test_store_contract.py's STORES.

A store joins by adding to CLOCKED_STORES how it is made with a clock and an idempotency
window (a test checks that every store of STORES has one). The tests at the end that read
the SQLite file itself are that store's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from pg_fixtures import pg_store
from test_store_contract import STORES
from test_store_faults import FailingWrites

from qm_server import errors
from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, RetryPolicy, SettingsChange
from qm_server.quotas import Room
from qm_server.store.base import Enqueued, IdempotencyKey, QueueCounts, Store
from qm_server.store.sqlite import IDEMPOTENCY_PRUNE_BATCH, SqliteStore
from qm_server.store.sqlite_file import DB_FILE

MIB = 1 << 20
WINDOW_S = 600.0
WINDOW_MS = int(WINDOW_S * 1000)
START = 1_700_000_000.0  # the fake clock's first reading (Unix seconds)

ClockedFactory = Callable[[Path, Callable[[], float], float], Store]
CLOCKED_STORES: dict[str, ClockedFactory] = {
    "sqlite": lambda path, clock, window_s: SqliteStore(
        path, clock=clock, idempotency_window_s=window_s
    ),
    "postgresql": lambda path, clock, window_s: pg_store(
        path, clock=clock, idempotency_window_s=window_s, timed=False
    ),
}

SETTINGS = QueueSettings(
    ack_deadline_ms=30_000,
    max_deliveries=5,
    dead_letter_queue="dead",
    retry=RetryPolicy(initial_delay_ms=100, multiplier=3.0, max_delay_ms=60_000),
    delay_ms=2_000,
    max_age_ms=86_400_000,
    max_length=1000,
)


def rooms(limit: int = 100) -> Room:
    return Room.server_wide("queues", limit)


def maps(limit: int = 100) -> Room:
    return Room.server_wide("maps", limit)


class Clock:
    """A clock the test moves: Unix seconds."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Harness:
    """A store on a data directory with a fake clock, and its restart."""

    def __init__(self, factory: ClockedFactory, data_dir: Path) -> None:
        self._factory = factory
        self.data_dir = data_dir
        self.clock = Clock()
        self.store = factory(data_dir, self.clock, WINDOW_S)

    async def reopen(self) -> Store:
        await self.store.close()
        self.store = self._factory(self.data_dir, self.clock, WINDOW_S)
        await self.store.open()
        return self.store


Body = Callable[[Harness], Awaitable[None]]


@pytest.fixture(params=sorted(STORES))
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Body], None]:
    factory = CLOCKED_STORES[request.param]

    def go(body: Body) -> None:
        async def main() -> None:
            harness = Harness(factory, tmp_path)
            await harness.store.open()
            try:
                await body(harness)
            finally:
                await harness.store.close()

        asyncio.run(main())

    return go


def test_every_store_can_be_made_with_a_clock() -> None:
    assert sorted(CLOCKED_STORES) == sorted(STORES)


async def settings_of(store: Store, name: str) -> QueueSettings:
    """The queue's committed settings: an empty change answers them unchanged."""
    return await store.update_queue(name, SettingsChange())


# Settings -------------------------------------------------------------------------------


def test_settings_are_kept_and_outlive_a_restart(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("dead", rooms())
        await h.store.create_queue("jobs", rooms(), SETTINGS)
        await h.store.create_queue("plain", rooms())
        assert await settings_of(h.store, "jobs") == SETTINGS
        assert await settings_of(h.store, "plain") == DEFAULT_SETTINGS
        await h.reopen()
        assert await settings_of(h.store, "jobs") == SETTINGS
        assert await settings_of(h.store, "plain") == DEFAULT_SETTINGS
        assert await settings_of(h.store, "dead") == DEFAULT_SETTINGS

    run(body)


def test_an_update_changes_only_what_it_names(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("dead", rooms())
        await h.store.create_queue("jobs", rooms(), SETTINGS)
        now = await h.store.update_queue("jobs", SettingsChange(ack_deadline_ms=5_000))
        assert now == dataclasses.replace(SETTINGS, ack_deadline_ms=5_000)
        # Back to a default (0: off) is a change like any other.
        now = await h.store.update_queue("jobs", SettingsChange(delay_ms=0, max_length=0))
        expected = dataclasses.replace(SETTINGS, ack_deadline_ms=5_000, delay_ms=0, max_length=0)
        assert now == expected
        # Out of bounds: refused, nothing changed.
        with pytest.raises(errors.InvalidArgument, match="ack_deadline_ms"):
            await h.store.update_queue("jobs", SettingsChange(ack_deadline_ms=5))
        await h.reopen()
        assert await settings_of(h.store, "jobs") == expected
        with pytest.raises(errors.QueueNotFound):
            await h.store.update_queue("nope", SettingsChange(delay_ms=1))

    run(body)


def test_a_dead_letter_queue_must_exist_and_be_another_queue(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(errors.QueueNotFound, match="'dead'"):
            await h.store.create_queue("jobs", rooms(), SETTINGS)
        with pytest.raises(errors.QueueNotFound, match="'jobs'"):  # it was not made
            await h.store.queue_counts("jobs")
        own = QueueSettings(max_deliveries=3, dead_letter_queue="jobs")
        with pytest.raises(errors.InvalidArgument, match="own dead_letter_queue"):
            await h.store.create_queue("jobs", rooms(), own)
        await h.store.create_queue("jobs", rooms())
        await h.store.create_queue("dead", rooms())

        change = SettingsChange(max_deliveries=3, dead_letter_queue="missing")
        with pytest.raises(errors.QueueNotFound, match="'missing'"):
            await h.store.update_queue("jobs", change)
        change = SettingsChange(max_deliveries=3, dead_letter_queue="jobs")
        with pytest.raises(errors.InvalidArgument, match="own dead_letter_queue"):
            await h.store.update_queue("jobs", change)
        assert await settings_of(h.store, "jobs") == DEFAULT_SETTINGS

        change = SettingsChange(max_deliveries=3, dead_letter_queue="dead")
        expected = QueueSettings(max_deliveries=3, dead_letter_queue="dead")
        assert await h.store.update_queue("jobs", change) == expected
        # Its dead-letter queue destroyed, the other settings can still be changed.
        await h.store.destroy_queue("dead", force=False)
        change = SettingsChange(ack_deadline_ms=5000)
        expected = QueueSettings(5000, max_deliveries=3, dead_letter_queue="dead")
        assert await h.store.update_queue("jobs", change) == expected

    run(body)


# Listings -------------------------------------------------------------------------------

# In UTF-8 byte order; UTF-16 would put the emoji (a surrogate pair) before U+FFFD.
NAMES = ["A", "a", "a.b", "ab", "b", "é", "€", "\ufffd", "😀"]


def test_queues_are_listed_in_utf8_byte_order_with_their_counts(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        for name in reversed(NAMES):
            await h.store.create_queue(name, rooms())
        await h.store.enqueue("ab", ["x", "y", "z"])
        await h.store.claim("ab", 7, 1, MIB)
        listed = await h.store.list_queues("", 100, lambda name: True)
        assert [name for name, _ in listed] == NAMES
        assert dict(listed)["ab"] == QueueCounts(ready=2, in_flight=1)
        assert dict(listed)["b"] == QueueCounts(ready=0, in_flight=0)

        pages: list[str] = []
        cursor = ""
        while page := await h.store.list_queues(cursor, 4, lambda name: True):
            assert len(page) <= 4
            pages += [name for name, _ in page]
            cursor = page[-1][0]
        assert pages == NAMES

        # Hidden names are skipped, not counted toward the limit.
        hidden = {"a", "a.b", "ab", "b"}
        visible = await h.store.list_queues("A", 3, lambda name: name not in hidden)
        assert [name for name, _ in visible] == ["é", "€", "\ufffd"]
        assert await h.store.list_queues("😀", 10, lambda name: True) == []

        await h.store.destroy_queue("b", True)
        after = await h.store.list_queues("ab", 1, lambda name: True)
        assert [name for name, _ in after] == ["é"]

    run(body)


def test_maps_are_listed_in_utf8_byte_order(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        for name in reversed(NAMES):
            await h.store.map_put(name, [("k", "v")], maps())
        assert await h.store.list_maps("", 100, lambda name: True) == NAMES
        assert await h.store.list_maps("a", 2, lambda name: True) == ["a.b", "ab"]
        hidden = {"a.b", "ab", "é"}
        assert await h.store.list_maps("a", 2, lambda name: name not in hidden) == ["b", "€"]
        await h.store.map_destroy("ab")
        assert await h.store.list_maps("a.b", 1, lambda name: True) == ["b"]
        assert await h.store.list_maps("😀", 5, lambda name: True) == []

    run(body)


def test_listing_many_maps_of_which_few_are_visible(run: Callable[[Body], None]) -> None:
    """Visible names far apart among hidden ones: the listing reads on past them."""

    async def body(h: Harness) -> None:
        names = [f"m{i:04}" for i in range(700)]
        for name in names:
            await h.store.map_put(name, [("k", "v")], maps(1000))
        wanted = {"m0003", "m0400", "m0699"}
        assert await h.store.list_maps("", 10, wanted.__contains__) == sorted(wanted)
        assert await h.store.list_maps("m0003", 1, wanted.__contains__) == ["m0400"]

    run(body)


# Map key cursor -------------------------------------------------------------------------


async def page_keys(
    store: Store, start_after: str | None, size: int
) -> tuple[list[str], str | None]:
    page, next_key = await store.map_page_after("m", start_after, size, MIB)
    return [key for key, _ in page], next_key


def test_cursor_pages_walk_the_map_in_key_order(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        keys = ["", "b", "a", "é", "€", "😀", "\ufffd"]  # the empty key is a key too
        await h.store.map_put("m", [(k, k + "!") for k in keys], maps())
        in_order = sorted(keys, key=str.encode)
        page, next_key = await h.store.map_page_after("m", None, 3, MIB)
        assert page == [(k, k + "!") for k in in_order[:3]]
        assert next_key == in_order[2]
        # The empty key as a cursor is the key "", not the start: a first page of one
        # entry ends at it, and the next page must not start over.
        assert await page_keys(h.store, None, 1) == ([""], "")
        assert await page_keys(h.store, "", 1) == ([in_order[1]], in_order[1])
        assert await page_keys(h.store, in_order[2], 3) == (in_order[3:6], in_order[5])
        # The last page: the one entry left, and no cursor.
        assert await page_keys(h.store, in_order[5], 3) == (in_order[6:], None)
        # A page that ends exactly at the last key has no cursor either.
        assert await page_keys(h.store, in_order[3], 3) == (in_order[4:], None)
        assert await page_keys(h.store, "😀", 3) == ([], None)
        with pytest.raises(errors.MapNotFound):
            await h.store.map_page_after("nope", None, 3, MIB)

    run(body)


def test_a_cursor_page_stops_at_its_byte_budget(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        big = "x" * 1000
        await h.store.map_put("m", [("a", big), ("b", big), ("c", big)], maps())
        page, next_key = await h.store.map_page_after("m", None, 10, 1500)
        assert ([k for k, _ in page], next_key) == (["a"], "a")
        # The first entry always comes, whatever its size.
        page, next_key = await h.store.map_page_after("m", "a", 10, 10)
        assert ([k for k, _ in page], next_key) == (["b"], "b")

    run(body)


def test_cursor_pages_are_stable_while_the_map_changes(run: Callable[[Body], None]) -> None:
    """Entries added or removed between pages, before and after the cursor, neither skip
    nor repeat any entry present throughout (offset paging would do both)."""

    async def body(h: Harness) -> None:
        initial = [f"k{i:02}" for i in range(0, 40, 2)]  # k00, k02, ..., k38
        await h.store.map_put("m", [(k, "v") for k in initial], maps())
        seen: list[str] = []
        cursor: str | None = None
        removed: set[str] = set()
        turn = 0
        while True:
            keys, cursor = await page_keys(h.store, cursor, 4)
            seen += keys
            if cursor is None:
                break
            # Before the cursor: remove one seen, add two (offsets would shift by one).
            await h.store.map_remove("m", seen[turn])
            await h.store.map_put("m", [(f"a{turn}", "v"), (f"b{turn}", "v")], maps())
            # After it: remove one not yet seen, add one.
            later = f"k{int(cursor[1:]) + 4:02}"
            if later in initial and later not in removed:
                await h.store.map_remove("m", later)
                removed.add(later)
            await h.store.map_put("m", [(f"{cursor}+", "v")], maps())
            turn += 1
        throughout = [k for k in initial if k not in removed]
        assert [k for k in seen if k in initial] == throughout  # each once, in order
        assert removed  # the test did remove entries ahead of the cursor
        assert len(seen) == len(set(seen))

    run(body)


# Idempotent adds ------------------------------------------------------------------------


def key(request_id: str, fingerprint: bytes = b"fp-1", user: str = "alice") -> IdempotencyKey:
    return IdempotencyKey(user, request_id, fingerprint)


async def size_of(store: Store, name: str) -> int:
    return (await store.queue_counts(name)).ready


def test_a_repeated_add_answers_the_first_ids_and_adds_nothing(
    run: Callable[[Body], None],
) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", rooms())
        first = await h.store.enqueue("q", ["a", "b"], idempotency=key("r1"))
        assert first == Enqueued([1, 2], False)
        again = await h.store.enqueue("q", ["a", "b"], idempotency=key("r1"))
        assert again == Enqueued([1, 2], True)
        assert await size_of(h.store, "q") == 2
        # Other users' request ids are their own; no key adds every time.
        other = await h.store.enqueue("q", ["c"], idempotency=key("r1", b"fp-2", user="bob"))
        assert other == Enqueued([3], False)
        assert await h.store.enqueue("q", ["d"]) == Enqueued([4], False)
        assert await h.store.enqueue("q", ["d"]) == Enqueued([5], False)
        # Repeats that arrive together (one transaction) still add once.
        together = await asyncio.gather(
            *(h.store.enqueue("q", ["e"], idempotency=key("r2")) for _ in range(5))
        )
        assert together[0] == Enqueued([6], False)
        assert together[1:] == [Enqueued([6], True)] * 4
        assert await size_of(h.store, "q") == 6

    run(body)


def test_a_request_id_reused_for_another_request_is_refused(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", rooms())
        await h.store.enqueue("q", ["a"], idempotency=key("r1"))
        with pytest.raises(errors.InvalidArgument, match="request_id 'r1' was used for a differ"):
            await h.store.enqueue("q", ["other"], idempotency=key("r1", b"fp-other"))
        assert await size_of(h.store, "q") == 1
        # The first request still replays.
        assert await h.store.enqueue("q", ["a"], idempotency=key("r1")) == Enqueued([1], True)

    run(body)


def test_idempotency_keys_outlive_a_restart(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", rooms())
        await h.store.enqueue("q", ["a", "b", "c"], idempotency=key("r1"))
        await h.reopen()
        assert await h.store.enqueue("q", ["a", "b", "c"], idempotency=key("r1")) == Enqueued(
            [1, 2, 3], True
        )
        with pytest.raises(errors.InvalidArgument):
            await h.store.enqueue("q", ["x"], idempotency=key("r1", b"fp-other"))
        assert await size_of(h.store, "q") == 3

    run(body)


def test_a_request_id_is_free_again_after_the_window(run: Callable[[Body], None]) -> None:
    async def body(h: Harness) -> None:
        await h.store.create_queue("q", rooms())
        await h.store.enqueue("q", ["a"], idempotency=key("r1"))
        h.clock.now = START + WINDOW_S - 0.001  # the last moment of the window
        assert await h.store.enqueue("q", ["a"], idempotency=key("r1")) == Enqueued([1], True)
        h.clock.now = START + WINDOW_S
        # A new request now, even with another fingerprint; it starts a window of its own.
        fresh = await h.store.enqueue("q", ["b"], idempotency=key("r1", b"fp-2"))
        assert fresh == Enqueued([2], False)
        await h.reopen()
        h.clock.now = START + 2 * WINDOW_S - 0.001
        assert await h.store.enqueue("q", ["b"], idempotency=key("r1", b"fp-2")) == Enqueued(
            [2], True
        )
        assert await size_of(h.store, "q") == 2

    run(body)


# SQLite's own: the file itself ----------------------------------------------------------


def test_expired_idempotency_keys_are_pruned_a_few_at_a_time(tmp_path: Path) -> None:
    """Each idempotent add deletes at most IDEMPOTENCY_PRUNE_BATCH expired keys (no big
    delete in one commit), more than it adds, so expired keys do not pile up."""

    async def main() -> int:
        clock = Clock()
        store = SqliteStore(tmp_path, clock=clock, idempotency_window_s=WINDOW_S)
        await store.open()
        try:
            await store.create_queue("q", rooms())
            for i in range(30):
                await store.enqueue("q", ["x"], idempotency=key(f"old{i}"))
            clock.now = START + WINDOW_S
            counts = []
            for i in range(4):
                await store.enqueue("q", ["y"], idempotency=key(f"new{i}"))
                counts.append(_key_rows(tmp_path))
            step = IDEMPOTENCY_PRUNE_BATCH
            assert counts == [30 + 1 - step, 30 + 2 - 2 * step, 30 + 3 - 3 * step, 4]
        finally:
            await store.close()
        return _key_rows(tmp_path)

    assert asyncio.run(main()) == 4


def _key_rows(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / DB_FILE)
    try:
        (rows,) = conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()
        return int(rows)
    finally:
        conn.close()


class FailingCommits(FailingWrites):
    """Only COMMIT fails: the transaction ran, and its effects must be undone."""

    def _check(self, statement: str) -> None:
        if self.failing and statement.lstrip().upper().startswith("COMMIT"):
            raise sqlite3.OperationalError("disk I/O error (injected at commit)")


def test_a_failed_commit_leaves_settings_and_idempotency_keys_as_committed(
    tmp_path: Path,
) -> None:
    """An update whose commit fails answers UNAVAILABLE and changes nothing, in memory or
    on disk; an idempotent add whose commit fails keeps no key, so its retry adds."""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        assert store._writer._conn is not None
        commits = FailingCommits(store._writer._conn)
        await store._submit(lambda: setattr(store._writer, "_conn", commits))
        try:
            await store.create_queue("dead", rooms())
            await store.create_queue("jobs", rooms(), SETTINGS)
            commits.failing = True
            with pytest.raises(errors.Unavailable):
                await store.update_queue("jobs", SettingsChange(ack_deadline_ms=5_000))
            commits.failing = False
            assert await settings_of(store, "jobs") == SETTINGS  # recovers first

            commits.failing = True
            with pytest.raises(errors.Unavailable):
                await store.enqueue("jobs", ["a"], idempotency=key("r1"))
            commits.failing = False
            added = await store.enqueue("jobs", ["a"], idempotency=key("r1"))
            assert added == Enqueued([1], False)
        finally:
            await store.close()
        again = SqliteStore(tmp_path)
        await again.open()
        try:
            assert await settings_of(again, "jobs") == SETTINGS
            assert await again.enqueue("jobs", ["a"], idempotency=key("r1")) == Enqueued([1], True)
        finally:
            await again.close()

    asyncio.run(main())
