"""The embedded store: one SQLite file (WAL, synchronous=FULL), one writer thread.

Why one writer thread: SQLite allows one writer at a time anyway, and a single thread that
takes every queued operation, runs them in one transaction and commits once (group
commit) turns N concurrent callers into one fsync. Callers on the event loop await a
future that is resolved only after the COMMIT returned, so nothing answers OK before it
is durable.

The writer also owns a small in-memory index (queue ids and counts, map ids, the next
message id, which session holds which message) so that limits and existence checks cost
no query and payloads stay on disk. Being in flight is not written to disk at all
(inflight.py says why): a claim reads rows and advances one per-queue mark, an ack
deletes rows, a negative ack or a session's end writes nothing. Each queue's messages
have a table of their own (sqlite_sql.MessageStatements says why).
Map and user reads do not go through the writer: they run in reader threads, each with
a read-only connection of its own, and see only committed state (WAL gives each read
transaction a snapshot), so a read of many MiB neither waits behind writes nor delays a
commit. After each commit the writer publishes the counts of the queues it touched;
`queue_counts` and `ready_hint` read that published copy without a thread hop, and it
only ever shows committed state.

Why operations are staged (_Batch): the sqlite3 module releases the GIL around every
step of every statement, and under load the writer then waits for the event loop to give
the GIL back far longer than SQLite works. So a transaction issues few statements however
many operations share it: adds, claims and done-acks are collected and written together
just before the commit (BENCHMARKS.md has the measurements).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import heapq
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from qm_server import errors
from qm_server.answer_size import MAX_ENTRY_OVERHEAD, element_info_size, key_value_size
from qm_server.fsutil import fsync_dir
from qm_server.permissions import Grant, Permissions
from qm_server.quotas import Room
from qm_server.store import sqlite_sql as sql
from qm_server.store import sqlite_users as users
from qm_server.store.base import Delivery, HealthListener, QueueCounts, Store, UserRecord
from qm_server.store.inflight import InFlight
from qm_server.store.reserve import RESERVE_FILE, DiskReserve
from qm_server.store.sqlite_file import DB_FILE, SYNCHRONOUS, connect, is_corruption

log = logging.getLogger(__name__)

T = TypeVar("T")
# How many queued operations one transaction takes at most: bounds commit latency.
MAX_BATCH_OPS = 1024
# While unhealthy, the writer probes the file this often to notice the fault is gone.
PROBE_INTERVAL_S = 0.5
# Threads for map and user reads. Each has its own read-only connection: in WAL mode
# readers see the last commit and neither wait for the writer nor hold it up, so a read
# of tens of MiB no longer sits in the writer's queue ahead of every Add. One core is left
# to the event loop and the writer: measured on 2 cores (add_beside_big_reads), two
# readers doubled Add's p50 beside four big readers where one left it unchanged, for
# about the same bytes read. The engine bounds the bytes that reads in progress hold.
READER_THREADS = max(1, min(2, (os.cpu_count() or 1) - 1))
# Checkpoint after this many WAL pages. A small WAL that is reset often keeps commits
# overwriting the same file blocks instead of growing the file: measured here, the mean
# FULL commit fell from 0.45-0.75 ms (SQLite's default of 1000 pages) to about 0.2 ms.
# A checkpoint running on another thread cannot reset the WAL under continuous writes
# (it never catches up), so the writer checkpoints itself.
WAL_AUTOCHECKPOINT_PAGES = 200
# On a full disk (reserve.py), what operations that need more room are told.
DISK_FULL = (
    "the disk is full: adds, puts and new queues are refused until space is freed "
    "(acks, DestroyQueue, MapRemove and MapDestroy still work)"
)


@dataclass(slots=True)
class _QueueState:
    id: int
    sql: sql.MessageStatements
    ready: int = 0
    # Every id at or below it was delivered at least once (saved with each claim).
    delivered_upto: int = 0
    # A heap of ready ids at or below delivered_upto: given back by a negative ack or a
    # session's end, or in flight when the last process stopped. Older than every id
    # above the mark, so claims take these first.
    given_back: list[int] = field(default_factory=list)
    owner: str | None = None  # who created it; None for queues made before owners were kept


@dataclass(slots=True)
class _Index:
    """The writer's view, including the open transaction's effects."""

    queues: dict[str, _QueueState] = field(default_factory=dict)
    queue_names: dict[int, str] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    map_owners: dict[str, str | None] = field(default_factory=dict)
    # Queues and maps per creator, for the per-user quotas.
    owned_queues: Counter[str] = field(default_factory=Counter)
    owned_maps: Counter[str] = field(default_factory=Counter)
    next_message_id: int = 1


@dataclass(slots=True)
class _Op:
    run: Callable[[], Any]
    future: asyncio.Future[Any]
    # What the operation may run beside staged work (see _Batch): ADDS only stages rows;
    # CLAIMS stages claims or changes only what is in flight; any other operation needs
    # the staged rows written and the staged claims resolved first.
    stage: str = ""
    # The session that release_session ends: done even if the transaction fails (_refuse).
    ends_session: int | None = None
    # Needs more disk space (adds, puts, new queues, users): refused on a full disk, where
    # everything else still runs (reserve.py).
    grows: bool = False


ADDS = "adds"
CLAIMS = "claims"


@dataclass(slots=True)
class _Claim:
    """A claim staged in a transaction; `deliveries` is filled in place when resolved."""

    state: _QueueState
    session_id: int
    limit: int
    max_bytes: int
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass(slots=True)
class _Append:
    """Consecutive ids of one queue, staged to be inserted with one statement."""

    queue: _QueueState
    first_id: int
    payloads: list[str]


class _Batch:
    """What one transaction changed, for publishing after its commit."""

    def __init__(self) -> None:
        self.touched: set[str] = set()
        self.now_ready: set[str] = set()
        # The newest id was deleted: save the id counter, or a restart (which derives it
        # from the largest id present) could hand that id out again.
        self.deleted_newest = False
        # Writes staged so that a transaction issues few statements, whatever number of
        # operations it holds: each statement costs the writer a round trip through the
        # GIL, which under load took most of an operation's time. Adds: one INSERT per run
        # of ids, written before any operation that reads or deletes messages.
        self.appends: list[_Append] = []
        # Done-acked ids, deleted by runs, and queue id -> delivered_upto: written just
        # before the commit. Deferring them changes no claim: a claim never reads a
        # message that was in flight, and reads the mark from memory.
        self.deletes: dict[int, list[int]] = {}  # queue id -> ids
        self.marks: dict[int, int] = {}
        # Claims in arrival order, resolved together: one read per queue for all of them.
        self.claims: list[_Claim] = []


class SqliteStore(Store):
    """The default store: `<data_dir>/qm.db`, no other process needed."""

    def __init__(
        self,
        data_dir: Path,
        durability: str = "full",
        check_s: float = 0.0,
        reserve_bytes: int = 0,
    ) -> None:
        """`check_s`: how long the integrity check at open may take (0: none);
        `reserve_bytes`: the disk space set aside for draining a full disk (reserve.py)."""
        if durability not in SYNCHRONOUS:
            raise ValueError(f"durability must be one of {', '.join(SYNCHRONOUS)}")
        self._synchronous = SYNCHRONOUS[durability]
        self._path = data_dir / DB_FILE
        self._check_s = check_s
        self._reserve = DiskReserve(data_dir / RESERVE_FILE, reserve_bytes)
        self._inbox: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None
        self._index = _Index()
        self._in_flight = InFlight()
        self._batch = _Batch()
        self._published: dict[str, QueueCounts] = {}
        self._healthy = True
        # While unhealthy: the disk is full (growing operations refused, others run), and
        # the index must be rebuilt before the others run (a transaction failed).
        self._disk_full = False
        self._index_stale = False
        # SQLite found the file corrupt: unhealthy until a restart (which checks it).
        self._damaged = False
        self._unhealthy_reason = ""
        self._next_probe = 0.0
        self._closed = False
        # Transactions of queued operations committed: with group commit, fewer than the
        # operations (tests/test_store_batching.py counts them). Written by the writer only.
        self.commits = 0
        self._health_listener: HealthListener = lambda healthy: None
        self._ready_listener: Callable[[str], None] = lambda name: None
        # Map reads run here, each thread with a read-only connection of its own.
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="qm-sqlite-reader")
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        created = not self._path.exists()
        self._thread = threading.Thread(target=self._writer_loop, name="qm-sqlite-writer")
        self._thread.daemon = True
        self._thread.start()
        await self._submit(self._open_in_writer)
        if created:
            fsync_dir(self._path.parent)

    def _open_in_writer(self) -> None:
        self._conn = connect(self._path, check_s=self._check_s)
        self._conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        self._conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        self._conn.execute("PRAGMA journal_size_limit = 67108864")
        self._conn.execute("PRAGMA cache_size = -65536")  # 64 MiB of pages, at most
        stat = os.stat(self._path)
        self._file_id = (stat.st_dev, stat.st_ino)
        self._load_index()
        given_back = sum(len(state.given_back) for state in self._index.queues.values())
        if given_back:
            log.info("%d messages delivered before the restart are ready again", given_back)
        if not self._reserve.make():
            self._enter_disk_full("no room for the disk reserve at start")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._readers.shutdown)  # reads under way finish
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        # The writer's connection closes last: the last close checkpoints the write-ahead
        # log into the database and removes it, which a query-only reader does not.
        self._inbox.put(None)
        thread = self._thread
        if thread is not None:
            await loop.run_in_executor(None, thread.join)

    def set_health_listener(self, listener: HealthListener) -> None:
        self._health_listener = listener

    def unhealthy_reason(self) -> str:
        return self._unhealthy_reason

    def set_ready_listener(self, listener: Callable[[str], None]) -> None:
        self._ready_listener = listener

    # Queues -----------------------------------------------------------------------------

    async def create_queue(self, name: str, room: Room | int) -> None:
        quota = room if isinstance(room, Room) else Room.server_wide("queues", room)

        def run() -> None:
            index = self._index
            if name in index.queues:
                raise errors.QueueAlreadyExists(f"queue {name!r} already exists")
            owner = quota.user
            quota.check(len(index.queues), index.owned_queues[owner] if owner else 0)
            queue_id = self._db.execute(sql.INSERT_QUEUE, (name, owner)).lastrowid
            assert queue_id is not None
            statements = sql.MessageStatements.of(queue_id)
            self._db.execute(statements.create)
            index.queues[name] = _QueueState(queue_id, statements, owner=owner)
            if owner:
                index.owned_queues[owner] += 1
            index.queue_names[queue_id] = name
            self._batch.touched.add(name)

        await self._submit(run, grows=True)

    async def destroy_queue(self, name: str, force: bool) -> None:
        def run() -> None:
            state = self._queue(name)
            in_flight = self._in_flight.count(state.id)
            if not force and (state.ready or in_flight):
                raise errors.QueueNotEmpty(
                    f"queue {name!r} holds {state.ready} ready and {in_flight} "
                    "in-flight messages; use force to destroy it anyway"
                )
            self._db.execute(state.sql.drop)
            self._batch.deletes.pop(state.id, None)  # its acked rows went with the table
            self._in_flight.drop_queue(state.id)
            self._batch.deleted_newest = True
            self._db.execute(sql.DELETE_QUEUE, (state.id,))
            del self._index.queues[name]
            del self._index.queue_names[state.id]
            _disown(self._index.owned_queues, state.owner)
            self._batch.touched.add(name)

        await self._submit(run)

    async def enqueue(self, name: str, elements: Sequence[str]) -> list[int]:
        def run() -> list[int]:
            state = self._queue(name)
            first = self._index.next_message_id
            appends = self._batch.appends
            if appends and appends[-1].queue is state:  # ids follow on: same run
                appends[-1].payloads.extend(elements)
            else:
                appends.append(_Append(state, first, list(elements)))
            self._index.next_message_id = first + len(elements)
            state.ready += len(elements)
            self._batch.touched.add(name)
            self._batch.now_ready.add(name)
            return list(range(first, first + len(elements)))

        return await self._submit(run, ADDS)

    def _begin(self) -> None:
        """Open the transaction at the first statement that needs one."""
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")

    def _write_staged(self) -> None:
        """Everything staged, before the commit: adds and claims (which read them), then
        deletions and marks."""
        batch = self._batch
        if not self._db.in_transaction:  # only staged work so far: perhaps no transaction
            others = batch.claims or batch.deletes or batch.marks or batch.deleted_newest
            if not (batch.appends or others):
                return  # nothing to write (negative acks, say)
            # Only when nothing else is staged: _write_appends would build the JSON again.
            lone = _one_insert(batch.appends[0]) if len(batch.appends) == 1 and not others else None
            if lone:
                # Adds to one queue only (unary Adds under load share one run of ids) are
                # one INSERT, which commits by itself: no BEGIN and no COMMIT, two
                # statements fewer, each a round trip through the GIL.
                self._db.execute(*lone)
                batch.appends.clear()
                return
        self._begin()
        self._resolve_claims()
        for queue_id, deletes in batch.deletes.items():
            # Every id of a run was acked done, so deleting the whole range touches no
            # other message.
            state = self._index.queues[self._index.queue_names[queue_id]]
            self._db.executemany(state.sql.delete_range, _runs(deletes))
        if batch.marks:
            marks = [(mark, queue_id) for queue_id, mark in batch.marks.items()]
            self._db.executemany(sql.SET_DELIVERED_UPTO, marks)
        if batch.deleted_newest:
            self._db.execute(sql.SAVE_NEXT_MESSAGE_ID, (self._index.next_message_id,))

    def _write_appends(self) -> None:
        """Insert the staged adds: before anything that reads or deletes messages, and
        before the commit."""
        for append in self._batch.appends:
            one = _one_insert(append)
            if one:
                self._db.execute(*one)
            else:
                first = append.first_id
                rows = [(first + i, e) for i, e in enumerate(append.payloads)]
                self._db.executemany(append.queue.sql.insert_one, rows)
        self._batch.appends.clear()

    async def claim(self, name: str, session_id: int, limit: int, max_bytes: int) -> list[Delivery]:
        published = self._published.get(name)
        if published is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        if published.ready == 0 and self._healthy:
            return []

        return await self._submit(lambda: self._claim(name, session_id, limit, max_bytes), CLAIMS)

    async def ack(self, session_id: int, message_ids: Sequence[int], done: bool) -> list[bool]:
        return await self._submit(lambda: self._ack(session_id, message_ids, done), CLAIMS)

    async def ack_and_claim(
        self,
        session_id: int,
        message_ids: Sequence[int],
        done: bool,
        name: str,
        limit: int,
        max_bytes: int,
    ) -> tuple[list[bool], list[Delivery]]:
        def run() -> tuple[list[bool], list[Delivery]]:
            found = self._ack(session_id, message_ids, done)
            return found, self._claim(name, session_id, limit, max_bytes) if limit else []

        return await self._submit(run, CLAIMS)

    def _claim(self, name: str, session_id: int, limit: int, max_bytes: int) -> list[Delivery]:
        """Stage a claim; its list is filled before the commit (_resolve_claims)."""
        state = self._queue(name)
        if state.ready == 0:
            return []
        claim = _Claim(state, session_id, limit, max_bytes)
        self._batch.claims.append(claim)
        return claim.deliveries

    def _resolve_claims(self) -> None:
        """Give each staged claim the oldest ready messages of its queue, in the order
        the claims arrived: one read per queue, however many claims wait."""
        self._write_appends()  # the rows the claims may take
        by_queue: dict[int, list[_Claim]] = {}
        for claim in self._batch.claims:
            by_queue.setdefault(claim.state.id, []).append(claim)
        self._batch.claims.clear()
        for claims in by_queue.values():
            self._fill_claims(claims[0].state, claims)

    def _fill_claims(self, state: _QueueState, claims: list[_Claim]) -> None:
        wanted = min(sum(claim.limit for claim in claims), state.ready)
        rows: list[tuple[int, str, int]] = []
        if state.given_back:
            given_back = json.dumps(heapq.nsmallest(wanted, state.given_back))
            rows = self._read_messages(state.sql.read_by_ids, (given_back,))
        if len(rows) < wanted:
            undelivered = (state.delivered_upto, wanted - len(rows))
            rows += self._read_messages(state.sql.read_undelivered, undelivered)
        recounts: list[tuple[int, int]] = []
        start = 0
        for claim in claims:
            mine = rows[start : start + claim.limit]
            if len(mine) > 1 and not _fits(mine, claim.max_bytes):
                # Nothing is put in flight that its answer could not carry to the client.
                sizes = [element_info_size(_utf8_size(p), i, n) for i, p, n in mine]
                mine = mine[: _within_budget(sizes, claim.max_bytes)]
            start += len(mine)
            for message_id, _, count in mine:
                if message_id > state.delivered_upto:
                    break  # the rest are first deliveries, recorded by the mark
                # A redelivery: the message's own row keeps the count.
                if heapq.heappop(state.given_back) != message_id:
                    raise RuntimeError(f"message {message_id} was not given back")
                recounts.append((count, message_id))
            claim.deliveries.extend(map(_delivery, mine))
            if mine:
                self._in_flight.hold(claim.session_id, state.id, [row[0] for row in mine])
        if recounts:
            self._db.executemany(state.sql.set_delivery_count, recounts)
        if start:
            newest = rows[start - 1][0]
            if newest > state.delivered_upto:
                self._batch.marks[state.id] = newest
                state.delivered_upto = newest
            state.ready -= start
            self._batch.touched.add(self._index.queue_names[state.id])

    def _read_messages(self, statement: str, args: tuple[Any, ...]) -> list[tuple[int, str, int]]:
        """(id, payload, delivery count) rows, by id, from a statement that returns them as
        three JSON arrays (sqlite_sql.MessageStatements.read_undelivered says why)."""
        ids, payloads, counts = self._db.execute(statement, args).fetchone()
        rows = list(zip(json.loads(ids), json.loads(payloads), json.loads(counts), strict=True))
        rows.sort()
        return rows

    def _ack(self, session_id: int, message_ids: Sequence[int], done: bool) -> list[bool]:
        found = self._in_flight.drop(session_id, message_ids)
        finished: dict[int, list[int]] = {}
        for message_id, queue_id in zip(message_ids, found, strict=True):
            if queue_id is not None:
                finished.setdefault(queue_id, []).append(message_id)
        for queue_id, ids in finished.items():
            if done:
                self._delete_messages(queue_id, ids)
            self._finished(queue_id, ids, back_to_ready=not done)
        return [queue_id is not None for queue_id in found]

    def _delete_messages(self, queue_id: int, message_ids: list[int]) -> None:
        self._batch.deletes.setdefault(queue_id, []).extend(message_ids)
        if self._index.next_message_id - 1 in message_ids:
            self._batch.deleted_newest = True

    async def release_session(self, session_id: int) -> None:
        def run() -> None:
            by_queue: dict[int, list[int]] = {}
            for message_id, queue_id in self._in_flight.drop_session(session_id):
                by_queue.setdefault(queue_id, []).append(message_id)
            for queue_id, ids in by_queue.items():
                self._finished(queue_id, ids, back_to_ready=True)

        await self._submit(run, ends_session=session_id)

    def _finished(self, queue_id: int, message_ids: list[int], back_to_ready: bool) -> None:
        """Messages no longer in flight: acked, or ready again at their place."""
        name = self._index.queue_names[queue_id]
        state = self._index.queues[name]
        if back_to_ready:
            for message_id in message_ids:
                heapq.heappush(state.given_back, message_id)
            state.ready += len(message_ids)
            self._batch.now_ready.add(name)
        self._batch.touched.add(name)

    async def queue_counts(self, name: str) -> QueueCounts:
        if not self._healthy:
            await self._submit(lambda: None)  # raises Unavailable unless it recovered
        counts = self._published.get(name)
        if counts is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return counts

    def ready_hint(self, name: str) -> int:
        counts = self._published.get(name)
        # An unknown queue (destroyed, say, while a waiter claimed): 1, so that a waiter
        # parking on it claims at once and learns QueueNotFound instead of waiting on.
        return counts.ready if counts else 1

    # Maps -------------------------------------------------------------------------------

    async def map_put(self, name: str, pairs: Sequence[tuple[str, str]], room: Room | int) -> None:
        quota = room if isinstance(room, Room) else Room.server_wide("maps", room)

        def run() -> None:
            index = self._index
            map_id = index.maps.get(name)
            if map_id is None:
                owner = quota.user
                quota.check(len(index.maps), index.owned_maps[owner] if owner else 0)
                map_id = self._db.execute(sql.INSERT_MAP, (name, owner)).lastrowid
                assert map_id is not None
                index.map_owners[name] = owner
                if owner:
                    index.owned_maps[owner] += 1
            self._db.executemany(sql.PUT_ENTRY, [(map_id, k, v) for k, v in pairs])
            index.maps[name] = map_id

        await self._submit(run, grows=True)

    async def map_remove(self, name: str, key: str) -> None:
        def run() -> None:
            if self._db.execute(sql.DELETE_ENTRY, (self._map(name), key)).rowcount == 0:
                raise errors.KeyNotFound(f"map {name!r} has no key {key!r}")

        await self._submit(run)

    async def map_get(self, name: str, key: str) -> str:
        def run(conn: sqlite3.Connection) -> str:
            row = conn.execute(sql.GET_ENTRY, (_committed_map(conn, name), key)).fetchone()
            if row is None:
                raise errors.KeyNotFound(f"map {name!r} has no key {key!r}")
            return str(row[0])

        return await self._read(run)

    async def map_get_all(self, name: str, max_bytes: int) -> dict[str, str]:
        def run(conn: sqlite3.Connection) -> dict[str, str]:
            entries: dict[str, str] = {}
            total = 0
            # Row by row: a map too big to answer is refused having read max_bytes.
            for key, value in conn.execute(sql.ALL_ENTRIES, (_committed_map(conn, name),)):
                total += key_value_size(_utf8_size(key), _utf8_size(value))
                if total > max_bytes:
                    raise errors.ResourceExhausted(
                        f"map {name!r} holds more than one answer can carry ({max_bytes} "
                        "bytes); page it with MapGetList"
                    )
                entries[key] = value
            return entries

        return await self._read(run)

    async def map_get_list(
        self, name: str, offset: int, size: int, max_bytes: int
    ) -> list[tuple[str, str]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            page: list[tuple[str, str]] = []
            total = 0
            rows = conn.execute(sql.PAGE_ENTRIES, (_committed_map(conn, name), size, offset))
            # Row by row: a page of large values stops being read where its answer is full.
            for key, value in rows:
                total += key_value_size(_utf8_size(key), _utf8_size(value))
                if page and total > max_bytes:
                    break
                page.append((key, value))
            return page

        return await self._read(run)

    async def map_destroy(self, name: str) -> None:
        def run() -> None:
            map_id = self._map(name)
            self._db.execute(sql.DELETE_MAP_ENTRIES, (map_id,))
            self._db.execute(sql.DELETE_MAP, (map_id,))
            del self._index.maps[name]
            _disown(self._index.owned_maps, self._index.map_owners.pop(name, None))

        await self._submit(run)

    # Users ------------------------------------------------------------------------------
    # The statements are sqlite_users', shared with the user commands' directory.

    async def get_user(self, name: str) -> UserRecord | None:
        return await self._read(lambda conn: users.get_user(conn, name))

    async def list_users(self) -> list[UserRecord]:
        return await self._read(users.list_users)

    async def count_users(self) -> int:
        return await self._read(users.count_users)

    async def create_user(self, record: UserRecord) -> bool:
        return await self._submit(lambda: users.create_user(self._db, record), grows=True)

    async def set_password(self, name: str, password_hash: str, make_admin: bool = False) -> bool:
        def run() -> bool:
            return users.set_password(self._db, name, password_hash, make_admin)

        return await self._submit(run, grows=True)

    async def delete_user(self, name: str) -> bool:
        return await self._submit(lambda: users.delete_user(self._db, name))

    async def add_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._submit(lambda: users.add_grants(self._db, name, grants), grows=True)

    async def remove_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._submit(lambda: users.remove_grants(self._db, name, grants))

    async def load_permissions(self) -> dict[str, Permissions]:
        return await self._read(users.load_permissions)

    # Readers ----------------------------------------------------------------------------

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on a reader connection, off the event loop and off the writer."""
        if self._closed:
            raise errors.Unavailable("the store is closed")
        if not self._healthy:
            await self._submit(lambda: None)  # raises Unavailable unless it recovered
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(self._readers, self._read_in_reader, run)
        except RuntimeError:  # the readers shut down (close) since the check above
            raise errors.Unavailable("the store is closed") from None
        try:
            return await pending
        except errors.Unavailable as exc:
            if exc.__cause__ is not None and is_corruption(exc.__cause__):
                await self._report_damage(cast(sqlite3.Error, exc.__cause__))
            raise

    async def _report_damage(self, found: sqlite3.Error) -> None:
        """Damage a reader met is the writer's to act on (unhealthy until a restart): an
        operation that raises it goes through the writer's own failure path."""

        def fail() -> None:
            raise found

        with contextlib.suppress(errors.Unavailable):
            await self._submit(fail)

    def _read_in_reader(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """One read transaction: a snapshot of what was committed when it began."""
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        try:
            if conn is None:
                conn = _open_reader(self._path)
                with self._reader_lock:
                    self._reader_conns.append(conn)
                self._reader_local.conn = conn
            conn.execute("BEGIN")
            try:
                return run(conn)
            finally:
                conn.execute("ROLLBACK")  # it wrote nothing; this ends the snapshot
        except sqlite3.Error as exc:
            raise errors.Unavailable(f"the store could not read: {exc}") from exc

    # The writer -------------------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _queue(self, name: str) -> _QueueState:
        state = self._index.queues.get(name)
        if state is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return state

    def _map(self, name: str) -> int:
        map_id = self._index.maps.get(name)
        if map_id is None:
            raise errors.MapNotFound(f"map {name!r} does not exist")
        return map_id

    def _submit(
        self,
        run: Callable[[], T],
        stage: str = "",
        ends_session: int | None = None,
        grows: bool = False,
    ) -> asyncio.Future[T]:
        if self._closed:
            raise errors.Unavailable("the store is closed")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._inbox.put(_Op(run, future, stage, ends_session, grows or stage == ADDS))
        return future

    def _writer_loop(self) -> None:
        while True:
            try:
                first = self._inbox.get(timeout=None if self._healthy else PROBE_INTERVAL_S)
            except queue.Empty:
                self._recover()
                continue
            batch: list[_Op] = []
            stop = first is None
            if first is not None:
                batch.append(first)
            while not stop and len(batch) < MAX_BATCH_OPS:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batch.append(more)
            if batch:
                self._run_batch(batch)
            if stop:
                break
        if self._conn is not None:
            self._conn.close()

    def _run_batch(self, batch: list[_Op]) -> None:
        if self._conn is None:  # the open itself
            self._settle([(op.future, *_call(op.run)) for op in batch])
            return
        if not self._healthy and not self._recover():
            if not self._disk_full:
                failure = f"the store cannot commit ({self._unhealthy_reason}); see the server log"
                self._refuse(batch, errors.Unavailable(failure))
                return
            batch = self._refuse_growth(batch)
            if not batch:
                return
        self._batch = _Batch()
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            self._check_file()
            if self._index_stale:  # a transaction failed since the disk filled
                self._load_index()
                self._index_stale = False
            for op in batch:
                if not op.stage:
                    self._begin()
                    self._resolve_claims()
                ok, value = _call(op.run)
                if not ok and not isinstance(value, errors.QmError):
                    if isinstance(value, sqlite3.Error | OSError):
                        raise value
                    # A bug in one operation, which may have written part of its effect
                    # (domain errors are raised before any write, so they need no undo):
                    # undo the transaction and run each operation alone. Staged work alone
                    # has opened none yet (_write_staged), and ROLLBACK would then fail.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self._in_flight.rollback()
                    self._load_index()
                    if len(batch) == 1:
                        self._settle([(op.future, False, value)])
                    else:
                        for single in batch:
                            self._run_batch([single])
                    return
                outcomes.append((op.future, ok, value))
            self._write_staged()
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            self._in_flight.commit()
            self.commits += 1
        except Exception as exc:  # the whole transaction is lost: nothing answered OK
            self._fail(exc)
            self._refuse(batch, errors.Unavailable(f"the store could not commit: {exc}"))
            return
        self._publish(self._batch.touched)
        self._settle(outcomes, self._batch.now_ready)

    def _check_file(self) -> None:
        """A removed or replaced database file would swallow commits silently."""
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            raise errors.Unavailable(f"database file {self._path} was removed") from None
        if (stat.st_dev, stat.st_ino) != self._file_id:
            raise errors.Unavailable(f"database file {self._path} was replaced")

    def _refuse(self, batch: list[_Op], failure: errors.Unavailable) -> None:
        """Answer the operations of a transaction that did not commit with `failure`,
        except a session's release, which is done all the same: it writes nothing to disk,
        and its caller has forgotten the session, so nobody would ever release those
        messages again; they stayed in flight, unseen, until a restart. Its in-flight
        change needs no undo (the journal was rolled back first), and the index, stale
        until the store recovers, is rebuilt from the in-flight map then (_recover)."""
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        for op in batch:
            if op.ends_session is None:
                outcomes.append((op.future, False, failure))
            else:
                self._in_flight.drop_session(op.ends_session)
                self._in_flight.commit()
                outcomes.append((op.future, True, None))
        self._settle(outcomes)

    def _fail(self, exc: BaseException) -> None:
        self._in_flight.rollback()
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("rollback after a failed commit failed too", exc_info=True)
        # The index holds the failed transaction's effects until it is rebuilt.
        self._index_stale = True
        if self._damaged:
            return  # refused until a restart, whatever fails next
        if _is_disk_full(exc):
            self._enter_disk_full(str(exc))
            return
        if is_corruption(exc):
            self._damaged = True
            reason = (
                f"the database {self._path} is damaged ({exc}): stop the server and run "
                f"`qm-server check --data-dir {self._path.parent}`"
            )
            log.error("%s; answering UNAVAILABLE until then", reason)
            self._set_unhealthy(reason)
        elif self._healthy or self._disk_full:
            log.error("store failure, answering UNAVAILABLE until it recovers: %s", exc)
            self._set_unhealthy(f"the store cannot commit: {exc}")

    def _enter_disk_full(self, cause: str) -> None:
        """Give up the reserve so that what frees space can still commit; refuse the rest."""
        if self._disk_full:
            self._reserve.release()  # if it was made again meanwhile
            return
        released = self._reserve.release()
        log.error(
            "the disk holding %s is full (%s)%s: adds, puts and new queues answer "
            "UNAVAILABLE until %d bytes are free again; acks, DestroyQueue, MapRemove and "
            "MapDestroy still commit",
            self._path.parent,
            cause,
            f"; released the reserve {self._reserve.path}" if released else "",
            self._reserve.size,
        )
        self._set_unhealthy(f"{DISK_FULL} on {self._path.parent}")
        self._disk_full = True

    def _set_unhealthy(self, reason: str) -> None:
        self._healthy = False
        self._disk_full = False
        self._unhealthy_reason = reason
        self._notify_health(False)  # a new reason, even if it was unhealthy already

    def _refuse_growth(self, batch: list[_Op]) -> list[_Op]:
        """On a full disk: answer the operations that need more space, return the others."""
        refused = errors.Unavailable(DISK_FULL)
        self._settle([(op.future, False, refused) for op in batch if op.grows])
        return [op for op in batch if not op.grows]

    def _recover(self) -> bool:
        """Probe with a real write; on success reload the index and turn healthy.

        Never while the file is known damaged; on a full disk only once the reserve could
        be made again, at most every PROBE_INTERVAL_S."""
        if self._damaged:
            return False
        if self._disk_full:
            now = time.monotonic()
            if now < self._next_probe:
                return False
            self._next_probe = now + PROBE_INTERVAL_S
        try:
            if not self._reserve.make():
                return False
            self._check_file()
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(sql.TOUCH_PROBE)
            self._db.execute("COMMIT")
            self._load_index()
        except Exception as exc:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            log.debug("store still failing: %s", exc)
            return False
        log.warning("store recovered; serving again")
        self._healthy = True
        self._disk_full = False
        self._index_stale = False
        self._unhealthy_reason = ""
        self._notify_health(True)
        # Messages made ready while the store failed (sessions released by _refuse) had
        # no wake-up: waiters parked on their queues would wait on.
        self._settle([], {name for name, state in self._index.queues.items() if state.ready})
        return True

    def _load_index(self) -> None:
        """Rebuild the index from the committed file and the in-flight map (at start, and
        after a failed transaction, whose in-flight changes were already undone)."""
        index = _Index()
        # The next id: after the largest ever handed out, even if that row is gone.
        (saved_next_id,) = self._db.execute(sql.SAVED_NEXT_MESSAGE_ID).fetchone() or (1,)
        index.next_message_id = int(saved_next_id)
        for queue_id, name, delivered_upto, owner in self._db.execute(sql.ALL_QUEUES).fetchall():
            statements = sql.MessageStatements.of(queue_id)
            held = self._in_flight.held_in(queue_id)
            delivered = self._db.execute(statements.delivered_ids, (delivered_upto,))
            given_back = [m for (m,) in delivered if m not in held]  # ascending: a heap
            (count,) = self._db.execute(statements.count).fetchone()
            ready = count - self._in_flight.count(queue_id)
            state = _QueueState(queue_id, statements, ready, delivered_upto, given_back, owner)
            if owner:
                index.owned_queues[owner] += 1
            index.queues[name] = state
            index.queue_names[queue_id] = name
            (newest,) = self._db.execute(statements.max_id).fetchone()
            index.next_message_id = max(index.next_message_id, (newest or 0) + 1)
        for map_id, name, owner in self._db.execute(sql.ALL_MAPS):
            index.maps[name] = map_id
            index.map_owners[name] = owner
            if owner:
                index.owned_maps[owner] += 1
        self._index = index
        self._published = {}
        self._publish(index.queues.keys())

    def _publish(self, names: Any) -> None:
        for name in names:
            state = self._index.queues.get(name)
            if state is None:
                self._published.pop(name, None)
            else:
                self._published[name] = QueueCounts(state.ready, self._in_flight.count(state.id))

    def _settle(
        self,
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]],
        now_ready: set[str] | None = None,
    ) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._loop.call_soon_threadsafe(self._settle_on_loop, outcomes, now_ready or set())

    def _settle_on_loop(
        self, outcomes: list[tuple[asyncio.Future[Any], bool, Any]], now_ready: set[str]
    ) -> None:
        for future, ok, value in outcomes:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for name in now_ready:
            self._ready_listener(name)

    def _notify_health(self, healthy: bool) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._health_listener, healthy)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


