"""The writer thread of the SQLite store: group commit, failures, recovery and health.

Why one writer thread: SQLite allows one writer at a time anyway, and a single thread that
takes every queued operation, runs them in one transaction and commits once (group
commit) turns N concurrent callers into one fsync. Callers on the event loop await a
future that is resolved only after the COMMIT returned, so nothing answers OK before it
is durable.

The writer knows transactions, not queues or maps: what an operation does, and what is
staged to be written before the commit, the store tells it through WriterHooks.

When a commit fails, nothing of its transaction answered OK: the writer rolls it back,
answers its operations UNAVAILABLE and turns unhealthy (the health listener hears it). A
full disk (reserve.py) refuses only what needs more room; a damaged file refuses
everything until a restart; any other failure is probed with a real write every
PROBE_INTERVAL_S until it commits again.

This store never raises errors.OutcomeUnknown (a commit that may or may not have
happened, which the PostgreSQL store raises when its connection breaks during a COMMIT:
pg_outcome.py). Here the COMMIT is a call into SQLite in this process that returns or
raises; there is no connection to lose between the commit and its answer. The server
itself may die after a commit and before its answer, but then no answer comes at all and
the client sees the transport fail, which it treats as an unknown outcome already.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from qm_server import errors
from qm_server.fsutil import fsync_dir
from qm_server.store import sqlite_sql as sql
from qm_server.store.base import HealthListener
from qm_server.store.inflight import InFlight
from qm_server.store.reserve import DiskReserve
from qm_server.store.sqlite_file import connect, is_corruption

log = logging.getLogger(__name__)

T = TypeVar("T")
# How many queued operations one transaction takes at most: bounds commit latency.
MAX_BATCH_OPS = 1024
# While unhealthy, the writer probes the file this often to notice the fault is gone.
PROBE_INTERVAL_S = 0.5
# On a full disk (reserve.py), what operations that need more room are told.
DISK_FULL = (
    "the disk is full: adds, puts and new queues are refused until space is freed "
    "(acks, DestroyQueue, MapRemove and MapDestroy still work)"
)

ADDS = "adds"
CLAIMS = "claims"

Outcome = tuple[asyncio.Future[Any], bool, Any]


@dataclass(slots=True)
class Op:
    run: Callable[[], Any]
    future: asyncio.Future[Any]
    # What the operation may run beside staged work (sqlite_staging.Batch): ADDS only
    # stages rows; CLAIMS stages claims or changes only what is in flight; any other
    # operation needs the staged rows written and the staged claims resolved first.
    stage: str = ""
    # The session that release_session ends: done even if the transaction fails (_refuse).
    ends_session: int | None = None
    # Needs more disk space (adds, puts, new queues, users): refused on a full disk, where
    # everything else still runs (reserve.py).
    grows: bool = False


class WriterHooks(Protocol):
    """What the store does at each step of a transaction, on the writer thread."""

    def opened(self) -> None:
        """The file is open and migrated: build what is kept in memory."""

    def begin_batch(self) -> None:
        """A new transaction starts: nothing staged yet."""

    def before_unstaged(self) -> None:
        """An operation that is not only staged comes: open the transaction and write
        what it may read."""

    def before_commit(self) -> None:
        """Write everything staged."""

    def reload(self) -> None:
        """Rebuild what is kept in memory from the committed file (its transaction
        failed; the in-flight journal was already rolled back)."""

    def committed(self) -> set[str]:
        """Publish the transaction's effects; the queues it made ready."""

    def ready_queues(self) -> set[str]:
        """Every queue holding ready messages."""


