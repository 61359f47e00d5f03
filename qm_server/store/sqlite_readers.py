"""The reader connections of the SQLite store: map and user reads, off the writer.

Map and user reads do not go through the writer: they run in reader threads, each with a
read-only connection of its own, and see only committed state (WAL gives each read
transaction a snapshot), so a read of many MiB neither waits behind writes nor delays a
commit. The engine bounds the bytes that reads in progress hold; a read stops where its
answer's byte budget is spent (the map reads in sqlite.py).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from qm_server import errors
from qm_server.store import sqlite_sql as sql
from qm_server.store.sqlite_file import is_corruption
from qm_server.store.sqlite_writer import Writer

T = TypeVar("T")
# Threads for map and user reads. Each has its own read-only connection: in WAL mode
# readers see the last commit and neither wait for the writer nor hold it up, so a read
# of tens of MiB no longer sits in the writer's queue ahead of every Add. One core is left
# to the event loop and the writer: measured on 2 cores (add_beside_big_reads), two
# readers doubled Add's p50 beside four big readers where one left it unchanged, for
# about the same bytes read. The engine bounds the bytes that reads in progress hold.
READER_THREADS = max(1, min(2, (os.cpu_count() or 1) - 1))


class Readers:
    """A pool of threads, each with a read-only connection, opened at its first read."""

    def __init__(self, writer: Writer) -> None:
        # The writer: whether the store is closed or healthy, and who acts on damage.
        self._writer = writer
        self._pool = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="qm-sqlite-reader")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on a reader connection, off the event loop and off the writer."""
        if self._writer.closed:
            raise errors.Unavailable("the store is closed")
        await self._writer.ensure_healthy()  # raises Unavailable unless it recovered
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(self._pool, self._read_in_reader, run)
        except RuntimeError:  # the readers shut down (close) since the check above
            raise errors.Unavailable("the store is closed") from None
        try:
            return await pending
        except sqlite3.Error as exc:
            if is_corruption(exc):  # the writer's to act on: unhealthy until a restart
                await self._writer.report_damage(exc)
            raise errors.Unavailable(f"the store could not read: {exc}") from exc

    async def close(self) -> None:
        """Let the reads under way finish, then close every reader connection."""
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    def _read_in_reader(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """One read transaction: a snapshot of what was committed when it began."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _open_reader(self._writer.path)
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
        conn.execute(sql.BEGIN_READ)
        try:
            return run(conn)
        finally:
            conn.execute(sql.ROLLBACK)  # it wrote nothing; this ends the snapshot


def _open_reader(path: Path) -> sqlite3.Connection:
    """A connection that only reads (the file is already in WAL mode, and migrated)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in sql.READER_PRAGMAS:
        conn.execute(pragma)
    return conn
