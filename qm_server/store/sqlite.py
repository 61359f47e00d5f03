"""The embedded store: one SQLite file (WAL, synchronous=FULL), one writer thread.

A reader starts here. The store is split into modules with one job each:

- sqlite_writer.py: the writer thread. It takes every queued operation, runs them in one
  transaction and commits once (group commit), and answers each caller only after the
  COMMIT returned. It owns failures: rollback, UNAVAILABLE, the full-disk reserve, damage,
  recovery and the health listener.
- sqlite_staging.py: the adds, claims and acks staged in the open transaction, and
  their flush just before the commit (few statements, however many operations).
- sqlite_index.py: the writer's in-memory index (queue ids and counts, map ids, the next
  message id, each queue's delivery mark), so limits and existence checks cost no query.
- sqlite_readers.py: map and user reads, on reader threads with read-only connections,
  off the writer.
- sqlite_due.py: messages that move: delays and retry backoff (the `delayed` table),
  dead letters, max_age, purge, redrive.
- this module: SqliteStore, the domain operations (queues, messages, maps, users) on top.
  sqlite_sql.py holds every statement, PRAGMA and the current SCHEMA; sqlite_file.py opens
  and migrates the file; settings_json.py writes a queue's settings into its row.

Being in flight is not written to disk at all (inflight.py says why): a claim reads rows
and advances one per-queue mark, an ack deletes rows, a negative ack or a session's end
writes nothing (unless the queue's max_deliveries or retry backoff moves the message).
Each queue's messages have a table of their own (sqlite_sql.MessageStatements says why).

Sessions die with the process: this embedded store is the only owner of every session,
so whatever was in flight at a stop or crash is ready again when the store opens, its
delivery counted. Nothing is dead-lettered then: being in flight is not on disk, so a
message the restart released cannot be told from one ready already (a redriven dead
letter at its limit, say); one in flight at its last allowed delivery gets one more.
Delivery counts, delays and backoff ready times, and dead letters with their history are
on disk and survive.

Time: the store's clock (Unix time, injectable) stamps first adds, leases, delays and
dead letters. Nothing runs per message: lease deadlines sit in one heap (inflight.py),
delayed messages are found through an index on their ready time, and max_age checks are
scheduled per queue (sqlite_due.py). After each commit the writer computes the earliest
due time, and the store arms ONE timer on the event loop for it (`_arm`), which runs
`run_due`: expire leases, make due messages ready, age out old ones; its commit re-arms
the timer. Waiters wake through the ready listener as for any add.

The life of a write (an Add of two messages):
1. `enqueue` queues an operation for the writer (Writer.submit) and awaits its future.
2. The writer takes it with up to MAX_BATCH_OPS others queued meanwhile: one transaction.
3. The operation runs on the writer thread: it checks the index (QueueNotFound is raised
   before any write), hands out the next ids and stages the rows (Batch.append).
4. Before the commit the staged rows are inserted with one statement per run of ids
   (sqlite_staging.write_staged), then COMMIT: with synchronous=FULL, an fsync.
5. The queue's new counts are published (`queue_counts` reads them without a thread hop),
   the futures are resolved on the event loop, and waiters on the queue are woken (the
   ready listener). Had the commit failed, every operation of the transaction would have
   been answered UNAVAILABLE instead, and the index rebuilt from the file.

The life of a claim (a Take of up to ten messages):
1. `claim` answers [] at once if the published count says nothing is ready; otherwise it
   queues a CLAIMS operation, which only stages the claim (Batch.claim) and returns the
   list that will be filled.
2. Before the next operation that reads or deletes messages, or before the commit, the
   staged claims are resolved together (sqlite_staging.resolve_claims): one read per
   queue takes first the ids given back (a heap of ids at or below the delivery mark),
   then the oldest never delivered, above it; each claim gets its share in arrival order,
   cut to what its answer can carry.
3. The messages are held in flight for the session in memory (InFlight, journaled),
   with the claim's lease deadline if it has one, the mark advances (one row per queue,
   written with the commit), and redeliveries get their delivery count written.
4. After the COMMIT the in-flight journal is committed and the list is the answer. An ack
   later drops the ids from InFlight and stages their deletion; a negative ack, the end
   of the session or a lease's end gives them back, ready again at their place, without
   touching the disk (unless a retry backoff or max_deliveries moves them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from qm_server import errors, lifecycle
from qm_server.answer_size import key_value_size
from qm_server.errors import Code
from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, SettingsChange
from qm_server.permissions import Grant, Permissions
from qm_server.quotas import Room
from qm_server.store import sqlite_sql as sql
from qm_server.store import sqlite_staging as staging
from qm_server.store import sqlite_users as users
from qm_server.store.base import (
    DeadLetter,
    Delivery,
    Enqueued,
    HealthListener,
    IdempotencyKey,
    LeaseOutcome,
    QueueCounts,
    QueueInfo,
    Store,
    UserRecord,
)
from qm_server.store.inflight import InFlight
from qm_server.store.listing import visible_names
from qm_server.store.reserve import RESERVE_FILE, DiskReserve
from qm_server.store.settings_json import settings_to_json
from qm_server.store.sqlite_due import Moves
from qm_server.store.sqlite_file import DB_FILE, SYNCHRONOUS
from qm_server.store.sqlite_index import Index, QueueState, disown, load_index, oldest_ready
from qm_server.store.sqlite_readers import Readers
from qm_server.store.sqlite_staging import Batch, utf8_size
from qm_server.store.sqlite_writer import ADDS, CLAIMS, PROBE_INTERVAL_S, Writer

__all__ = ["ADDS", "CLAIMS", "SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long an idempotent add's key is kept by default (config.ServerConfig sets it).
DEFAULT_IDEMPOTENCY_WINDOW_S = 600.0
# Expired idempotency keys deleted by each idempotent add at most: more than the one it
# adds, so they cannot pile up, and few, so that no commit deletes many.
IDEMPOTENCY_PRUNE_BATCH = 8


class SqliteStore(Store):
    """The default store: `<data_dir>/qm.db`, no other process needed."""

    def __init__(
        self,
        data_dir: Path,
        durability: str = "full",
        check_s: float = 0.0,
        reserve_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        timed: bool = True,
    ) -> None:
        """`check_s`: how long the integrity check at open may take (0: none);
        `reserve_bytes`: the disk space set aside for draining a full disk (reserve.py);
        `clock`: Unix time in seconds, of first adds, leases, delays, ages and idempotency
        keys (a test passes a fake one and calls run_due);
        `idempotency_window_s`: how long a repeat of an idempotent add answers the first;
        `timed`: run what falls due by itself (a test on a fake clock turns it off and
        calls run_due, so that nothing expires behind its back)."""
        if durability not in SYNCHRONOUS:
            raise ValueError(f"durability must be one of {', '.join(SYNCHRONOUS)}")
        if idempotency_window_s < 0:
            raise ValueError("idempotency_window_s must be 0 or more")
        self._clock = clock
        self._timed = timed
        self._idempotency_window_ms = int(idempotency_window_s * 1000)
        self._index = Index()
        # The one timer that runs run_due when something falls due (_arm); `_armed_for`
        # is the due time it was last armed for, on the writer thread (-1: re-arm).
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = -1
        self._due_task: asyncio.Task[None] | None = None
        self._in_flight = InFlight()
        self._batch = Batch()
        # After each commit the writer publishes the counts of the queues it touched;
        # `queue_counts` and `ready_hint` read that published copy without a thread hop,
        # and it only ever shows committed state.
        self._published: dict[str, QueueCounts] = {}
        self._writer = Writer(
            data_dir / DB_FILE,
            SYNCHRONOUS[durability],
            check_s,
            DiskReserve(data_dir / RESERVE_FILE, reserve_bytes),
            self._in_flight,
            self,
        )
        self._readers = Readers(self._writer)

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await self._writer.open()
        await self._submit(lambda: None)  # arms the timer (committed)

    async def close(self) -> None:
        if self._writer.closed:
            return
        self._writer.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._due_task is not None:
            await asyncio.gather(self._due_task, return_exceptions=True)
        await self._readers.close()  # reads under way finish
        # The writer's connection closes last (Writer.stop says why).
        await self._writer.stop()

    @property
    def commits(self) -> int:
        """Transactions of queued operations committed: with group commit, fewer than the
        operations (tests/test_store_batching.py counts them)."""
        return self._writer.commits

    def set_health_listener(self, listener: HealthListener) -> None:
        self._writer.health_listener = listener

    def unhealthy_reason(self) -> str:
        return self._writer.unhealthy_reason

    def set_ready_listener(self, listener: Callable[[str], None]) -> None:
        self._writer.ready_listener = listener

    # Queues -----------------------------------------------------------------------------

    async def create_queue(
        self, name: str, room: Room, settings: QueueSettings = DEFAULT_SETTINGS
    ) -> None:

        def run() -> None:
            index = self._index
            if name in index.queues:
                raise errors.QueueAlreadyExists(f"queue {name!r} already exists")
            self._check_dead_letter_queue(name, settings)
            owner = room.user
            room.check(len(index.queues), index.owned_queues[owner] if owner else 0)
            row = (name, owner, settings_to_json(settings))
            queue_id = self._db.execute(sql.INSERT_QUEUE, row).lastrowid
            assert queue_id is not None
            statements = sql.MessageStatements.of(queue_id)
            self._db.execute(statements.create)
            index.queues[name] = QueueState(queue_id, statements, owner=owner, settings=settings)
            if owner:
                index.owned_queues[owner] += 1
            index.queue_names[queue_id] = name
            self._batch.touched.add(name)

        await self._submit(run, grows=True)

    async def update_queue(self, name: str, change: SettingsChange) -> QueueSettings:
        def run() -> QueueSettings:
            state = self._queue(name)
            settings = change.applied_to(state.settings)
            # Only a change of it is checked: a dead-letter queue destroyed since must
            # not block changing the other settings (its letters stay in this queue).
            if change.dead_letter_queue is not None:
                self._check_dead_letter_queue(name, settings)
            self._db.execute(sql.SET_QUEUE_SETTINGS, (settings_to_json(settings), state.id))
            # Undone with the whole index if the commit fails (the writer reloads it).
            state.settings = settings
            if change.max_age_ms:  # messages already there may be past the new max_age
                self._index.schedule_age_check(state, self._now_ms())
            return settings

        return await self._submit(run)

    def _check_dead_letter_queue(self, name: str, settings: QueueSettings) -> None:
        """Where a queue's dead letters go must be another queue that exists."""
        dead_letter_queue = settings.dead_letter_queue
        if not dead_letter_queue:
            return
        if dead_letter_queue == name:
            raise errors.InvalidArgument(
                f"queue {name!r} cannot be its own dead_letter_queue: a message past "
                "max_deliveries would never leave it"
            )
        if dead_letter_queue not in self._index.queues:
            raise errors.QueueNotFound(
                f"dead_letter_queue {dead_letter_queue!r} does not exist: create it first"
            )

    async def list_queues(
        self, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[tuple[str, QueueCounts]]:
        if not self._writer.healthy:
            await self._submit(lambda: None)  # raises Unavailable unless it recovered
        published = self._published  # committed queues only
        # Python orders str by code point, which is the UTF-8 byte order.
        found: list[tuple[str, QueueCounts]] = []
        for name in sorted(name for name in published if name > start_after):
            if len(found) >= limit:
                break
            if visible(name):
                found.append((name, published[name]))
        return found

    async def list_maps(
        self, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[str]:
        # Committed maps only: names are read on a reader connection.
        async def names_after(cursor: str, count: int) -> list[str]:
            return await self._read(_map_names_after(cursor, count))

        return await visible_names(names_after, start_after, limit, visible)

    async def destroy_queue(self, name: str, force: bool) -> None:
        def run() -> None:
            state = self._queue(name)
            in_flight = self._in_flight.count(state.id)
            if not force and (state.ready or in_flight or state.delayed):
                raise errors.QueueNotEmpty(
                    f"queue {name!r} holds {state.ready} ready, {state.delayed} delayed and "
                    f"{in_flight} in-flight messages; use force to destroy it anyway"
                )
            self._db.execute(state.sql.drop)
            self._db.execute(sql.DELETE_QUEUE_DELAYED, (state.id,))
            self._db.execute(sql.DELETE_HELD_DEAD_LETTERS, (state.id,))
            self._batch.deletes.pop(state.id, None)  # its acked rows went with the table
            self._in_flight.drop_queue(state.id)
            self._batch.deleted_newest = True
            self._db.execute(sql.DELETE_QUEUE, (state.id,))
            del self._index.queues[name]
            del self._index.queue_names[state.id]
            disown(self._index.owned_queues, state.owner)
            self._batch.touched.add(name)

        await self._submit(run)

    async def enqueue(
        self,
        name: str,
        elements: Sequence[str],
        delay_ms: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Enqueued:
        def run() -> Enqueued:
            if (replayed := self._replayed(idempotency)) is not None:
                return replayed
            state = self._queue(name)
            self._check_length(state, len(elements))
            first = self._index.next_message_id
            self._index.next_message_id = first + len(elements)
            self._add(state, first, list(elements), delay_ms)
            self._remember(idempotency, first, len(elements))
            return Enqueued(list(range(first, first + len(elements))), False)

        return await self._submit(run, ADDS)

    def _replayed(self, key: IdempotencyKey | None) -> Enqueued | None:
        """The first answer to an idempotent add seen within the window, or None: then
        the add goes ahead. InvalidArgument, before any write, when the key was used
        for another request. The key is read from the file (the writer's connection,
        which sees the open transaction too): no memory is spent on keys."""
        if key is None:
            return None
        row = self._db.execute(sql.IDEMPOTENCY_KEY, (key.user, key.request_id)).fetchone()
        if row is None:
            return None
        fingerprint, first_id, count, created_at_ms = row
        if created_at_ms <= self._now_ms() - self._idempotency_window_ms:
            return None  # expired: a new request, which replaces the row
        if bytes(fingerprint) != key.fingerprint:
            raise errors.InvalidArgument(
                f"request_id {key.request_id!r} was used for a different request "
                "(another queue or other elements) within the idempotency window"
            )
        return Enqueued(list(range(first_id, first_id + count)), True)

    def _remember(self, key: IdempotencyKey | None, first_id: int, count: int) -> None:
        """Keep the key of an idempotent add in the add's own transaction, and prune a
        few expired ones (IDEMPOTENCY_PRUNE_BATCH)."""
        if key is None:
            return
        staging.begin(self._db)  # an add alone may otherwise commit by itself, keyless
        now_ms = self._now_ms()
        row = (key.user, key.request_id, key.fingerprint, first_id, count, now_ms)
        self._db.execute(sql.PUT_IDEMPOTENCY_KEY, row)
        expired = (now_ms - self._idempotency_window_ms, IDEMPOTENCY_PRUNE_BATCH)
        self._db.execute(sql.PRUNE_IDEMPOTENCY_KEYS, expired)

    def _check_length(self, state: QueueState, adding: int) -> None:
        """ResourceExhausted, nothing added, past the queue's max_length."""
        limit = state.settings.max_length
        if limit and state.ready + state.delayed + adding > limit:
            name = self._index.queue_names[state.id]
            raise errors.ResourceExhausted(
                f"queue {name!r} holds {state.ready} ready and {state.delayed} delayed "
                f"messages; its max_length is {limit}"
            )

    def _add(
        self, state: QueueState, first: int, payloads: list[str], delay_ms: int | None
    ) -> None:
        """Stage the adds, ready at once or, delayed, in the `delayed` table."""
        if not payloads:
            return
        name = self._index.queue_names[state.id]
        delay = state.settings.delay_ms if delay_ms is None else delay_ms
        now = self._batch.now_ms
        if delay > 0:
            self._moves().add_delayed(state, first, payloads, now + delay)
            return
        self._batch.append(state, first, payloads)
        state.ready += len(payloads)
        self._batch.touched.add(name)
        self._batch.now_ready.add(name)
        if state.settings.max_age_ms:
            self._index.schedule_age_check(state, now + state.settings.max_age_ms)

    async def claim(
        self,
        name: str,
        session_id: int,
        limit: int,
        max_bytes: int,
        lease_ms: int | None = None,
    ) -> list[Delivery]:
        published = self._published.get(name)
        if published is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        if published.ready == 0 and self._writer.healthy:
            return []

        def run() -> list[Delivery]:
            return self._claim(name, session_id, limit, max_bytes, lease_ms)

        return await self._submit(run, CLAIMS)

    async def ack(self, session_id: int, message_ids: Sequence[int], done: bool) -> list[Code]:
        return await self._submit(lambda: self._ack(session_id, message_ids, done), CLAIMS)

    async def extend_leases(
        self, session_id: int, message_ids: Sequence[int], lease_ms: int
    ) -> list[LeaseOutcome]:
        def run() -> list[LeaseOutcome]:
            if lease_ms == 0:
                codes = self._ack(session_id, message_ids, False, lifecycle.CAUSE_EXTEND_TO_ZERO)
                return [LeaseOutcome(code, 0) for code in codes]
            deadline = self._now_ms() + lease_ms
            held = [
                m for m in dict.fromkeys(message_ids) if self._in_flight.holder(m) == session_id
            ]
            self._in_flight.extend(held, deadline)
            mine = set(held)
            return [
                LeaseOutcome(Code.OK, deadline)
                if m in mine
                else LeaseOutcome(self._not_held(session_id, m), 0)
                for m in message_ids
            ]

        return await self._submit(run)

    async def ack_and_claim(
        self,
        session_id: int,
        message_ids: Sequence[int],
        done: bool,
        name: str,
        limit: int,
        max_bytes: int,
        lease_ms: int | None = None,
    ) -> tuple[list[Code], list[Delivery]]:
        def run() -> tuple[list[Code], list[Delivery]]:
            found = self._ack(session_id, message_ids, done)
            claimed = self._claim(name, session_id, limit, max_bytes, lease_ms) if limit else []
            return found, claimed

        return await self._submit(run, CLAIMS)

    def _claim(
        self, name: str, session_id: int, limit: int, max_bytes: int, lease_ms: int | None
    ) -> list[Delivery]:
        """Stage a claim; its list is filled before the commit (staging.resolve_claims)."""
        state = self._queue(name)
        if state.ready == 0:
            return []
        lease = state.settings.ack_deadline_ms if lease_ms is None else lease_ms
        return self._batch.claim(state, session_id, limit, max_bytes, lease).deliveries

    def _ack(
        self,
        session_id: int,
        message_ids: Sequence[int],
        done: bool,
        cause: str = lifecycle.CAUSE_ACK_ERROR,
    ) -> list[Code]:
        found = self._in_flight.drop(session_id, message_ids)
        finished: dict[int, list[int]] = {}
        for message_id, queue_id in zip(message_ids, found, strict=True):
            if queue_id is not None:
                finished.setdefault(queue_id, []).append(message_id)
        for queue_id, ids in finished.items():
            if done:
                self._delete_messages(queue_id, ids)
                self._batch.touched.add(self._index.queue_names[queue_id])
            else:
                self._release(queue_id, ids, cause, backoff=cause == lifecycle.CAUSE_ACK_ERROR)
        return [
            Code.OK if queue_id is not None else self._not_held(session_id, message_id)
            for message_id, queue_id in zip(message_ids, found, strict=True)
        ]

    def _not_held(self, session_id: int, message_id: int) -> Code:
        """Why the session cannot act on a message it does not hold."""
        if self._in_flight.expired_holder(message_id) == session_id:
            return Code.LEASE_EXPIRED
        return Code.MESSAGE_NOT_FOUND

    def _delete_messages(self, queue_id: int, message_ids: list[int]) -> None:
        self._batch.deletes.setdefault(queue_id, []).extend(message_ids)
        self._in_flight.forget(message_ids)
        if self._index.next_message_id - 1 in message_ids:
            self._batch.deleted_newest = True

    async def release_session(self, session_id: int) -> None:
        def run() -> None:
            by_queue: dict[int, list[int]] = {}
            for message_id, queue_id in self._in_flight.drop_session(session_id):
                by_queue.setdefault(queue_id, []).append(message_id)
            for queue_id, ids in by_queue.items():
                self._release(queue_id, ids, lifecycle.CAUSE_SESSION_END, backoff=False)

        await self._submit(run, ends_session=session_id)

    def _release(self, queue_id: int, message_ids: list[int], cause: str, backoff: bool) -> None:
        """Messages no longer in flight and not done (sqlite_due.Moves.release). Without
        max_deliveries or a backoff to apply, this writes nothing (the common case)."""
        state = self._index.queues[self._index.queue_names[queue_id]]
        settings = state.settings
        moves = self._moves()
        if settings.max_deliveries or (backoff and settings.retry.initial_delay_ms):
            # Rows are read and moved: the transaction must be open, and claims staged
            # before this release resolved first (they must not take these rows).
            self.before_unstaged()
        moves.release(queue_id, message_ids, cause, backoff)

    async def run_due(self) -> None:
        def run() -> None:
            self._armed_for = -1  # re-armed after this commit, whatever it did
            moves = self._moves()
            expired: dict[int, list[int]] = {}
            for message_id, _, queue_id in self._in_flight.expired(moves.now_ms):
                expired.setdefault(queue_id, []).append(message_id)
            for queue_id, ids in expired.items():
                moves.release(queue_id, ids, lifecycle.CAUSE_LEASE_EXPIRY, backoff=False)
            moves.come_due()
            moves.age_out()

        await self._submit(run)

    async def purge(self, name: str) -> int:
        return await self._submit(lambda: self._moves().purge(self._queue(name)))

    async def redrive(
        self, name: str, message_ids: Sequence[int] | None, may_write: Callable[[str], bool]
    ) -> tuple[int, list[tuple[int, Code]]]:
        def run() -> tuple[int, list[tuple[int, Code]]]:
            return self._moves().redrive(self._queue(name), message_ids, may_write)

        return await self._submit(run)

    async def dead_letters(
        self, name: str, after_id: int, limit: int, max_bytes: int
    ) -> list[DeadLetter]:
        def run() -> list[DeadLetter]:
            state = self._queue(name)
            rows = self._db.execute(state.sql.dead_letters, (state.id, after_id, limit))
            letters: list[DeadLetter] = []
            total = 0
            for row in rows:
                total += utf8_size(row[6])
                if letters and total > max_bytes:
                    break
                letters.append(DeadLetter(*row))
            return letters

        return await self._submit(run)

    async def queue_info(self, name: str) -> QueueInfo:
        def run() -> QueueInfo:
            state = self._queue(name)
            (dead_lettered,) = self._db.execute(sql.DEAD_LETTERED_FROM, (name,)).fetchone()
            return QueueInfo(
                settings=state.settings,
                counts=self._counts(state),
                dead_lettered=dead_lettered,
                dead_letters_held=state.dead_letters,
                oldest_ready_enqueued_at_ms=oldest_ready(self._db, state),
                holding_sessions=self._in_flight.sessions_in(state.id),
            )

        return await self._submit(run)

    async def messages_held(self, session_ids: Sequence[int]) -> dict[int, int]:
        # Read in place (len and get are atomic under the GIL): a heartbeat neither waits
        # for a commit nor fails with the disk. A claim being committed may count already.
        return self._in_flight.held_by(session_ids)

    async def queue_counts(self, name: str) -> QueueCounts:
        if not self._writer.healthy:
            await self._submit(lambda: None)  # raises Unavailable unless it recovered
        counts = self._published.get(name)
        if counts is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return counts

    def published_counts(self) -> dict[str, QueueCounts] | None:
        # dict() copies in one step under the GIL, whatever the event loop does meanwhile.
        return dict(self._published)

    def set_commit_observer(self, observer: Callable[[int, float], None]) -> None:
        self._writer.commit_observer = observer

    def ready_hint(self, name: str) -> int:
        counts = self._published.get(name)
        # An unknown queue (destroyed, say, while a waiter claimed): 1, so that a waiter
        # parking on it claims at once and learns QueueNotFound instead of waiting on.
        return counts.ready if counts else 1

    # Maps -------------------------------------------------------------------------------

    async def map_put(self, name: str, pairs: Sequence[tuple[str, str]], room: Room) -> bool:
        def run() -> bool:
            index = self._index
            map_id = index.maps.get(name)
            if created := map_id is None:
                owner = room.user
                room.check(len(index.maps), index.owned_maps[owner] if owner else 0)
                map_id = self._db.execute(sql.INSERT_MAP, (name, owner)).lastrowid
                assert map_id is not None
                index.map_owners[name] = owner
                if owner:
                    index.owned_maps[owner] += 1
            self._db.executemany(sql.PUT_ENTRY, [(map_id, k, v) for k, v in pairs])
            index.maps[name] = map_id
            return created

        return await self._submit(run, grows=True)

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
                total += key_value_size(utf8_size(key), utf8_size(value))
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
                total += key_value_size(utf8_size(key), utf8_size(value))
                if page and total > max_bytes:
                    break
                page.append((key, value))
            return page

        return await self._read(run)

    async def map_page_after(
        self, name: str, start_after: str | None, size: int, max_bytes: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        def run(conn: sqlite3.Connection) -> tuple[list[tuple[str, str]], str | None]:
            page: list[tuple[str, str]] = []
            total = 0
            more = False
            # One row past the page says whether another page follows.
            args = (_committed_map(conn, name), start_after, start_after, size + 1)
            for key, value in conn.execute(sql.PAGE_ENTRIES_AFTER, args):
                total += key_value_size(utf8_size(key), utf8_size(value))
                if len(page) == size or (page and total > max_bytes):
                    more = True
                    break
                page.append((key, value))
            return page, page[-1][0] if more else None

        return await self._read(run)

    async def map_destroy(self, name: str) -> None:
        def run() -> None:
            map_id = self._map(name)
            self._db.execute(sql.DELETE_MAP_ENTRIES, (map_id,))
            self._db.execute(sql.DELETE_MAP, (map_id,))
            del self._index.maps[name]
            disown(self._index.owned_maps, self._index.map_owners.pop(name, None))

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

    # The writer's hooks (sqlite_writer.WriterHooks), on the writer thread ---------------

    def opened(self) -> None:
        self.reload()
        given_back = sum(len(state.given_back) for state in self._index.queues.values())
        if given_back:
            log.info("%d messages delivered before the restart are ready again", given_back)

    def begin_batch(self) -> None:
        self._batch = Batch(self._now_ms())

    def before_unstaged(self) -> None:
        staging.begin(self._db)
        staging.resolve_claims(self._db, self._batch, self._index, self._in_flight)

    def before_commit(self) -> None:
        staging.write_staged(self._db, self._batch, self._index, self._in_flight)

    def reload(self) -> None:
        self._index = load_index(self._db, self._in_flight)
        self._published = {}
        self._publish(self._index.queues.keys())
        self._armed_for = -1

    def committed(self) -> set[str]:
        self._publish(self._batch.touched)
        due = self._next_due()
        if due != self._armed_for:
            self._armed_for = due
            loop = self._writer.loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop
                    loop.call_soon_threadsafe(self._arm, due)
        return self._batch.now_ready

    # The timer, on the event loop ------------------------------------------------------

    def _next_due(self) -> int:
        """The earliest time something falls due (ms); 0 for nothing (writer thread)."""
        dues = (
            self._in_flight.next_deadline(),
            self._index.next_delayed_ms,
            self._index.next_age_check(),
        )
        return min((due for due in dues if due), default=0)

    def _arm(self, due_ms: int) -> None:
        """(Re-)arm the one timer for `due_ms`; none for 0."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due_ms and self._timed and not self._writer.closed:
            # A millisecond late rather than early: run_due then finds it due.
            delay = max(0.0, (due_ms + 1) / 1000 - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._writer.closed or (self._due_task is not None and not self._due_task.done()):
            return
        self._due_task = asyncio.ensure_future(self._run_due_from_timer())

    async def _run_due_from_timer(self) -> None:
        try:
            await self.run_due()
        except errors.Unavailable:
            # Failing commits: try again later (a recovered store re-arms at its next commit).
            if not self._writer.closed:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(PROBE_INTERVAL_S * 2, self._fire)
        except Exception:
            log.exception("running what fell due failed")

    def ready_queues(self) -> set[str]:
        return {name for name, state in self._index.queues.items() if state.ready}

    # Helpers ----------------------------------------------------------------------------

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._readers.read(run)

    def _submit(
        self,
        run: Callable[[], T],
        stage: str = "",
        ends_session: int | None = None,
        grows: bool = False,
    ) -> asyncio.Future[T]:
        return self._writer.submit(run, stage, ends_session, grows)

    @property
    def _db(self) -> sqlite3.Connection:
        return self._writer.db

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _moves(self) -> Moves:
        """Lifecycle moves in the current transaction (writer thread)."""
        return Moves(self._db, self._index, self._batch, self._in_flight, self._batch.now_ms)

    def _counts(self, state: QueueState) -> QueueCounts:
        return QueueCounts(state.ready, self._in_flight.count(state.id), state.delayed)

    def _queue(self, name: str) -> QueueState:
        state = self._index.queues.get(name)
        if state is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return state

    def _map(self, name: str) -> int:
        map_id = self._index.maps.get(name)
        if map_id is None:
            raise errors.MapNotFound(f"map {name!r} does not exist")
        return map_id

    def _publish(self, names: Iterable[str]) -> None:
        for name in names:
            state = self._index.queues.get(name)
            if state is None:
                self._published.pop(name, None)
            else:
                self._published[name] = QueueCounts(
                    state.ready,
                    self._in_flight.count(state.id),
                    state.delayed,
                    state.dead_letters,
                    oldest_ready(self._db, state),
                )


def _committed_map(conn: sqlite3.Connection, name: str) -> int:
    """The map's id as committed (the writer's index also holds what is not yet)."""
    row = conn.execute(sql.MAP_ID, (name,)).fetchone()
    if row is None:
        raise errors.MapNotFound(f"map {name!r} does not exist")
    return int(row[0])


def _map_names_after(start_after: str, limit: int) -> Callable[[sqlite3.Connection], list[str]]:
    """A read of up to `limit` map names after `start_after`, in UTF-8 byte order."""

    def run(conn: sqlite3.Connection) -> list[str]:
        return [name for (name,) in conn.execute(sql.MAP_NAMES_AFTER, (start_after, limit))]

    return run
