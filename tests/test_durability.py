"""Nothing answers OK before it is fsynced: the promise checked where it can fail.

A `kill -9` keeps the page cache, so the crash tests pass with `synchronous=NORMAL` or
with a missing fsync. Here a default `qm-server` runs under strace (tests/fs_trace.py),
and the tests read from the trace

- that each write call's answer left only after the WAL frames of its commit were
  fdatasynced;
- that the key, the generated admin password and the data directory were written to a
  temporary file, synced, renamed and their directory synced, before the server served;
- what a power cut right after the last answer would leave: a model of the disk that
  keeps only synced data is replayed from the trace, and a server started on that image
  must hold every effect answered OK, the same key and the same admin password.

One more test reads the durability settings from the live connection of a default
in-process server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fs_trace import STRACE_ARGS, Event, PowerCut, read_trace
from google.protobuf.message import Message
from server_process import ServerProcess

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.auth import KEY_FILE
from qm_server.datadir import INITIAL_PASSWORD_FILE
from qm_server.store.sqlite import SqliteStore

Stub = pb_grpc.QueueManagerServiceStub
SERVER_ARGS = ("--rsa-bits", "2048")  # the durability settings stay the defaults


@dataclass
class Call:
    """One write call of the scenario, timed by the client's wall clock (strace's too)."""

    name: str
    t0: float
    t1: float


@dataclass
class Run:
    """A traced default server's life: its trace, the calls and what they were told."""

    disk: Path  # the directory the server's data directory was created in
    events: list[Event]
    calls: list[Call]
    last_answer: float
    fingerprint: bytes
    password: str
    ids: list[int]


def timed(calls: list[Call], method: Callable[[Any], Any], request: Message) -> Any:
    t0 = time.time()
    reply = method(request)
    name = type(request).__name__.removesuffix("Request")
    calls.append(Call(name, t0, time.time()))
    assert reply.code == pb.CODE_OK, (name, reply)
    return reply


def scenario(stub: Stub, token: str, calls: list[Call]) -> list[int]:
    """Every kind of write, one after another; returns the ids added."""
    timed(calls, stub.NewQueue, pb.NewQueueRequest(token=token, queue_name="q"))
    ids = [
        timed(
            calls, stub.Add, pb.AddRequest(token=token, queue_name="q", element=f"e{n}")
        ).message_id
        for n in range(3)
    ]
    added = timed(
        calls, stub.AddAll, pb.AddAllRequest(token=token, queue_name="q", elements=["f0", "f1"])
    )
    ids += list(added.message_ids)
    first = timed(calls, stub.Poll, pb.PollRequest(token=token, queue_name="q"))
    timed(calls, stub.Ack, pb.AckRequest(token=token, message_id=first.message_id))
    timed(calls, stub.Poll, pb.PollRequest(token=token, queue_name="q"))  # held at the cut
    timed(calls, stub.NewQueue, pb.NewQueueRequest(token=token, queue_name="gone"))
    timed(calls, stub.DestroyQueue, pb.DestroyQueueRequest(token=token, queue_name="gone"))
    timed(calls, stub.MapPut, pb.MapPutRequest(token=token, map="m", key="a", value="1"))
    pairs = [pb.KeyValue(key="b", value="2"), pb.KeyValue(key="c", value="3")]
    timed(calls, stub.MapBatchPut, pb.MapBatchPutRequest(token=token, map="m", size=2, list=pairs))
    timed(calls, stub.MapRemove, pb.MapRemoveRequest(token=token, map="m", key="c"))
    return ids


