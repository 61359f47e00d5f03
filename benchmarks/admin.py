"""The harness's own client: sets up queues and backlogs outside the measured window."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import grpc

from benchmarks.login import login, new_stub
from qm.v1 import queue_manager_pb2 as pb

CALL_TIMEOUT_S = 60.0
"""Setup calls may wait behind a busy group commit on a shared machine."""


class SetupFailed(RuntimeError):
    """A setup call answered a code other than the one the harness needs."""


class AdminClient:
    """One logged-in aio channel; use as ``async with AdminClient(...) as admin``."""

    def __init__(self, address: str, username: str, password: str) -> None:
        self.address = address
        self._username = username
        self._password = password
        self._channel = grpc.aio.insecure_channel(address)
        self.stub: Any = new_stub(self._channel)
        self.token = ""

    async def __aenter__(self) -> AdminClient:
        self.token = await login(self.stub, self._username, self._password)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._channel.close()

    async def new_queue(self, name: str) -> None:
        r = await self.stub.NewQueue(
            pb.NewQueueRequest(token=self.token, queue_name=name), timeout=CALL_TIMEOUT_S
        )
        if r.code not in (pb.CODE_OK, pb.CODE_QUEUE_ALREADY_EXISTS):
            raise SetupFailed(f"NewQueue {name}: {pb.Code.Name(r.code)} {r.message}")

    async def destroy_queue(self, name: str) -> None:
        r = await self.stub.DestroyQueue(
            pb.DestroyQueueRequest(token=self.token, queue_name=name, force=True),
            timeout=CALL_TIMEOUT_S * 5,
        )
        if r.code not in (pb.CODE_OK, pb.CODE_QUEUE_NOT_FOUND):
            raise SetupFailed(f"DestroyQueue {name}: {pb.Code.Name(r.code)} {r.message}")

    async def supports_subscribe(self, queue_name: str) -> bool:
        """Opens and closes one Subscribe stream: False only for UNIMPLEMENTED.

        Lets the harness skip filling a backlog that no stream would consume.
        """
        call = self.stub.Subscribe()
        try:
            await call.write(
                pb.SubscribeRequest(
                    open=pb.SubscribeOpen(token=self.token, queue_name=queue_name, max_unacked=1)
                )
            )
            await asyncio.wait_for(call.read(), timeout=1.0)
        except grpc.aio.AioRpcError as e:
            return e.code() != grpc.StatusCode.UNIMPLEMENTED
        except TimeoutError:
            pass  # open and waiting for messages: implemented
        finally:
            call.cancel()
        return True

    async def size(self, name: str) -> int:
        r = await self.stub.Size(
            pb.SizeRequest(token=self.token, queue_name=name), timeout=CALL_TIMEOUT_S
        )
        if r.code != pb.CODE_OK:
            raise SetupFailed(f"Size {name}: {pb.Code.Name(r.code)} {r.message}")
        return int(r.size)

    async def fill(
        self,
        name: str,
        count: int,
        element_size: int,
        batch: int = 1000,
        parallel: int = 4,
        timeout_s: float = 600.0,
        delay_ms: int | None = None,
    ) -> float:
        """Adds count elements with a few AddAll calls in flight; returns elements/s.

        Several calls in flight let a group-committing server batch its fsyncs, which is
        how a real producer fills a backlog; bounded by timeout_s. With delay_ms the
        elements are delayed (AddAllRequest.delay_ms) instead of ready.
        """
        element = "x" * element_size
        remaining = count
        deadline = time.monotonic() + timeout_s
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                if time.monotonic() > deadline:
                    raise SetupFailed(f"fill {name}: {remaining} of {count} left at timeout")
                n = min(batch, remaining)
                remaining -= n
                request = pb.AddAllRequest(
                    token=self.token, queue_name=name, elements=[element] * n
                )
                if delay_ms is not None:
                    request.delay_ms = delay_ms
                r = await self.stub.AddAll(request, timeout=CALL_TIMEOUT_S)
                if r.code != pb.CODE_OK:
                    raise SetupFailed(f"AddAll {name}: {pb.Code.Name(r.code)} {r.message}")

        await asyncio.gather(*(worker() for _ in range(parallel)))
        return count / max(time.perf_counter() - started, 1e-9)

    async def counts(self, name: str) -> tuple[int, int, int]:
        """(ready, delayed, in flight) from GetQueueInfo."""
        r = await self.stub.GetQueueInfo(
            pb.GetQueueInfoRequest(token=self.token, queue_name=name), timeout=CALL_TIMEOUT_S
        )
        if r.code != pb.CODE_OK:
            raise SetupFailed(f"GetQueueInfo {name}: {pb.Code.Name(r.code)} {r.message}")
        return int(r.ready), int(r.delayed), int(r.in_flight)
