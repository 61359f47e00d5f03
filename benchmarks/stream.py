"""The one Subscribe consumer of the benchmarks: open a stream, ack every push as done.

The load scenarios and the e2e comparison both consume this way, the best mode the
contract offers; one copy keeps them measuring the same thing.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import grpc

from qm.v1 import queue_manager_pb2 as pb


class StreamFailure(Exception):
    """A push or an ack on the stream answered something other than OK."""

    def __init__(self, what: str, code: int, message: str = "") -> None:
        super().__init__(f"{what}: {pb.Code.Name(code)} {message}".rstrip())
        self.what = what
        self.code = code
        self.message = message


class AckingStream:
    """A Subscribe stream holding at most `max_unacked` messages, each batch acked on arrival."""

    def __init__(self, stub: Any, token: str, queue_name: str, max_unacked: int) -> None:
        self._call = stub.Subscribe()
        self._open = pb.SubscribeRequest(
            open=pb.SubscribeOpen(token=token, queue_name=queue_name, max_unacked=max_unacked)
        )
        self.ended = False
        """True once the server ended the stream (as opposed to the caller's time running out)."""

    async def __aenter__(self) -> AckingStream:
        await self._call.write(self._open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call.cancel()

    async def next_batch(self, deadline: float) -> int | None:
        """Read the next push and ack its messages; how many it carried (0 for a push of ack
        results only), or None when the stream ended or `deadline` (monotonic) passed.
        Raises StreamFailure on a push or an ack result that is not OK."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            reply = await asyncio.wait_for(self._call.read(), timeout=left)
        except TimeoutError:
            return None
        if reply is grpc.aio.EOF:
            self.ended = True
            return None
        if reply.code != pb.CODE_OK:
            raise StreamFailure("Subscribe", reply.code, reply.message)
        for failed in reply.ack_results:
            raise StreamFailure("SubscribeAck", failed.code)
        ids = [e.message_id for e in reply.element_info]
        if ids:
            await self._call.write(
                pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids, ack_type=pb.ACK_TYPE_DONE))
            )
        return len(ids)

    async def finish(self, timeout_s: float) -> None:
        """Half-close and read to the end: the server applies the acks sent before ending."""
        await self._call.done_writing()
        while await asyncio.wait_for(self._call.read(), timeout=timeout_s) is not grpc.aio.EOF:
            pass