class Writer:
    """The thread that owns the write connection; operations come in through `submit`."""

    def __init__(
        self,
        path: Path,
        synchronous: str,
        check_s: float,
        reserve: DiskReserve,
        in_flight: InFlight,
        hooks: WriterHooks,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._check_s = check_s
        self._reserve = reserve
        self._in_flight = in_flight
        self._hooks = hooks
        self._inbox: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None
        self.healthy = True
        # While unhealthy: the disk is full (growing operations refused, others run), and
        # the index must be rebuilt before the others run (a transaction failed).
        self._disk_full = False
        self._index_stale = False
        # SQLite found the file corrupt: unhealthy until a restart (which checks it).
        self._damaged = False
        self.unhealthy_reason = ""
        self._next_probe = 0.0
        # Set by the store's close: every operation from then on is refused.
        self.closed = False
        # Transactions of queued operations committed: with group commit, fewer than the
        # operations (tests/test_store_batching.py counts them). Written by the writer only.
        self.commits = 0
        self.health_listener: HealthListener = lambda healthy: None
        self.ready_listener: Callable[[str], None] = lambda name: None
        # (operations, seconds) after each commit, on this thread (metrics).
        self.commit_observer: Callable[[int, float], None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the store was opened on (None before)."""
        return self._loop

    @property
    def db(self) -> sqlite3.Connection:
        """The write connection: used on the writer thread only."""
        assert self._conn is not None
        return self._conn

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        created = not self.path.exists()
        self._thread = threading.Thread(target=self._loop_forever, name="qm-sqlite-writer")
        self._thread.daemon = True
        self._thread.start()
        await self.submit(self._open_in_writer)
        if created:
            fsync_dir(self.path.parent)

    def _open_in_writer(self) -> None:
        self._conn = connect(self.path, check_s=self._check_s)
        for pragma in sql.writer_pragmas(self._synchronous):
            self._conn.execute(pragma)
        stat = os.stat(self.path)
        self._file_id = (stat.st_dev, stat.st_ino)
        self._hooks.opened()
        if not self._reserve.make():
            self._enter_disk_full("no room for the disk reserve at start")

    async def stop(self) -> None:
        """Finish the operations queued, then close the write connection (set `closed`
        first). It closes last: the last close checkpoints the write-ahead log into the
        database and removes it, which a query-only reader does not."""
        self._inbox.put(None)
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    def submit(
        self,
        run: Callable[[], T],
        stage: str = "",
        ends_session: int | None = None,
        grows: bool = False,
    ) -> asyncio.Future[T]:
        """Queue `run` for the writer; its future resolves once its transaction committed."""
        if self.closed:
            raise errors.Unavailable("the store is closed")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._inbox.put(Op(run, future, stage, ends_session, grows or stage == ADDS))
        return future

    async def ensure_healthy(self) -> None:
        """Raise Unavailable unless the store is healthy or recovers now."""
        if not self.healthy:
            await self.submit(lambda: None)

    async def report_damage(self, found: sqlite3.Error) -> None:
        """Damage a reader met is the writer's to act on (unhealthy until a restart): an
        operation that raises it goes through the writer's own failure path."""

        def fail() -> None:
            raise found

        with contextlib.suppress(errors.Unavailable):
            await self.submit(fail)

    # The thread -------------------------------------------------------------------------

    def _loop_forever(self) -> None:
        while True:
            try:
                first = self._inbox.get(timeout=None if self.healthy else PROBE_INTERVAL_S)
            except queue.Empty:
                self._recover()
                continue
            batch: list[Op] = []
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

    def _run_batch(self, batch: list[Op]) -> None:
        if self._conn is None:  # the open itself
            self._settle([(op.future, *_call(op.run)) for op in batch])
            return
        if not self.healthy and not self._recover():
            if not self._disk_full:
                failure = f"the store cannot commit ({self.unhealthy_reason}); see the server log"
                self._refuse(batch, errors.Unavailable(failure))
                return
            batch = self._refuse_growth(batch)
            if not batch:
                return
        hooks = self._hooks
        hooks.begin_batch()
        outcomes: list[Outcome] = []
        try:
            self._check_file()
            if self._index_stale:  # a transaction failed since the disk filled
                hooks.reload()
                self._index_stale = False
            for op in batch:
                if not op.stage:
                    hooks.before_unstaged()
                ok, value = _call(op.run)
                if not ok and not isinstance(value, errors.QmError):
                    if isinstance(value, sqlite3.Error | OSError):
                        raise value
                    # A bug in one operation, which may have written part of its effect
                    # (domain errors are raised before any write, so they need no undo):
                    # undo the transaction and run each operation alone. Staged work alone
                    # has opened none yet (sqlite_staging.write_staged), and ROLLBACK
                    # would then fail.
                    if self.db.in_transaction:
                        self.db.execute(sql.ROLLBACK)
                    self._in_flight.rollback()
                    hooks.reload()
                    if len(batch) == 1:
                        self._settle([(op.future, False, value)])
                    else:
                        for single in batch:
                            self._run_batch([single])
                    return
                outcomes.append((op.future, ok, value))
            hooks.before_commit()
            started = time.perf_counter()
            if self.db.in_transaction:
                self.db.execute(sql.COMMIT)  # the fsync, in durability full
            self._in_flight.commit()
            self.commits += 1
            if self.commit_observer is not None:
                self.commit_observer(len(batch), time.perf_counter() - started)
        except Exception as exc:  # the whole transaction is lost: nothing answered OK
            self._fail(exc)
            self._refuse(batch, errors.Unavailable(f"the store could not commit: {exc}"))
            return
        self._settle(outcomes, hooks.committed())

    def _check_file(self) -> None:
        """A removed or replaced database file would swallow commits silently."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise errors.Unavailable(f"database file {self.path} was removed") from None
        if (stat.st_dev, stat.st_ino) != self._file_id:
            raise errors.Unavailable(f"database file {self.path} was replaced")

    # Failure and recovery ---------------------------------------------------------------

    def _refuse(self, batch: list[Op], failure: errors.Unavailable) -> None:
        """Answer the operations of a transaction that did not commit with `failure`,
        except a session's release, which is done all the same: it writes nothing to disk,
        and its caller has forgotten the session, so nobody would ever release those
        messages again; they stayed in flight, unseen, until a restart. Its in-flight
        change needs no undo (the journal was rolled back first), and the index, stale
        until the store recovers, is rebuilt from the in-flight map then (_recover)."""
        outcomes: list[Outcome] = []
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
        if self.db.in_transaction:
            try:
                self.db.execute(sql.ROLLBACK)
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
                f"the database {self.path} is damaged ({exc}): stop the server and run "
                f"`qm-server check --data-dir {self.path.parent}`"
            )
            log.error("%s; answering UNAVAILABLE until then", reason)
            self._set_unhealthy(reason)
        elif self.healthy or self._disk_full:
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
            self.path.parent,
            cause,
            f"; released the reserve {self._reserve.path}" if released else "",
            self._reserve.size,
        )
        self._set_unhealthy(f"{DISK_FULL} on {self.path.parent}")
        self._disk_full = True

    def _set_unhealthy(self, reason: str) -> None:
        self.healthy = False
        self._disk_full = False
        self.unhealthy_reason = reason
        self._notify_health(False)  # a new reason, even if it was unhealthy already

    def _refuse_growth(self, batch: list[Op]) -> list[Op]:
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
            self.db.execute(sql.BEGIN)
            self.db.execute(sql.TOUCH_PROBE)
            self.db.execute(sql.COMMIT)
            self._hooks.reload()
        except Exception as exc:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute(sql.ROLLBACK)
            log.debug("store still failing: %s", exc)
            return False
        log.warning("store recovered; serving again")
        self.healthy = True
        self._disk_full = False
        self._index_stale = False
        self.unhealthy_reason = ""
        self._notify_health(True)
        # Messages made ready while the store failed (sessions released by _refuse) had
        # no wake-up: waiters parked on their queues would wait on.
        self._settle([], self._hooks.ready_queues())
        return True

    # Answers, on the event loop ---------------------------------------------------------

    def _settle(self, outcomes: list[Outcome], now_ready: set[str] | None = None) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._loop.call_soon_threadsafe(self._settle_on_loop, outcomes, now_ready or set())

    def _settle_on_loop(self, outcomes: list[Outcome], now_ready: set[str]) -> None:
        for future, ok, value in outcomes:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for name in now_ready:
            self.ready_listener(name)

    def _notify_health(self, healthy: bool) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.health_listener, healthy)


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
