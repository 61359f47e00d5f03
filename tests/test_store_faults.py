"""Store failures answer UNAVAILABLE, turn health NOT_SERVING, and lose nothing committed.

The data directory sits on a small tmpfs mounted by the test (the tests run as root), so
that the disk really fills up under the running server. A read-only remount cannot be
forced while the server holds its files open for writing, so read-only is made with
`chattr +i`, which refuses writes through open descriptors too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_store_batching import submits_counted
from test_subscribe import Stream

from conftest import TEST_DISK_RESERVE_BYTES, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import errors
from qm_server.quotas import Room
from qm_server.store.sqlite import ADDS, SqliteStore

Stub = pb_grpc.QueueManagerServiceStub
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


class HealthWatch:
    """Follows the server's health stream, so tests wait for events, not for time."""

    def __init__(self, channel: grpc.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

    def wait_for(self, status: int) -> None:
        for reply in self._stream:
            if reply.status == status:
                return
        raise AssertionError("health stream ended")

    def close(self) -> None:
        self._stream.cancel()


def fill(path: Path) -> None:
    """Write until the file system is full.

    Unbuffered: a buffered file could still hold part of a block when the disk filled, and
    closing it would then raise ENOSPC out of the `with`.
    """
    with path.open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass


def add_until_unavailable(stub: Stub, token: str, committed: list[int]) -> pb.AddResponse:
    for _ in range(500):
        reply = stub.Add(pb.AddRequest(token=token, queue_name="q", element="x" * 50_000))
        if reply.code != pb.CODE_OK:
            return reply
        committed.append(reply.message_id)
    raise AssertionError("the disk never filled up")


@contextlib.contextmanager
def queue_q(handle: ServerHandle) -> Iterator[tuple[Stub, HealthWatch, str]]:
    """A channel to a serving server, its health stream, a session, and queue "q"."""
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        watch = HealthWatch(channel)
        watch.wait_for(SERVING)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        try:
            yield stub, watch, token
        finally:
            watch.close()


def test_full_disk(make_server: Callable[..., ServerHandle], small_disk: Path) -> None:
    handle = make_server(data_dir=small_disk / "data")
    with queue_q(handle) as (stub, watch, token):
        committed: list[int] = []
        fill(small_disk / "filler")
        failed = add_until_unavailable(stub, token, committed)
        assert failed.code == pb.CODE_UNAVAILABLE
        assert "could not commit" in failed.message or "cannot commit" in failed.message
        watch.wait_for(NOT_SERVING)
        map_put = stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v"))
        assert map_put.code == pb.CODE_UNAVAILABLE
        (small_disk / "filler").unlink()
        watch.wait_for(SERVING)
        after = stub.Add(pb.AddRequest(token=token, queue_name="q", element="after"))
        assert after.code == pb.CODE_OK
        committed.append(after.message_id)
    handle.stop()
    assert_all_present(make_server(data_dir=small_disk / "data"), committed)


def not_serving_reason(channel: grpc.Channel) -> str:
    """Health's Check, which must say NOT_SERVING, and the reason it gives."""
    reply, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
        health_pb2.HealthCheckRequest(service=""), timeout=10
    )
    assert reply.status == NOT_SERVING
    return str(dict(call.trailing_metadata() or ()).get("qm-not-serving-reason", ""))