def _call(run: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, run()
    except Exception as exc:
        return False, exc


def _one_insert(append: _Append) -> tuple[str, tuple[Any, ...]] | None:
    """The one statement that inserts a run of adds, or None where each row needs its own
    (JSON carries a NUL character escaped, which json_each would hand back unescaped)."""
    statements = append.queue.sql
    if len(append.payloads) == 1:
        return statements.insert_one, (append.first_id, append.payloads[0])
    payloads = json.dumps(append.payloads, ensure_ascii=False)
    if "\\u0000" in payloads:
        return None
    return statements.insert_many, (append.first_id, payloads)


def _disown(owned: Counter[str], owner: str | None) -> None:
    """One queue or map fewer for its creator."""
    if owner:
        owned[owner] -= 1
        if owned[owner] <= 0:
            del owned[owner]


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers as (first, last) pairs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    ordered = sorted(numbers)
    first = last = ordered[0]
    for number in ordered[1:]:
        if number != last + 1:
            runs.append((first, last))
            first = number
        last = number
    runs.append((first, last))
    return runs


# Delivery._make without its Python-level length check: the rows come from our own SQL.
_delivery = cast(
    Callable[[tuple[int, str, int]], Delivery], functools.partial(tuple.__new__, Delivery)
)


def _fits(rows: list[tuple[int, str, int]], max_bytes: int) -> bool:
    """Cheaply: surely within max_bytes once encoded (a character takes at most 4 bytes
    in UTF-8, and an entry at most MAX_ENTRY_OVERHEAD more)."""
    return 4 * sum(len(row[1]) for row in rows) + MAX_ENTRY_OVERHEAD * len(rows) <= max_bytes


def _within_budget(sizes: list[int], max_bytes: int) -> int:
    """How many leading items fit in max_bytes; at least one, so that one large item
    still gets through."""
    total = 0
    for taken, size in enumerate(sizes):
        total += size
        if taken and total > max_bytes:
            return taken
    return len(sizes)


def _open_reader(path: Path) -> sqlite3.Connection:
    """A connection that only reads (the file is already in WAL mode, and migrated)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA cache_size = -16384")  # 16 MiB of pages, at most
    return conn


def _committed_map(conn: sqlite3.Connection, name: str) -> int:
    """The map's id as committed (the writer's index also holds what is not yet)."""
    row = conn.execute(sql.MAP_ID, (name,)).fetchone()
    if row is None:
        raise errors.MapNotFound(f"map {name!r} does not exist")
    return int(row[0])


def _utf8_size(text: str) -> int:
    # ASCII is the common case; str.isascii() is O(1) for CPython's compact strings.
    return len(text) if text.isascii() else len(text.encode())
