"""A subscription's state, shared by the sync ``Subscription`` and ``AsyncSubscription``.

Sans-IO: the messages pushed and not yet handed out, the stream they came on and the ids
delivered on it not yet finished, and what each server message means. The two
subscriptions only read the stream and queue requests on it, each in its own way
(a thread and a request queue, or ``grpc.aio``).

A subscription outlives streams: when the session is lost the client logs in again and
opens a new stream, and messages of the old one can no longer be acked.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from qm.v1 import queue_manager_pb2 as pb

from ._message import Delivery, Login
from ._session_core import SessionCore
from .errors import MessageNotFound, MessageReleased, code_name, error_for_code

__all__ = ["StreamBase", "StreamLike", "SubscriptionCore", "SubscriptionView", "opening"]

logger = logging.getLogger("qm_client")


class StreamLike(Protocol):
    """What the core needs of one open Subscribe call."""

    login: Login
    open_ids: set[int]


class StreamBase:
    """One Subscribe call's bookkeeping: the login it was opened under, the ids delivered
    on it not yet finished, and the request that opens it (sent first)."""

    def __init__(
        self,
        session: SessionCore[Any],
        queue: str,
        max_unacked: int,
        ack_deadline_ms: int | None,
    ) -> None:
        self.login: Login = session.current()
        self.open_ids: set[int] = set()
        self.opening = opening(self.login, queue, max_unacked, ack_deadline_ms)


_S = TypeVar("_S", bound=StreamLike)


def opening(
    login: Login, queue: str, max_unacked: int, ack_deadline_ms: int | None
) -> pb.SubscribeRequest:
    """The first request of a stream: it opens the subscription under ``login``."""
    return pb.SubscribeRequest(
        open=pb.SubscribeOpen(
            token=login.token,
            queue_name=queue,
            max_unacked=max_unacked,
            ack_deadline_ms=ack_deadline_ms,
        )
    )


class SubscriptionCore(Generic[_S]):
    """The state of one subscription; thread-safe, no I/O.

    The lock guards ``stream``, ``closed``, ``reading``, the buffer and the stream's
    ``open_ids`` (acks come from any thread or task).
    """

    def __init__(
        self,
        session: SessionCore[Any],
        queue: str,
        max_unacked: int,
        ack_deadline_ms: int | None,
        stream: _S,
        owner: object,
    ) -> None:
        self.session = session
        self.owner = owner  # finishes the messages: the subscription wrapping this core
        self.queue = queue
        self.max_unacked = max_unacked
        self.ack_deadline_ms = ack_deadline_ms
        self.failed_acks: list[int] = []
        self.stream = stream
        self._buffer: deque[Delivery] = deque()
        self._lock = threading.Lock()
        self.closed = False
        self.reading = False  # a consumer is reading the stream

    def next_or_read(self) -> Delivery | _S | None:
        """A buffered message; else the stream to read (marked as being read); ``None``
        once closed (closing released what the buffer still holds: none is handed out)."""
        with self._lock:
            if self.closed:
                return None
            if self._buffer:
                return self._buffer.popleft()
            self.reading = True
            return self.stream

    def read_done(self) -> bool:
        """The consumer stopped reading; whether the subscription was closed meanwhile."""
        with self._lock:
            self.reading = False
            return self.closed

    def take(self, stream: _S, response: pb.SubscribeResponse) -> bool:
        """Apply one server message: buffer what it pushed, log and collect failed acks.
        ``True`` when the session ended under the stream (resume on a new one); a failure
        code raises its typed error (end the stream first)."""
        if response.code == pb.CODE_UNAUTHENTICATED:
            return True
        if response.code != pb.CODE_OK:
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
            message = self.session.hold(
                stream.login, self.queue, info, owner=self.owner, lease_ms=self.ack_deadline_ms
            )
            with self._lock:
                stream.open_ids.add(info.message_id)
                self._buffer.append(message)
        return False

    def shut(self) -> tuple[_S, bool] | None:
        """Mark closed; returns the stream to end and whether a consumer is reading it
        (then that consumer reads it to the end), or ``None`` if already closed."""
        with self._lock:
            if self.closed:
                return None
            self.closed = True
            stream = self.stream
            reading = self.reading
            released = list(stream.open_ids)
            stream.open_ids.clear()
        self.session.unhold(stream.login, released)
        return stream, reading

    def replace(self, old: _S, fresh: _S) -> bool:
        """Continue on ``fresh`` after the session was lost; ``False`` if closed meanwhile
        (then end ``fresh``). Messages of the old stream still buffered were released."""
        with self._lock:
            if self.closed:
                return False
            self.stream = fresh
            old.open_ids.clear()
            self._buffer.clear()
        return True

    def finish(
        self,
        message: Delivery,
        ack_type: pb.AckType,
        send: Callable[[_S, pb.SubscribeRequest], None],
    ) -> None:
        """Ack or nack ``message`` on its stream: ``send`` queues the request.

        Queued under the lock: closing marks the subscription closed before it
        half-closes, so an ack that passed the checks goes out ahead of the end. A lost
        lease raises here, and nothing goes on the stream: the server releases the
        message when its lease ends.
        """
        with self._lock:
            stream = self.stream
            if self.closed:
                raise MessageReleased("the subscription is closed; its messages were released")
            if message._login is not stream.login:
                raise MessageReleased("the stream this message was delivered on has ended")
            if message.message_id not in stream.open_ids:
                raise MessageNotFound(f"message {message.message_id} was already finished")
            stream.open_ids.discard(message.message_id)
            self.session.check_lease(message)
            ack = pb.SubscribeAck(message_ids=[message.message_id], ack_type=ack_type)
            send(stream, pb.SubscribeRequest(ack=ack))
        self.session.unhold(stream.login, [message.message_id])


class SubscriptionView:
    """The read-only face both subscriptions show of their core."""

    _core: SubscriptionCore[Any]

    @property
    def queue(self) -> str:
        return self._core.queue

    @property
    def max_unacked(self) -> int:
        return self._core.max_unacked

    @property
    def failed_acks(self) -> list[int]:
        """Ids of messages whose ack the server refused (it reports only those)."""
        return self._core.failed_acks

    @property
    def closed(self) -> bool:
        return self._core.closed
