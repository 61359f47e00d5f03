"""A thousand idle long polls and subscriptions cost no thread each, and wake one by one."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc

from conftest import ServerHandle, encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

WAITERS = 1000
CHANNELS = 8  # grpcio cancels some calls beyond about a thousand on one channel


async def aio_login(stub: pb_grpc.QueueManagerServiceAsyncStub, password: str) -> str:
    challenge = await stub.GetChallenge(pb.GetChallengeRequest())
    reply = await stub.Auth(
        pb.AuthRequest(username="admin", password=encrypt_password(challenge, password))
    )
    assert reply.code == pb.CODE_OK
    return reply.token


def parked(server: ServerHandle, count: int) -> asyncio.Event:
    """An event of the caller's loop, set once `count` calls wait on their queues in the
    server (whose engine runs on a loop of its own)."""
    engine = server.thread.server.engine if server.thread.server else None
    assert engine is not None
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    park = engine.signals.park

    def park_and_count(name: str, waiter: asyncio.Future[None]) -> None:
        park(name, waiter)
        if engine.signals.waiting() >= count:
            engine.signals.park = park  # type: ignore[method-assign]  # once
            loop.call_soon_threadsafe(event.set)

    engine.signals.park = park_and_count  # type: ignore[method-assign]
    return event


def delivered(answer: pb.PollResponse | pb.SubscribeResponse) -> list[pb.ElementInfo]:
    """What a long poll's answer or a stream's push handed out (asserting it is OK)."""
    assert answer.code == pb.CODE_OK
    if isinstance(answer, pb.PollResponse):
        info = pb.ElementInfo(element=answer.element, message_id=answer.message_id)
        return [info]
    return list(answer.element_info)


async def idle_consumers(server: ServerHandle) -> None:
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.QueueManagerServiceStub(c) for c in channels]
    token = await aio_login(stubs[0], server.admin_password)
    await stubs[0].NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    threads_before = threading.active_count()
    all_parked = parked(server, WAITERS)
    polls = [
        asyncio.ensure_future(
            stubs[i % CHANNELS].Poll(
                pb.PollRequest(token=token, queue_name="q", wait_ms=20_000), timeout=60
            )
        )
        for i in range(WAITERS - 10)
    ]
    streams = []
    for i in range(10):
        call = stubs[i % CHANNELS].Subscribe(timeout=60)
        await call.write(
            pb.SubscribeRequest(open=pb.SubscribeOpen(token=token, queue_name="q", max_unacked=1))
        )
        streams.append(call)
    async with asyncio.timeout(30):
        await all_parked.wait()
    started = time.monotonic()
    heartbeat = await stubs[0].HeartBeat(pb.HeartBeatRequest(token=token))
    assert heartbeat.code == pb.CODE_OK
    assert time.monotonic() - started < 1.0  # a thousand waiters do not slow others
    assert threading.active_count() - threads_before <= 4  # no thread per waiter
    # Three messages go to three waiters, each to one; the rest keep waiting.
    pushes = [asyncio.ensure_future(call.read()) for call in streams]
    waiters: list[asyncio.Future[Any]] = [*polls, *pushes]
    await stubs[0].AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b", "c"]))
    answered: set[asyncio.Future[Any]] = set()
    async with asyncio.timeout(10):
        while len(answered) < 3:
            done, _ = await asyncio.wait(
                set(waiters) - answered, return_when=asyncio.FIRST_COMPLETED
            )
            answered |= done
    elements = [e.element for w in answered for e in delivered(w.result())]
    assert sorted(elements) == ["a", "b", "c"]
    counts = await stubs[0].GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name="q"))
    assert counts.ack_num == 3
    assert (await stubs[0].Size(pb.SizeRequest(token=token, queue_name="q"))).size == 0
    assert [w for w in waiters if w.done()] == [w for w in waiters if w in answered]
    for waiter in waiters:
        waiter.cancel()
    for call in streams:
        call.cancel()
    for channel in channels:
        await channel.close()


def test_a_thousand_idle_consumers(server: ServerHandle) -> None:
    asyncio.run(idle_consumers(server))
