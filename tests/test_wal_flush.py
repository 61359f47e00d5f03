"""The store's own WAL flush (qm_server/store/wal_flush.py) under "full" durability.

Commits run with synchronous=NORMAL and the store syncs the WAL itself before anyone is
answered, on a thread of its own while the writer goes on. These tests replace
fdatasync with one they can hold or fail, so that "no answer before the flush", "what
arrives during a flush shares the next one" and "a failed flush answers UNAVAILABLE" are
seen directly rather than inferred from timings.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from test_store_batching import run

from qm_server import errors
from qm_server.store.sqlite import SqliteStore

WAIT_S = 10.0


class HeldSync:
    """Stands in for os.fdatasync: counts calls, and can hold them or make them fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.started.set()
        if not self.release.wait(WAIT_S):
            raise AssertionError("the test never released the flush")
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EIO, "injected I/O error")

    def hold(self) -> None:
        self.started.clear()
        self.release.clear()


@pytest.fixture
def held_sync(monkeypatch: pytest.MonkeyPatch) -> HeldSync:
    fake = HeldSync()
    monkeypatch.setattr(os, "fdatasync", fake)  # wal_flush calls os.fdatasync
    return fake


async def until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S)


def test_no_answer_before_the_flush_and_later_commits_share_the_next(
    tmp_path: Path, held_sync: HeldSync
) -> None:
    async def test(store: SqliteStore) -> None:
        await store.create_queue("q", 10)
        # Hold the writer inside an operation, queue an add behind it, and hold the flush
        # of the operation's commit: the writer has more queued, so that flush goes to
        # the flusher thread.
        in_writer, leave_writer = threading.Event(), threading.Event()

        def gate() -> None:
            in_writer.set()
            leave_writer.wait(WAIT_S)

        batches: list[int] = []
        run_batch = store._run_batch

        def counted(batch: list[Any]) -> None:
            batches.append(len(batch))
            run_batch(batch)

        store._run_batch = counted  # type: ignore[method-assign]
        gated = store._submit(gate)
        await until(in_writer)
        first = asyncio.ensure_future(store.enqueue("q", ["a"]))
        await asyncio.sleep(0)
        held_sync.hold()
        calls_before = held_sync.calls
        leave_writer.set()
        await until(held_sync.started)
        # Committed but not yet on disk: neither is answered.
        later = [asyncio.ensure_future(store.enqueue("q", [e])) for e in ("b", "c")]
        await asyncio.sleep(0.05)  # a wrong answer would have time to arrive
        assert not gated.done() and not first.done()
        assert (await store.queue_counts("q")).ready == 0  # counts wait for the flush too
        held_sync.release.set()
        await gated
        assert await first == [1]
        assert [await task for task in later] == [[2], [3]]
        # One transaction and one flush for the gate, one of each for the three adds that
        # waited for that flush.
        assert batches == [1, 3]
        assert held_sync.calls - calls_before == 2
        assert (await store.queue_counts("q")).ready == 3

    run(tmp_path, test)


def test_a_failed_flush_answers_unavailable_until_a_probe_flushes_again(
    tmp_path: Path, held_sync: HeldSync
) -> None:
    health: list[bool] = []

    async def test(store: SqliteStore) -> None:
        store.set_health_listener(health.append)
        await store.create_queue("q", 10)
        held_sync.fail_next = True
        with pytest.raises(errors.Unavailable, match="could not sync its log"):
            await store.enqueue("q", ["lost?"])
        await asyncio.sleep(0)  # the health callback runs on the loop
        assert health == [False]
        # The next operation probes with a real write and flush, which now succeed.
        assert await store.enqueue("q", ["kept"]) == [2]
        await asyncio.sleep(0)
        assert health == [False, True]

    run(tmp_path, test)


def test_process_crash_durability_never_flushes_itself(tmp_path: Path, held_sync: HeldSync) -> None:
    async def test() -> None:
        store = SqliteStore(tmp_path, durability="process-crash")
        await store.open()
        try:
            await store.create_queue("q", 10)
            assert await store.enqueue("q", ["a", "b"]) == [1, 2]
        finally:
            await store.close()

    asyncio.run(test())
    assert held_sync.calls == 0
    assert os.path.exists(tmp_path / "qm.db")
