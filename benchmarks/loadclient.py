"""One load-client process: log in, warm up, wait for GO, drive a scenario, print the result.

Clients are separate processes so that their CPU is not the server's, and the harness can
read the server's CPU time between GO and the end without counting login or warm-up.
Protocol on stdio: argv[1] is a JSON LoadSpec; the client prints ``READY``, waits for a
line on stdin, then prints ``RESULT {json}`` and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from benchmarks.login import login, new_stub
from benchmarks.scenarios import LoadResult, LoadSpec
from benchmarks.stream import AckingStream, StreamFailure
from qm.v1 import queue_manager_pb2 as pb

OK = pb.CODE_OK
EMPTY = pb.CODE_QUEUE_EMPTY
MAX_LATENCY_SAMPLES = 200_000
"""Per process; beyond this, latencies are not recorded (rates still are)."""


class Unimplemented(Exception):
    """The server answered UNIMPLEMENTED: the scenario is reported as n/a, not as failed."""


class Budget:
    """Shared by the tasks of one process: hands out units until the count or the time is up."""

    def __init__(self, max_units: int, duration_s: float) -> None:
        self.remaining = max_units
        self.deadline = time.monotonic() + duration_s
        self.units = 0
        self.iterations = 0
        self.errors = 0
        self.first_error = ""
        self.latencies_us: list[int] = []
        self.exhausted = False

    def take(self, n: int) -> int:
        """Up to n units, or 0 when the run is over."""
        if self.exhausted or self.remaining <= 0 or time.monotonic() >= self.deadline:
            return 0
        k = min(n, self.remaining)
        self.remaining -= k
        return k

    def give_back(self, n: int) -> None:
        self.remaining += n

    def ran_dry(self, n: int) -> None:
        """The queue answered empty: the n units taken go back and every task stops."""
        self.give_back(n)
        self.exhausted = True

    def done(self, started_ns: int, units: int) -> None:
        self.units += units
        self.iterations += 1
        if len(self.latencies_us) < MAX_LATENCY_SAMPLES:
            self.latencies_us.append((time.perf_counter_ns() - started_ns) // 1000)

    def fail(self, what: str, code: int, message: str = "") -> None:
        """A domain error stops this task: retrying blindly would measure the error path."""
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{what}: {pb.Code.Name(code)} {message}".strip()


Loop = Callable[[Any, str, LoadSpec, Budget], Awaitable[None]]


async def run_add(stub: Any, token: str, spec: LoadSpec, budget: Budget) -> None:
    element = "x" * spec.element_size
    req = pb.AddRequest(token=token, queue_name=spec.queue_name, element=element)
    while budget.take(1):
        t0 = time.perf_counter_ns()
        r = await stub.Add(req, timeout=spec.call_timeout_s)
        if r.code != OK:
            budget.fail("Add", r.code, r.message)
            return
        budget.done(t0, 1)


async def run_addall(stub: Any, token: str, spec: LoadSpec, budget: Budget) -> None:
    element = "x" * spec.element_size
    while n := budget.take(spec.batch):
        req = pb.AddAllRequest(token=token, queue_name=spec.queue_name, elements=[element] * n)
        t0 = time.perf_counter_ns()
        r = await stub.AddAll(req, timeout=spec.call_timeout_s)
        if r.code != OK:
            budget.fail("AddAll", r.code, r.message)
            return
        budget.done(t0, n)


async def run_poll_ack(stub: Any, token: str, spec: LoadSpec, budget: Budget) -> None:
    poll = pb.PollRequest(token=token, queue_name=spec.queue_name, wait_ms=0)
    while budget.take(1):
        t0 = time.perf_counter_ns()
        r = await stub.Poll(poll, timeout=spec.call_timeout_s)
        if r.code == EMPTY:
            budget.ran_dry(1)
            return
        if r.code != OK:
            budget.fail("Poll", r.code, r.message)
            return
        a = await stub.Ack(
            pb.AckRequest(token=token, message_id=r.message_id, ack_type=pb.ACK_TYPE_DONE),
            timeout=spec.call_timeout_s,
        )
        if a.code != OK:
            budget.fail("Ack", a.code, a.message)
            return
        budget.done(t0, 1)


async def run_pull_ack(stub: Any, token: str, spec: LoadSpec, budget: Budget) -> None:
    while n := budget.take(spec.batch):
        t0 = time.perf_counter_ns()
        r = await stub.PullElements(
            pb.PullElementsRequest(token=token, queue_name=spec.queue_name, number=n, wait_ms=0),
            timeout=spec.call_timeout_s,
        )
        if r.code == EMPTY:
            budget.ran_dry(n)
            return
        if r.code != OK:
            budget.fail("PullElements", r.code, r.message)
            return
        ids = [e.message_id for e in r.element_info]
        budget.give_back(n - len(ids))
        a = await stub.BatchAck(
            pb.BatchAckRequest(token=token, message_ids=ids, ack_type=pb.ACK_TYPE_DONE),
            timeout=spec.call_timeout_s,
        )
        bad = [x for x in a.results if x.code != OK]
        if a.code != OK or bad:
            budget.fail("BatchAck", a.code if a.code != OK else bad[0].code, a.message)
            return
        budget.done(t0, len(ids))


async def run_stream(stub: Any, token: str, spec: LoadSpec, budget: Budget) -> None:
    """One Subscribe stream per task; latency is the gap between two pushed batches."""
    try:
        async with AckingStream(stub, token, spec.queue_name, spec.batch) as stream:
            t0 = time.perf_counter_ns()
            while budget.remaining > 0 and not budget.exhausted:
                n = await stream.next_batch(budget.deadline)
                if n is None:
                    return
                if n:
                    budget.remaining -= n
                    budget.done(t0, n)
                    t0 = time.perf_counter_ns()
    except StreamFailure as failure:
        budget.fail(failure.what, failure.code, failure.message)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise Unimplemented(e.details() or "Subscribe") from e
        raise


LOOPS: dict[str, Loop] = {
    "add": run_add,
    "addall": run_addall,
    "poll_ack": run_poll_ack,
    "pull_ack": run_pull_ack,
    "stream": run_stream,
}


async def drive(spec: LoadSpec) -> LoadResult:
    loop_fn = LOOPS[spec.scenario]
    async with grpc.aio.insecure_channel(spec.address) as channel:
        stub = new_stub(channel)
        token = await login(stub, spec.username, spec.password)
        beat = pb.HeartBeatRequest(token=token)
        for _ in range(3):  # warm the HTTP/2 connection and both sides' code paths
            await stub.HeartBeat(beat, timeout=spec.call_timeout_s)
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # GO
        budget = Budget(spec.max_units, spec.duration_s)
        started = time.perf_counter()
        results = await asyncio.gather(
            *(loop_fn(stub, token, spec, budget) for _ in range(spec.tasks)),
            return_exceptions=True,
        )
        elapsed = time.perf_counter() - started
        with_error = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(r, Unimplemented) for r in with_error):
            return LoadResult(status="unimplemented", note="server answered UNIMPLEMENTED")
        if with_error:
            budget.errors += len(with_error)
            budget.first_error = budget.first_error or repr(with_error[0])[:300]
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Logout(pb.LogoutRequest(token=token), timeout=spec.call_timeout_s)
        return LoadResult(
            status="error" if budget.errors and not budget.units else "ok",
            units=budget.units,
            iterations=budget.iterations,
            elapsed_s=elapsed,
            latencies_us=budget.latencies_us,
            errors=budget.errors,
            note=budget.first_error,
        )


def main() -> int:
    spec = LoadSpec(**json.loads(sys.argv[1]))
    try:
        result = asyncio.run(drive(spec))
    except Exception as e:  # reported to the harness, which prints it beside the row
        result = LoadResult(status="error", note=f"{type(e).__name__}: {e}"[:500])
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
