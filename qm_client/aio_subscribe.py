"""A streaming consumer for the asyncio client: ``async for message in subscription``.

The sync ``Subscription`` over ``grpc.aio``: the state and what each server message
means are ``_subscription_core.py``'s, shared by both; this module reads the stream in
the consuming task and queues acks for the stream's request iterator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from qm.v1 import queue_manager_pb2 as pb

from ._aio_session import AsyncSession
from ._message import AsyncMessage
from ._subscription_core import StreamBase, SubscriptionCore, SubscriptionView
from .errors import QMError, error_for_rpc_error

__all__ = ["AsyncSubscription"]


class _Stream(StreamBase):
    """One open Subscribe call, its requests queued for its async request iterator."""

    def __init__(
        self, session: AsyncSession, queue: str, max_unacked: int, ack_deadline_ms: int | None
    ) -> None:
        super().__init__(session, queue, max_unacked, ack_deadline_ms)
        self.requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        self.requests.put_nowait(self.opening)
        # The generated stub is typed for the sync channel; on an aio channel the call
        # takes an async iterator and is a grpc.aio.StreamStreamCall.
        requests: Any = self._request_iterator()
        self.call: grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] = (
            session.stub.Subscribe(requests)  # type: ignore[assignment]
        )
        self.ended = asyncio.Event()  # set once the stream was read to its end

    async def _request_iterator(self) -> AsyncIterator[pb.SubscribeRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    def send(self, request: pb.SubscribeRequest) -> None:
        self.requests.put_nowait(request)

    async def read(self) -> pb.SubscribeResponse | None:
        """The next server message; ``None`` at the end of the stream."""
        response = await self.call.read()
        if response is grpc.aio.EOF:
            self.ended.set()
            return None
        assert isinstance(response, pb.SubscribeResponse)
        return response

    def end(self) -> None:
        """Abandon the stream at once (it has failed, or its session is gone)."""
        self.requests.put_nowait(None)
        self.call.cancel()
        self.ended.set()

    async def finish(self, timeout: float, read_elsewhere: bool) -> None:
        """Half-close, and wait for the server to end the stream (it applies every ack
        sent first, then releases what it still holds); cut off after ``timeout`` s.
        One read at a time: when the consuming task is reading, it reads to the end."""
        self.requests.put_nowait(None)
        try:
            async with asyncio.timeout(timeout):
                if read_elsewhere:
                    await self.ended.wait()
                else:
                    await self.drain()
        except TimeoutError:
            self.call.cancel()
            self.ended.set()

    async def drain(self) -> None:
        """Read the stream to its end; what still comes was released with it."""
        try:
            while await self.read() is not None:
                pass
        except grpc.RpcError:
            pass  # cut off, or the stream failed: either way it is over
        finally:
            self.ended.set()


class AsyncSubscription(SubscriptionView):
    """Messages of one queue as the server pushes them; ``client.subscribe(...)``.

    ``async for message in subscription`` waits for the next message and ends when
    :meth:`close` is awaited (from any task), the client is closed, or the server ends
    the stream; ``await message.ack()`` makes room for more. A lost session is renewed
    (and reported) and the subscription resumes on a new stream, as the sync one does.
    """

    def __init__(
        self,
        session: AsyncSession,
        queue: str,
        max_unacked: int,
        ack_deadline_ms: int | None = None,
    ) -> None:
        self._session = session
        stream = _Stream(session, queue, max_unacked, ack_deadline_ms)
        self._core = SubscriptionCore(session, queue, max_unacked, ack_deadline_ms, stream, self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AsyncMessage:
        core = self._core
        while True:
            next_ = core.next_or_read()
            if next_ is None:
                raise StopAsyncIteration
            if not isinstance(next_, _Stream):
                assert isinstance(next_, AsyncMessage)
                return next_
            stream = next_
            try:
                response = await stream.read()
            except grpc.RpcError as error:
                if core.closed:
                    raise StopAsyncIteration from None
                self._abort()
                raise error_for_rpc_error(error) from error
            except asyncio.CancelledError:
                # The consuming task was cancelled mid-read: the stream cannot be read
                # again safely, so end it; the server releases what it holds.
                core.read_done()
                self._abort()
                raise
            if core.read_done():
                # close() came while this task read: it waits for this task to read the
                # stream to its end. What comes is released.
                await stream.drain()
                raise StopAsyncIteration
            if response is None:
                self._abort()
                raise StopAsyncIteration
            try:
                resume = core.take(stream, response)
            except QMError:
                self._abort()
                raise
            if resume:
                await self._resume(stream)

    async def close(self) -> None:
        """End the stream once the server has applied the acks sent on it.

        The server then releases every message the stream still holds.
        """
        shut = self._core.shut()
        if shut is not None:
            stream, read_elsewhere = shut
            await stream.finish(self._session.timeout, read_elsewhere)

    def _abort(self) -> None:
        """End the stream without waiting (it failed, or the client is closed)."""
        shut = self._core.shut()
        if shut is not None:
            shut[0].end()

    async def _resume(self, stream: _Stream) -> None:
        """The session ended under the stream: log in again and open a new stream."""
        stream.end()
        core = self._core
        try:
            await self._session.renew(stream.login)  # reports what the old session held
            fresh = _Stream(self._session, core.queue, core.max_unacked, core.ack_deadline_ms)
        except QMError:
            self._abort()
            raise
        if not core.replace(stream, fresh):
            fresh.end()

    async def _finish(self, message: AsyncMessage, ack_type: pb.AckType) -> None:
        self._core.finish(message, ack_type, _Stream.send)
