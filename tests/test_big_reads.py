"""A large read never stalls everyone else: map reads run beside the writer, and the bytes
that reads in progress may hold are bounded."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import answer_size
from qm_server.byte_budget import ByteBudget
from qm_server.config import MIB
from qm_server.store import sqlite as sqlite_store

Stub = pb_grpc.QueueManagerServiceStub
# Only reached when the server is stuck: a read or a write that should have gone through.
STUCK_S = 20.0


class HeldReads:
    """Map reads stop at their first entry until released: a read in progress, on demand."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=STUCK_S), "no read reached the store"


@pytest.fixture
def held_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldReads]:
    held = HeldReads()
    size_of = answer_size.key_value_size

    def holding(key_bytes: int, value_bytes: int) -> int:
        held.entered.release()
        held.release.wait(STUCK_S)
        return size_of(key_bytes, value_bytes)

    monkeypatch.setattr(sqlite_store, "key_value_size", holding)
    yield held
    held.release.set()


def page_request(token: str) -> pb.MapGetListRequest:
    return pb.MapGetListRequest(token=token, map="m", offset=0, size=10)


def test_a_write_commits_while_a_map_read_is_in_progress(
    stub: Stub, token: str, held_reads: HeldReads
) -> None:
    # Regression: reads ran on the writer thread, so every Add waited behind a read of
    # tens of MiB (p99 from a few ms to half a second).
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v"))
    reading = stub.MapGetList.future(page_request(token), timeout=STUCK_S)
    held_reads.wait_entered()
    added = stub.Add(pb.AddRequest(token=token, queue_name="q", element="x"), timeout=STUCK_S)
    put = stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k2", value="v2"))
    assert (added.code, put.code, reading.done()) == (pb.CODE_OK, pb.CODE_OK, False)
    held_reads.release.set()
    # The read answers what was committed when it began.
    assert [(kv.key, kv.value) for kv in reading.result().list] == [("k", "v")]
    again = stub.MapGetList(page_request(token))
    assert [kv.key for kv in again.list] == ["k", "k2"]


class WatchedBudget(ByteBudget):
    """Tells the test when a read has to wait for its share of the budget."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.queued = threading.Event()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        if self.waiting or self.reserved + size > self.capacity:
            self.queued.set()
        async with super().hold(size):
            yield


def test_reads_in_progress_are_bounded_by_bytes(
    make_server: Callable[..., ServerHandle], held_reads: HeldReads
) -> None:
    handle = make_server(max_reads_in_progress_bytes=8 * MIB)  # two answers of 4 MiB
    assert handle.thread.server is not None
    engine = handle.thread.server.engine
    assert engine is not None
    budget = WatchedBudget(8 * MIB)
    engine.maps._reads = budget
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v"))
        reads = [stub.MapGetList.future(page_request(token), timeout=STUCK_S) for _ in range(3)]
        held_reads.wait_entered()
        # Two hold the budget (one reading, the other reading or waiting for a reader
        # thread); the third waits for room: it holds no answer meanwhile.
        assert budget.queued.wait(STUCK_S)
        assert (budget.reserved, budget.waiting) == (8 * MIB, 1)
        held_reads.release.set()
        assert [len(r.result().list) for r in reads] == [1, 1, 1]
        assert (budget.reserved, budget.waiting) == (0, 0)


def test_byte_budget_admits_in_order_and_gives_up_cancelled_places() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(10)
        order: list[str] = []
        gates = {name: asyncio.Event() for name in "abcd"}

        async def read(name: str, size: int) -> None:
            async with budget.hold(size):
                order.append(name)
                await gates[name].wait()

        a = asyncio.create_task(read("a", 6))
        await asyncio.sleep(0)
        b = asyncio.create_task(read("b", 6))  # does not fit beside a
        c = asyncio.create_task(read("c", 4))  # would fit, but b came first
        d = asyncio.create_task(read("d", 4))
        await asyncio.sleep(0)
        assert (order, budget.reserved, budget.waiting) == (["a"], 6, 3)
        b.cancel()  # its place goes to those behind it
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (order, budget.reserved, budget.waiting) == (["a", "c"], 10, 1)
        gates["c"].set()
        await c
        await asyncio.sleep(0)
        assert order == ["a", "c", "d"]
        gates["a"].set()
        gates["d"].set()
        await asyncio.gather(a, d)
        with pytest.raises(asyncio.CancelledError):
            await b
        with pytest.raises(ValueError):
            async with budget.hold(11):
                pass
        assert (budget.reserved, budget.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["a", "c", "d"]


def test_a_place_given_up_as_room_is_freed_is_skipped_not_granted() -> None:
    """A waiter cancelled in the same loop turn as the release that would admit it: the
    release met its cancelled future (set_result raised InvalidStateError in the
    releasing call) and the cancelled caller then failed to find its place (ValueError),
    both ending MapGetAll calls with CODE_INTERNAL under load."""

    async def scenario() -> None:
        budget = ByteBudget(10)
        inside, leave = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with budget.hold(10):
                inside.set()
                await leave.wait()

        async def second() -> None:
            async with budget.hold(10):
                pass

        holder = asyncio.create_task(first())
        await inside.wait()
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0)  # one loop turn: the waiter's first step parks it
        assert budget.waiting == 1
        leave.set()  # the holder's release is scheduled first,
        waiter.cancel()  # the waiter's cancellation right behind it
        await holder  # no InvalidStateError from the release
        with pytest.raises(asyncio.CancelledError):
            await waiter  # no ValueError either
        assert (budget.reserved, budget.waiting) == (0, 0)
        async with budget.hold(10):  # the whole budget is free again
            pass

    asyncio.run(scenario())
