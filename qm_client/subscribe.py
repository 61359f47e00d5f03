"""A streaming consumer over the bidirectional ``Subscribe`` RPC.

Polling costs a round trip per batch and a wait per empty queue; a subscription lets the
server push as soon as a message is ready, with ``max_unacked`` as flow control. Acks
travel on the same stream, so they are not confirmed one by one: the server reports only
the ones that failed, which are logged and collected in ``failed_acks``. The state and
what each server message means are ``_subscription_core.py``'s, shared with the asyncio
client; this module reads the stream from the consumer's thread.
"""

from __future__ import annotations

import queue as queue_module
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import grpc

from qm.v1 import queue_manager_pb2 as pb

from ._message import Message
from ._session import Session
from ._subscription_core import StreamBase, SubscriptionCore, SubscriptionView
from .errors import QMError, error_for_rpc_error

__all__ = ["Subscription"]


class _Stream(StreamBase):
    """One open Subscribe call, its requests queued for gRPC's request thread."""

    def __init__(
        self, session: Session, queue: str, max_unacked: int, ack_deadline_ms: int | None
    ) -> None:
        super().__init__(session, queue, max_unacked, ack_deadline_ms)
        self.requests: queue_module.SimpleQueue[pb.SubscribeRequest | None] = (
            queue_module.SimpleQueue()
        )
        self.requests.put(self.opening)
        self.call = session.stub.Subscribe(self._request_iterator())

    def _request_iterator(self) -> Iterator[pb.SubscribeRequest]:
        while (request := self.requests.get()) is not None:
            yield request

    def send(self, request: pb.SubscribeRequest) -> None:
        self.requests.put(request)

    def end(self) -> None:
        """Abandon the stream at once (it has failed, or its session is gone)."""
        self.requests.put(None)  # lets gRPC's request thread finish
        self.call.cancel()

    def finish(self, timeout: float, read_elsewhere: bool) -> None:
        """Half-close, and wait for the server to end the stream.

        Acks are queued, not confirmed: cancelling at once could drop the last ones
        before they were sent. After a half-close the server applies every ack it was
        sent, then ends the stream; anything it pushed meanwhile it releases. A server
        that takes longer than ``timeout`` is cut off.

        gRPC allows one read at a time on a call (a second fails with "Internal gRPC
        call error 8"), and it reports the end only once every response was read. So
        when the consumer's thread is reading the stream (``read_elsewhere``), that
        thread reads on to the end and this one only waits for it.
        """
        self.requests.put(None)
        watchdog = threading.Timer(timeout, self.call.cancel)
        watchdog.daemon = True
        watchdog.start()
        try:
            if read_elsewhere:
                ended = threading.Event()
                if self.call.add_callback(ended.set):
                    ended.wait()  # the watchdog's cancel ends the call too
            else:
                self.drain()
        finally:
            watchdog.cancel()

    def drain(self) -> None:
        """Read the stream to its end; what still comes was released with it."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError:
            pass  # cut off by the watchdog, or the stream failed: either way it is over


class Subscription(SubscriptionView):
    """Messages of one queue as the server pushes them; create with ``client.subscribe``.

    Iterating blocks until the next message arrives and ends when :meth:`close` is called
    (from any thread) or the server ends the stream. Ack or nack each message to make room
    for more. The stream has no deadline, by design: it lives as long as the consumer wants
    it, and the client's heartbeat keeps its session alive. When the session is lost, the
    subscription logs in again (through the shared session, which reports the loss) and
    resumes.
    """

    def __init__(
        self,
        session: Session,
        queue: str,
        max_unacked: int,
        ack_deadline_ms: int | None = None,
    ) -> None:
        self._session = session
        stream = _Stream(session, queue, max_unacked, ack_deadline_ms)
        self._core = SubscriptionCore(session, queue, max_unacked, ack_deadline_ms, stream, self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        core = self._core
        while True:
            next_ = core.next_or_read()
            if next_ is None:
                raise StopIteration
            if not isinstance(next_, _Stream):
                assert isinstance(next_, Message)
                return next_
            stream = next_
            try:
                response = next(stream.call)
            except StopIteration:
                self._abort()
                raise
            except grpc.RpcError as error:
                if core.closed:
                    raise StopIteration from None
                self._abort()
                raise error_for_rpc_error(error) from error
            finally:
                closed = core.read_done()
            if closed:
                # close() came while this thread read, so it waits for this thread to read
                # the stream to its end. What comes is released.
                stream.drain()
                raise StopIteration
            try:
                resume = core.take(stream, response)
            except QMError:
                self._abort()
                raise
            if resume:
                self._resume(stream)

    def close(self) -> None:
        """End the stream once the server has applied the acks sent on it.

        The server then releases every message the stream still holds.
        """
        shut = self._core.shut()
        if shut is not None:
            stream, read_elsewhere = shut
            stream.finish(self._session.timeout, read_elsewhere)

    def _abort(self) -> None:
        """End the stream without waiting (it failed, or the client is closed)."""
        shut = self._core.shut()
        if shut is not None:
            shut[0].end()

    def _resume(self, stream: _Stream) -> None:
        """The session ended under the stream: log in again and open a new stream."""
        stream.end()
        core = self._core
        try:
            self._session.renew(stream.login)  # reports what the old session held
            fresh = _Stream(self._session, core.queue, core.max_unacked, core.ack_deadline_ms)
        except QMError:
            self._abort()
            raise
        if not core.replace(stream, fresh):
            fresh.end()

    def _finish(self, message: Message, ack_type: pb.AckType) -> None:
        self._core.finish(message, ack_type, _Stream.send)
