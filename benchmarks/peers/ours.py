"""The e2e workload against our server (or the floor): AddAll x100, then Pull x100 + BatchAck."""

from __future__ import annotations

import time

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
            while res.consumed < res.produced and time.monotonic() < deadline:
                p = await stub.PullElements(
                    pb.PullElementsRequest(
                        token=token, queue_name=spec.name, number=spec.batch, wait_ms=0
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                if p.code != pb.CODE_OK:
                    res.note = f"PullElements: {pb.Code.Name(p.code)} {p.message}"
                    break
                ids = [e.message_id for e in p.element_info]
                b = await stub.BatchAck(
                    pb.BatchAckRequest(token=token, message_ids=ids, ack_type=pb.ACK_TYPE_DONE),
                    timeout=CALL_TIMEOUT_S,
                )
                if b.code != pb.CODE_OK:
                    res.note = f"BatchAck: {pb.Code.Name(b.code)} {b.message}"
                    break
                res.consumed += sum(1 for x in b.results if x.code == pb.CODE_OK)
            t2 = time.perf_counter()
            res.produce_s, res.consume_s = t1 - t0, t2 - t1
        finally:
            await stub.DestroyQueue(
                pb.DestroyQueueRequest(token=token, queue_name=spec.name, force=True),
                timeout=CALL_TIMEOUT_S,
            )
            await stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)
    if res.consumed < spec.n:
        res.status = "partial"
    return res
