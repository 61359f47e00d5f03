"""A thousand idle long polls and subscriptions cost no thread each, and wake one by one."""

from __future__ import annotations

import asyncio
import threading
import time

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


async def idle_consumers(server: ServerHandle) -> None:
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.QueueManagerServiceStub(c) for c in channels]
    token = await aio_login(stubs[0], server.admin_password)
    await stubs[0].NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    threads_before = threading.active_count()
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
    # A call made after all the others on the same channels answers only once they
    # are all in progress: then every waiter is parked.
    for stub in stubs:
        assert (await stub.HeartBeat(pb.HeartBeatRequest(token=token))).code == pb.CODE_OK
    started = time.monotonic()
    heartbeat = await stubs[0].HeartBeat(pb.HeartBeatRequest(token=token))
    assert heartbeat.code == pb.CODE_OK
    assert time.monotonic() - started < 1.0  # a thousand waiters do not slow others
    assert threading.active_count() - threads_before <= 4  # no thread per waiter
    # Three messages go to three waiters, each to one; the rest keep waiting.
    await stubs[0].AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b", "c"]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the claims finish on the server: follow them
        counts = await stubs[0].GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name="q"))
        if counts.ack_num == 3:
            break
        await asyncio.sleep(0.01)
    assert counts.ack_num == 3
    assert (await stubs[0].Size(pb.SizeRequest(token=token, queue_name="q"))).size == 0
    answered = [p for p in polls if p.done()]
    assert len(answered) <= 3
    assert {p.result().code for p in answered} <= {pb.CODE_OK}
    pending = [p for p in polls if not p.done()]
    for poll in pending:
        poll.cancel()
    for call in streams:
        call.cancel()
    for channel in channels:
        await channel.close()


def test_a_thousand_idle_consumers(server: ServerHandle) -> None:
    asyncio.run(idle_consumers(server))