def test_a_full_disk_can_still_be_drained(
    make_server: Callable[..., ServerHandle], small_disk: Path
) -> None:
    """Acks, DestroyQueue, MapRemove and MapDestroy commit on a full disk, reads answer,
    and health says why it is NOT_SERVING. Every call used to answer UNAVAILABLE until
    space was freed by hand."""
    data = small_disk / "data"
    handle = make_server(data_dir=data)
    with queue_q(handle) as (stub, watch, token):
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="gone"))
        stub.AddAll(pb.AddAllRequest(token=token, queue_name="gone", elements=["a", "b"]))
        pairs = [pb.KeyValue(key=f"k{i}", value="v") for i in range(3)]
        for name in ("m", "gone"):
            stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map=name, size=3, list=pairs))
        before = stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["x"] * 10))
        committed = list(before.message_ids)
        fill(small_disk / "filler")
        failed = add_until_unavailable(stub, token, committed)
        assert failed.code == pb.CODE_UNAVAILABLE
        watch.wait_for(NOT_SERVING)
        with grpc.insecure_channel(handle.target) as channel:
            assert "the disk is full" in not_serving_reason(channel)
        # Adds and puts are refused, saying why.
        add = stub.Add(pb.AddRequest(token=token, queue_name="q", element="more"))
        assert add.code == pb.CODE_UNAVAILABLE and "the disk is full" in add.message
        put = stub.MapPut(pb.MapPutRequest(token=token, map="m", key="new", value="v"))
        assert put.code == pb.CODE_UNAVAILABLE
        # Reads answer; consumers drain.
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == len(committed)
        got = stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k0"))
        assert (got.code, got.value) == (pb.CODE_OK, "v")
        pulled = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="q", number=5))
        assert [e.message_id for e in pulled.element_info] == committed[:5]
        acks = [
            stub.Ack(pb.AckRequest(token=token, message_id=e.message_id)).code
            for e in pulled.element_info
        ]
        assert acks == [pb.CODE_OK] * 5
        # Deletions commit.
        destroyed = stub.DestroyQueue(
            pb.DestroyQueueRequest(token=token, queue_name="gone", force=True)
        )
        assert destroyed.code == pb.CODE_OK
        removed = stub.MapRemove(pb.MapRemoveRequest(token=token, map="m", key="k0"))
        assert removed.code == pb.CODE_OK
        assert stub.MapDestroy(pb.MapDestroyRequest(token=token, map="gone")).code == pb.CODE_OK
        # Space is back: the reserve is made again and everything is served.
        (small_disk / "filler").unlink()
        watch.wait_for(SERVING)
        after = stub.Add(pb.AddRequest(token=token, queue_name="q", element="after"))
        assert after.code == pb.CODE_OK
        assert (data / "qm.reserve").stat().st_size == TEST_DISK_RESERVE_BYTES
    handle.stop()
    restarted = make_server(data_dir=data)
    assert_all_present(restarted, [*committed[5:], after.message_id])
    with grpc.insecure_channel(restarted.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", restarted.admin_password)
        gone = stub.Size(pb.SizeRequest(token=token, queue_name="gone"))
        assert gone.code == pb.CODE_QUEUE_NOT_FOUND
        assert stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m")).map == {
            "k1": "v",
            "k2": "v",
        }
        gone_map = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="gone"))
        assert gone_map.code == pb.CODE_MAP_NOT_FOUND


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make the directory and its files immutable (chattr +i): even root's writes through
    already open descriptors fail with EPERM, as on a file system remounted read-only.

    SQLite's shared-memory index (qm.db-shm) stays writable: it is mapped into memory, and
    a write fault on an immutable mapping kills the process with SIGBUS, which no
    server can answer. (A real read-only remount refuses while files are open for
    writing; this is the closest a test can come.)"""
    paths = [str(directory), *(str(p) for p in directory.iterdir() if p.suffix != ".db-shm")]
    subprocess.run(["chattr", "+i", *paths], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *paths], check=True)


def test_read_only_data_directory(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    handle = make_server(data_dir=tmp_path / "data")
    with queue_q(handle) as (stub, watch, token):
        first = stub.Add(pb.AddRequest(token=token, queue_name="q", element="before"))
        assert first.code == pb.CODE_OK
        with read_only(tmp_path / "data"):
            failed = stub.Add(pb.AddRequest(token=token, queue_name="q", element="during"))
            assert failed.code == pb.CODE_UNAVAILABLE
            watch.wait_for(NOT_SERVING)
            size = stub.Size(pb.SizeRequest(token=token, queue_name="q"))
            assert size.code == pb.CODE_UNAVAILABLE
        watch.wait_for(SERVING)
        second = stub.Add(pb.AddRequest(token=token, queue_name="q", element="after"))
        assert second.code == pb.CODE_OK
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 2
    handle.stop()
    assert_all_present(
        make_server(data_dir=tmp_path / "data"), [first.message_id, second.message_id]
    )


def test_failed_commits_leave_deliveries_as_committed(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """A claim or an ack whose commit failed changes nothing, in flight or on disk."""
    handle = make_server(data_dir=tmp_path / "data")
    with queue_q(handle) as (stub, watch, token):
        stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b"]))
        held = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
        assert (held.code, held.element, held.delivery_count) == (pb.CODE_OK, "a", 1)
        with read_only(tmp_path / "data"):
            claim = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
            assert claim.code == pb.CODE_UNAVAILABLE
            ack = stub.Ack(pb.AckRequest(token=token, message_id=held.message_id))
            assert ack.code == pb.CODE_UNAVAILABLE
            watch.wait_for(NOT_SERVING)
        watch.wait_for(SERVING)
        unacked = stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name="q"))
        assert unacked.ack_num == 1
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 1
        next_one = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
        assert (next_one.element, next_one.delivery_count) == ("b", 1)
        ack = stub.Ack(pb.AckRequest(token=token, message_id=held.message_id))
        assert ack.code == pb.CODE_OK
    handle.stop()
    assert_all_present(make_server(data_dir=tmp_path / "data"), [next_one.message_id])


def test_removed_database_file(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    handle = make_server(data_dir=tmp_path / "data")
    with queue_q(handle) as (stub, watch, token):
        (tmp_path / "data" / "qm.db").unlink()
        failed = stub.Add(pb.AddRequest(token=token, queue_name="q", element="lost?"))
        assert failed.code == pb.CODE_UNAVAILABLE
        assert "removed" in failed.message
        watch.wait_for(NOT_SERVING)


def assert_all_present(handle: ServerHandle, ids: list[int]) -> None:
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        found: list[int] = []
        while True:
            page = stub.PullElements(
                pb.PullElementsRequest(token=token, queue_name="q", number=1000)
            )
            if page.code != pb.CODE_OK:
                assert page.code == pb.CODE_QUEUE_EMPTY
                break
            found.extend(e.message_id for e in page.element_info)
    assert found == sorted(ids)


class FailingWrites:
    """The store's connection with writes that fail while `failing` is set (a disk that
    refuses them), put in place of the real one: reads and rollbacks still work."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.failing = False

    def _check(self, statement: str) -> None:
        if self.failing and not statement.lstrip().upper().startswith(("SELECT", "ROLLBACK")):
            raise sqlite3.OperationalError("disk I/O error (injected)")

    def execute(self, statement: str, *args: Any) -> sqlite3.Cursor:
        self._check(statement)
        return self.conn.execute(statement, *args)

    def executemany(self, statement: str, *args: Any) -> sqlite3.Cursor:
        self._check(statement)
        return self.conn.executemany(statement, *args)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def close(self) -> None:
        self.conn.close()