def key_of(stub: Stub) -> bytes:
    return stub.GetChallenge(pb.GetChallengeRequest(), timeout=10).public_key_pem.encode()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A default server (generated admin password) under strace, then killed."""
    if shutil.which("strace") is None:
        pytest.fail("these tests need strace (scripts/setup installs it)")
    base = tmp_path_factory.mktemp("durability")
    disk = base / "disk"
    disk.mkdir()
    trace = base / "trace"
    server = ServerProcess(
        disk / "data",
        *SERVER_ARGS,
        env={"QM_ADMIN_PASSWORD": ""},
        prefix=(*STRACE_ARGS, "-o", str(trace)),
    )
    try:
        server.start()
        password = (disk / "data" / INITIAL_PASSWORD_FILE).read_text().strip()
        calls: list[Call] = []
        with grpc.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            fingerprint = key_of(stub)
            ids = scenario(stub, login(stub, "admin", password), calls)
            last_answer = time.time()
        # The power cut: the server (strace's child, whose pid it writes in qm.lock) dies.
        os.kill(int((disk / "data" / "qm.lock").read_text()), signal.SIGKILL)
        assert server.proc is not None
        server.proc.wait(timeout=30)
    finally:
        server.stop()
    yield Run(disk, read_trace(trace), calls, last_answer, fingerprint, password, ids)


def is_sync(event: Event, path: str) -> bool:
    return event.name in ("fsync", "fdatasync") and event.path == path


def test_every_write_answers_after_its_commit_is_fsynced(traced: Run) -> None:
    """Within each call: the last WAL write ends, an fdatasync of the WAL starts and ends,
    and only then does the answer's send start (lines of the trace, in the order strace saw
    them)."""
    assert len(traced.calls) == 13
    wal = str(traced.disk / "data" / "qm.db-wal")
    for call in traced.calls:
        during = [e for e in traced.events if call.t0 <= e.started <= call.t1]
        writes = [e.line for e in during if e.name == "pwrite64" and e.path == wal]
        syncs = [(e.started_line, e.line) for e in during if is_sync(e, wal)]
        sends = [e.started_line for e in during if e.name == "sendmsg"]
        assert writes, f"{call.name} wrote nothing to the WAL"
        assert sends, f"{call.name}: no answer seen"
        assert any(max(writes) < start and end < max(sends) for start, end in syncs), (
            f"{call.name} answered before its commit was fsynced: "
            + ", ".join(f"{e.name} {Path(e.path).name}" for e in during)
        )


def find(events: list[Event], match: Callable[[Event], bool], after: int = -1) -> int:
    """The index of the first event after `after` that matches; -1 if none."""
    for n in range(after + 1, len(events)):
        if match(events[n]):
            return n
    return -1


def written_synced_renamed(events: list[Event], tmp: str, final: str) -> tuple[int, int, int]:
    """Where `tmp` was written, then synced, then renamed to `final` (-1: not seen)."""
    written = find(events, lambda e: e.name == "write" and e.path == tmp)
    synced = find(events, lambda e: is_sync(e, tmp), written)
    renamed = find(
        events, lambda e: e.name.startswith("rename") and (e.path, e.target) == (tmp, final), synced
    )
    return written, synced, renamed


def test_the_files_the_server_creates_are_synced_before_it_serves(traced: Run) -> None:
    events, data = traced.events, str(traced.disk / "data")
    serving = find(events, lambda e: e.name == "openat" and e.path.endswith(".port.tmp"))
    assert serving > 0, "the port file (written once the server serves) is not in the trace"
    made = find(events, lambda e: e.name == "mkdir" and e.path == data)
    assert 0 <= made < find(events, lambda e: is_sync(e, str(traced.disk)), made) < serving
    for name in (KEY_FILE, INITIAL_PASSWORD_FILE):
        final = f"{data}/{name}"
        steps = written_synced_renamed(events, final + ".tmp", final)
        entry = find(events, lambda e: is_sync(e, data), steps[-1])
        assert 0 <= steps[0] < steps[1] < steps[2] < entry < serving, (name, steps, entry)
    created = find(events, lambda e: e.name == "openat" and e.path == f"{data}/qm.db")
    assert 0 <= created < find(events, lambda e: is_sync(e, data), created) < serving


def test_a_power_cut_after_the_last_answer_keeps_everything_answered_ok(
    traced: Run, tmp_path: Path
) -> None:
    cut = PowerCut(traced.disk)
    for event in traced.events:
        if event.t <= traced.last_answer:  # what had ended when the power went
            cut.apply(event)
    image = tmp_path / "image"
    # The shared-memory index is rebuilt from the WAL; the lock file holds only a pid.
    kept = cut.write_image(image, skip=("-shm", "qm.lock"))
    assert f"data/{KEY_FILE}" in kept and f"data/{INITIAL_PASSWORD_FILE}" in kept, kept
    assert (image / "data" / INITIAL_PASSWORD_FILE).read_text().strip() == traced.password
    server = ServerProcess(image / "data", *SERVER_ARGS).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            assert key_of(stub) == traced.fingerprint
            token = login(stub, "admin", traced.password)
            left = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="q", number=10))
            assert left.code == pb.CODE_OK, left.message
            # The first id was acked; the second was in flight at the cut: ready again,
            # with its delivery counted.
            assert [(e.message_id, e.element, e.delivery_count) for e in left.element_info] == [
                (traced.ids[1], "e1", 2),
                (traced.ids[2], "e2", 1),
                (traced.ids[3], "f0", 1),
                (traced.ids[4], "f1", 1),
            ]
            gone = stub.Size(pb.SizeRequest(token=token, queue_name="gone"))
            assert gone.code == pb.CODE_QUEUE_NOT_FOUND
            values = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
            assert values.code == pb.CODE_OK and dict(values.map) == {"a": "1", "b": "2"}
            added = stub.Add(pb.AddRequest(token=token, queue_name="q", element="later"))
            assert added.code == pb.CODE_OK and added.message_id > max(traced.ids)
    finally:
        server.stop()


def test_a_default_server_commits_in_wal_mode_with_synchronous_full(
    make_server: Callable[..., ServerHandle],
) -> None:
    """The settings in force on the store's own connection, read through its writer."""
    handle = make_server()
    server, loop = handle.thread.server, handle.thread._loop
    assert server is not None and loop is not None
    store = server.store
    assert isinstance(store, SqliteStore)

    def read() -> tuple[str, int]:
        conn = store._db
        return conn.execute("PRAGMA journal_mode").fetchone()[0], conn.execute(
            "PRAGMA synchronous"
        ).fetchone()[0]

    async def in_writer() -> tuple[str, int]:
        return await store._submit(read)

    future = asyncio.run_coroutine_threadsafe(in_writer(), loop)
    assert future.result(timeout=10) == ("wal", 2)  # 2 is FULL (1 NORMAL, 0 OFF)
