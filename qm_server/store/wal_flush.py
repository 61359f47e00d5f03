"""Makes committed transactions durable beside the writer: an fdatasync of the WAL file
that every transaction committed before it shares.

Why not `synchronous=FULL`: FULL syncs inside `COMMIT`, so the store's single writer
thread sat in fdatasync (about half its time under load, BENCHMARKS.md) while the next
callers queued behind it. In WAL mode `synchronous=NORMAL` is already consistent: SQLite
syncs the WAL before each checkpoint, the database after it, and the WAL header when the
file is reused. All NORMAL gives up is that the newest commits may still be only in the
page cache. An fdatasync of the WAL file after a commit, and before its callers hear of
it, puts them on disk: the same promise as FULL, while the writer runs the next
transaction. Linux syncs a file, not a descriptor, so our own descriptor of the WAL file
flushes what SQLite wrote through its own.

Order: flushes run one at a time, in the order they were asked for, and each runs its
callback after its fdatasync returned; the writer flushes inline only while nothing is
pending here (`idle`), so callers are answered in commit order either way.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

Done = Callable[[OSError | None], None]
"""Called once the flush that covers a commit returned: None, or what fdatasync raised."""


class WalFlusher:
    def __init__(self, wal_path: Path, on_idle: Callable[[], None]) -> None:
        """on_idle runs on the flusher's thread each time the last flush asked for is done."""
        self._on_idle = on_idle
        # The WAL exists once the database is open in WAL mode, and SQLite keeps that file
        # while any connection is open (it removes it only when the last one closes).
        self._fd = os.open(wal_path, os.O_RDONLY | os.O_CLOEXEC)
        self._asks: queue.SimpleQueue[Done | None] = queue.SimpleQueue()
        self._pending = 0  # asked for and not yet called back; changed under _lock
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="qm-wal-flush", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing asked for is still waiting: an inline flush keeps commit order."""
        return self._pending == 0

    def flush(self) -> OSError | None:
        """On the caller's thread: for a lone commit, the hand-off would cost more than it
        saves."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            return exc
        return None

    def flush_later(self, done: Done) -> None:
        with self._lock:
            self._pending += 1
        self._asks.put(done)

    def drain(self) -> None:
        """Wait until every flush asked for has called back (before the writer republishes
        its whole state, so that no older callback lands after it)."""
        with self._drained:
            self._drained.wait_for(lambda: self._pending == 0)

    def close(self) -> None:
        """Runs what was asked for, then stops."""
        self._asks.put(None)
        self._thread.join()
        os.close(self._fd)

    def _run(self) -> None:
        while True:
            first = self._asks.get()
            if first is None:
                return
            waiting = [first]
            stop = False
            while True:  # one fdatasync covers every commit asked for before it
                try:
                    more = self._asks.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                waiting.append(more)
            error = self.flush()
            if error is not None:
                log.error("fdatasync of the WAL failed: %s", error)
            for done in waiting:
                try:
                    done(error)
                except Exception:  # one bad callback must not strand the others
                    log.exception("a flush callback failed")
            with self._drained:
                self._pending -= len(waiting)
                idle = self._pending == 0
                self._drained.notify_all()
            if idle:
                self._on_idle()
            if stop:
                return