async def store_with_failing_writes(data_dir: Path) -> tuple[SqliteStore, FailingWrites]:
    store = SqliteStore(data_dir)
    await store.open()
    assert store._writer._conn is not None
    writes = FailingWrites(store._writer._conn)
    await store._submit(lambda: setattr(store._writer, "_conn", writes))  # on the writer thread
    return store, writes


@pytest.mark.parametrize("unhealthy_before", [False, True])
def test_a_session_ended_while_commits_fail_leaves_nothing_in_flight(
    tmp_path: Path, unhealthy_before: bool
) -> None:
    """A session's release writes nothing to disk, so a transaction that failed around it,
    or a store that could not commit at all, must not leave its messages held for a
    session that no longer exists: nobody would ever release them again."""

    async def main() -> None:
        store, writes = await store_with_failing_writes(tmp_path)
        woken: list[str] = []
        store.set_ready_listener(woken.append)
        try:
            await store.create_queue("q", Room.server_wide("queues", 10))
            await store.enqueue("q", ["a", "b"])
            [held] = await store.claim("q", 7, 1, 1 << 20)
            woken.clear()
            writes.failing = True
            if unhealthy_before:
                with pytest.raises(errors.Unavailable):
                    await store.enqueue("q", ["lost"])
            # The engine has forgotten the session by now, whatever the store answers.
            with contextlib.suppress(errors.Unavailable):
                await store.release_session(7)
            writes.failing = False
            counts = await store.queue_counts("q")  # recovers first
            assert (counts.ready, counts.in_flight) == (2, 0)
            assert "q" in woken
            again = await store.claim("q", 8, 2, 1 << 20)
            assert [(d.message_id, d.delivery_count) for d in again] == [
                (held.message_id, 2),
                (held.message_id + 1, 1),
            ]
        finally:
            await store.close()

    asyncio.run(main())


def test_an_operation_that_fails_by_a_bug_before_any_write_spares_the_others(
    tmp_path: Path,
) -> None:
    """An operation failing with an unexpected error is answered with it, and the others
    of its transaction run alone, even when only staged work (no transaction yet) came
    before it: the store stays healthy."""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        health: list[bool] = []
        store.set_health_listener(health.append)
        await store.open()
        try:
            await store.create_queue("q", Room.server_wide("queues", 10))

            def bug() -> None:
                raise RuntimeError("a bug")

            # Hold the writer in a transaction of its own, so that the next one holds
            # only staged work: the add, then the bug.
            started, release = threading.Event(), threading.Event()

            def hold() -> None:
                started.set()
                release.wait(10)

            gate = store._submit(hold)
            assert started.wait(10)
            queued = asyncio.Event()
            with submits_counted(store, 1, queued.set):
                add = asyncio.ensure_future(store.enqueue("q", ["a"]))
                await asyncio.wait_for(queued.wait(), 10)  # the add is queued
            buggy = store._submit(bug, ADDS)
            release.set()
            await gate
            assert (await add).ids == [1]
            with pytest.raises(RuntimeError, match="a bug"):
                await buggy
            assert health == []
            counts = await store.queue_counts("q")
            assert (counts.ready, counts.in_flight) == (1, 0)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_drain_while_the_store_fails_closes_streams_without_a_traceback(
    make_server: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping the server while commits fail ends each Subscribe stream, whose close
    cannot release what it holds (the store refuses the write): one warning, not an
    error with a traceback raised out of the stream's handler."""
    handle = make_server()
    server = handle.thread.server
    assert server is not None and handle.thread._loop is not None
    store = server.store
    assert isinstance(store, SqliteStore) and store._writer._conn is not None
    writes = FailingWrites(store._writer._conn)

    async def swap() -> None:
        await store._submit(lambda: setattr(store._writer, "_conn", writes))  # on the writer thread

    asyncio.run_coroutine_threadsafe(swap(), handle.thread._loop).result(10)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b"]))
        stream = Stream(stub, token, "q", max_unacked=2)
        assert len(stream.next().element_info) == 2  # the stream holds both
        writes.failing = True
        failed = stub.Add(pb.AddRequest(token=token, queue_name="q", element="lost"))
        assert failed.code == pb.CODE_UNAVAILABLE
        caplog.clear()
        handle.stop()  # the drain ends the stream; its close meets the failing store
        assert stream.next().code == pb.CODE_UNAVAILABLE
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors_logged
    assert any("could not release 2 messages" in r.getMessage() for r in caplog.records)
