"""The e2e workload against our server (or the floor): AddAll x100, then Subscribe.

The producer keeps `in_flight / 100` AddAll calls of 100 in flight on one channel (HTTP/2
carries them side by side, and the store's group commit gives calls that meet in the
writer one fsync), as a Redis pipeline or a confirm window keeps that many messages in
flight. The consumer is the streaming one (a window of `in_flight` unacked messages, each
pushed batch acked on the stream as soon as it arrives): the best mode the contract offers,
and the same depth the peers get with their prefetch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks.login import login, new_stub
from benchmarks.peers.common import CALL_SIZE, E2EResult, E2ESpec
from benchmarks.stream import AckingStream, StreamFailure
from qm.v1 import queue_manager_pb2 as pb

CALL_TIMEOUT_S = 30.0


async def run(spec: E2ESpec) -> E2EResult:
    res = E2EResult(status="ok")
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
            taken = _Taken()
            producers = max(1, spec.in_flight // CALL_SIZE)
            await asyncio.gather(
                *(_produce(stub, token, spec, res, taken, deadline) for _ in range(producers))
            )
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


@dataclass
class _Taken:
    """Shared by the producers: how many of the n messages one of them has taken to send."""

    count: int = 0


async def _produce(
    stub: Any, token: str, spec: E2ESpec, res: E2EResult, taken: _Taken, deadline: float
) -> None:
    """One producer: sends the next CALL_SIZE messages until n are taken or a call fails."""
    element = "x" * spec.element_size
    while taken.count < spec.n and not res.note and time.monotonic() < deadline:
        k = min(CALL_SIZE, spec.n - taken.count)
        taken.count += k
        a = await stub.AddAll(
            pb.AddAllRequest(token=token, queue_name=spec.name, elements=[element] * k),
            timeout=CALL_TIMEOUT_S,
        )
        if a.code != pb.CODE_OK:
            res.note = f"AddAll: {pb.Code.Name(a.code)} {a.message}"
            return
        res.produced += k


async def _consume(stub: Any, token: str, spec: E2ESpec, res: E2EResult, deadline: float) -> None:
    try:
        async with AckingStream(stub, token, spec.name, spec.in_flight) as stream:
            while res.consumed < res.produced:
                n = await stream.next_batch(deadline)
                if n is None:
                    res.note = "Subscribe: " + ("stream ended" if stream.ended else "out of time")
                    return
                res.consumed += n
            await stream.finish(CALL_TIMEOUT_S)
    except StreamFailure as failure:
        res.note = str(failure)
