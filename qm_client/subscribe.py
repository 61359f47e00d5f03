"""A streaming consumer over the bidirectional ``Subscribe`` RPC.

Polling costs a round trip per batch and a wait per empty queue; a subscription lets the
server push as soon as a message is ready, with ``max_unacked`` as flow control. Acks
travel on the same stream, so they are not confirmed one by one: the server reports only
the ones that failed, which are logged and collected in ``failed_acks``.
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import grpc

from qm.v1 import queue_manager_pb2 as pb

from ._message import Login, Message
from ._session import Session
from .errors import (
    MessageNotFound,
    MessageReleased,
    QMError,
    code_name,
    error_for_code,
    error_for_rpc_error,
)

__all__ = ["Subscription"]

logger = logging.getLogger("qm_client")


class _Stream:
    """One open Subscribe call: its requests, and the ids delivered on it not yet finished.

    A subscription outlives streams: when the session is lost the client logs in again and
    opens a new stream, and messages of the old one can no longer be acked.
    """

    def __init__(
        self, session: Session, queue: str, max_unacked: int, ack_deadline_ms: int | None
    ) -> None:
        self.login: Login = session.current()
        self.open_ids: set[int] = set()
        self.requests: queue_module.SimpleQueue[pb.SubscribeRequest | None] = (
            queue_module.SimpleQueue()
        )
        opening = pb.SubscribeOpen(
            token=self.login.token,
            queue_name=queue,
            max_unacked=max_unacked,
            ack_deadline_ms=ack_deadline_ms,
        )
        self.requests.put(pb.SubscribeRequest(open=opening))
        self.call = session.stub.Subscribe(self._request_iterator())

    def _request_iterator(self) -> Iterator[pb.SubscribeRequest]:
        while (request := self.requests.get()) is not None:
            yield request

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


class Subscription:
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
        self.queue = queue
        self.max_unacked = max_unacked
        self.ack_deadline_ms = ack_deadline_ms
        self.failed_acks: list[int] = []
        self._buffer: deque[Message] = deque()
        # Guards _stream, _closed, _reading and the stream's open_ids (acks come from any
        # thread).
        self._lock = threading.Lock()
        self._closed = False
        self._reading = False  # the consumer's thread is reading the stream
        self._stream = _Stream(session, queue, max_unacked, ack_deadline_ms)

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
        while True:
            with self._lock:
                # Closing released what the buffer still holds: hand none of it out.
                if self._closed:
                    raise StopIteration
                if self._buffer:
                    return self._buffer.popleft()
                stream = self._stream
                self._reading = True
            try:
                response = next(stream.call)
            except StopIteration:
                self._abort()
                raise
            except grpc.RpcError as error:
                if self._closed:
                    raise StopIteration from None
                self._abort()
                raise error_for_rpc_error(error) from error
            finally:
                with self._lock:
                    self._reading = False
                    closed = self._closed
            if closed:
                # close() came while this thread read, so it waits for this thread to read
                # the stream to its end. What comes is released.
                stream.drain()
                raise StopIteration
            self._take(stream, response)

    def close(self) -> None:
        """End the stream once the server has applied the acks sent on it.

        The server then releases every message the stream still holds.
        """
        shut = self._shut()
        if shut is not None:
            stream, read_elsewhere = shut
            stream.finish(self._session.timeout, read_elsewhere)

    def _abort(self) -> None:
        """End the stream without waiting (it failed, or the client is closed)."""
        shut = self._shut()
        if shut is not None:
            shut[0].end()

    def _shut(self) -> tuple[_Stream, bool] | None:
        """Mark closed; returns the stream to end and whether the consumer's thread is
        reading it (then that thread reads it to the end), or None if already closed."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            stream = self._stream
            reading = self._reading
            released = list(stream.open_ids)
            stream.open_ids.clear()
        self._session.unhold(stream.login, released)
        return stream, reading

    def _take(self, stream: _Stream, response: pb.SubscribeResponse) -> None:
        if response.code == pb.CODE_UNAUTHENTICATED:
            self._resume(stream)
            return
        if response.code != pb.CODE_OK:
            self._abort()
            raise error_for_code(response.code, response.message)
        for result in response.ack_results:
            logger.warning(
                "ack of message %d on the subscription to %s failed: %s",
                result.message_id,
                self.queue,
                code_name(result.code),
            )
            self.failed_acks.append(result.message_id)
        for info in response.element_info:
            # Acks for this message go through the stream, not the Ack RPC.
            message = self._session.hold(
                stream.login, self.queue, info, owner=self, lease_ms=self.ack_deadline_ms
            )
            with self._lock:
                stream.open_ids.add(info.message_id)
            self._buffer.append(message)

    def _resume(self, stream: _Stream) -> None:
        """The session ended under the stream: log in again and open a new stream."""
        stream.end()
        try:
            self._session.renew(stream.login)  # reports what the old session held
            fresh = _Stream(self._session, self.queue, self.max_unacked, self.ack_deadline_ms)
        except QMError:
            self._abort()
            raise
        with self._lock:
            if self._closed:
                fresh.end()
                return
            self._stream = fresh
            stream.open_ids.clear()
        # Messages of the old stream still in the buffer were released with it.
        self._buffer.clear()

    def _finish(self, message: Message, ack_type: pb.AckType) -> None:
        with self._lock:
            stream = self._stream
            if self._closed:
                raise MessageReleased("the subscription is closed; its messages were released")
            if message._login is not stream.login:
                raise MessageReleased("the stream this message was delivered on has ended")
            if message.message_id not in stream.open_ids:
                raise MessageNotFound(f"message {message.message_id} was already finished")
            stream.open_ids.discard(message.message_id)
            # A lost lease raises here, and nothing goes on the stream: the server releases
            # the message when its lease ends.
            self._session.check_lease(message)
            # Queued under the lock: close() marks the subscription closed before it
            # half-closes, so an ack that passed the checks goes out ahead of the end.
            ack = pb.SubscribeAck(message_ids=[message.message_id], ack_type=ack_type)
            stream.requests.put(pb.SubscribeRequest(ack=ack))
        self._session.unhold(stream.login, [message.message_id])
