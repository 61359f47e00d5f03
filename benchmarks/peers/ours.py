"""The e2e workload against our server (or the floor): AddAll x100, then Subscribe.

The consumer is the streaming one (window of `batch` unacked messages, each pushed batch
acked on the stream as soon as it arrives): the best mode the contract offers, and the
same "100 in flight" the peers get with their prefetch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from benchmarks.login import login, new_stub
from benchmarks.peers.common import E2EResult, E2ESpec
from qm.v1 import queue_manager_pb2 as pb

CALL_TIMEOUT_S = 30.0


async def run(spec: E2ESpec) -> E2EResult:
    res = E2EResult(status="ok")
    element = "x" * spec.element_size
    deadline = time.monotonic() + spec.timeout_s
    async with grpc.aio.insecure_channel(f"{spec.host}:{spec.port}") as channel:
        stub = new_stub(channel)
        token = await login(stub, spec.username, spec.password)
        r = await stub.NewQueue(
            pb.NewQueueRequest(token=token, queue_name=spec.name), timeout=CALL_TIMEOUT_S
        )
        if r.code != pb.CODE_OK:
            return E2EResult(status="error", note=f"NewQueue: {pb.Code.Name(r.code)}")
        try:
            t0 = time.perf_counter()
            while res.produced < spec.n and time.monotonic() < deadline:
                k = min(spec.batch, spec.n - res.produced)
                a = await stub.AddAll(
                    pb.AddAllRequest(token=token, queue_name=spec.name, elements=[element] * k),
                    timeout=CALL_TIMEOUT_S,
                )
                if a.code != pb.CODE_OK:
                    res.note = f"AddAll: {pb.Code.Name(a.code)} {a.message}"
                    break
                res.produced += k
            t1 = time.perf_counter()
            await _consume(stub, token, spec, res, deadline)
            t2 = time.perf_counter()
            res.produce_s, res.consume_s = t1 - t0, t2 - t1
        finally:
            await stub.DestroyQueue(
                pb.DestroyQueueRequest(token=token, queue_name=spec.name, force=True),
                timeout=CALL_TIMEOUT_S,
            )
            await stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)
    return res


async def _consume(stub: Any, token: str, spec: E2ESpec, res: E2EResult, deadline: float) -> None:
    call = stub.Subscribe()
    try:
        await call.write(
            pb.SubscribeRequest(
                open=pb.SubscribeOpen(token=token, queue_name=spec.name, max_unacked=spec.batch)
            )
        )
        while res.consumed < res.produced:
            left = deadline - time.monotonic()
            if left <= 0:
                res.note = "Subscribe: out of time"
                return
            reply = await asyncio.wait_for(call.read(), timeout=left)
            if reply is grpc.aio.EOF:
                res.note = "Subscribe: stream ended"
                return
            if reply.code != pb.CODE_OK or reply.ack_results:
                res.note = f"Subscribe: {pb.Code.Name(reply.code)} {reply.message}"
                return
            ids = [e.message_id for e in reply.element_info]
            if ids:
                await call.write(
                    pb.SubscribeRequest(
                        ack=pb.SubscribeAck(message_ids=ids, ack_type=pb.ACK_TYPE_DONE)
                    )
                )
                res.consumed += len(ids)
        await call.done_writing()
        # Acks sent on the stream are applied before the server ends it.
        while await asyncio.wait_for(call.read(), timeout=CALL_TIMEOUT_S) is not grpc.aio.EOF:
            pass
    finally:
        call.cancel()
