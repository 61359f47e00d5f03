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
from typing import TYPE_CHECKING, Self

import grpc

from qm.v1 import queue_manager_pb2 as pb

from .errors import ClientClosed, MessageReleased, error_for_code, error_for_rpc_error

if TYPE_CHECKING:
    from .client import Message, QueueManagerClient

__all__ = ["Subscription"]

logger = logging.getLogger("qm_client")

_END = None


class Subscription:
    """Messages of one queue as the server pushes them; create with ``client.subscribe``.

    Iterating blocks until the next message arrives and ends when :meth:`close` is called
    (from any thread). Each message must be acked or nacked to make room for more. The
    stream has no deadline, by design: it lives as long as the consumer wants it, and the
    client's heartbeat keeps its session alive.
    """

    def __init__(self, client: QueueManagerClient, queue: str, max_unacked: int) -> None:
        self._client = client
        self.queue = queue
        self.max_unacked = max_unacked
        self.failed_acks: list[int] = []
        self._requests: queue_module.SimpleQueue[pb.SubscribeRequest | None] = (
            queue_module.SimpleQueue()
        )
        self._buffer: deque[Message] = deque()
        # Ids delivered on this stream and not yet finished; guarded by _lock.
        self._lock = threading.Lock()
        self._open: set[int] = set()
        self._closed = False
        self._session = client._current()
        self._requests.put(
            pb.SubscribeRequest(
                open=pb.SubscribeOpen(
                    token=self._session.token, queue_name=queue, max_unacked=max_unacked
                )
            )
        )
        self._call = client._stub.Subscribe(self._request_stream())

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
        while not self._buffer:
            if self._closed:
                raise StopIteration
            try:
                response = next(self._call)
            except StopIteration:
                self._closed = True
                raise
            except grpc.RpcError as error:
                if self._closed:
                    raise StopIteration from None
                raise error_for_rpc_error(error) from error
            self._take(response)
        return self._buffer.popleft()

    def close(self) -> None:
        """End the stream; the server releases every message it still holds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._requests.put(_END)
        self._call.cancel()

    def _take(self, response: pb.SubscribeResponse) -> None:
        if response.code != pb.CODE_OK:
            self.close()
            if response.code == pb.CODE_UNAUTHENTICATED:
                self._client._renew(self._session)
            raise error_for_code(response.code, response.message)
        for result in response.ack_results:
            logger.warning(
                "ack of message %d on subscription to %s failed: %s",
                result.message_id,
                self.queue,
                pb.Code.Name(result.code),
            )
            self.failed_acks.append(result.message_id)
        for info in response.element_info:
            # Acks for this message go through the stream, not the Ack RPC.
            message = self._client._hold(self._session, self.queue, info, owner=self)
            with self._lock:
                self._open.add(info.message_id)
            self._buffer.append(message)

    def _finish(self, message: Message, ack_type: pb.AckType) -> None:
        with self._lock:
            if self._closed:
                raise ClientClosed("the subscription is closed; its messages were released")
            if message.message_id not in self._open or message._session is not self._session:
                raise MessageReleased("the stream this message was delivered on has ended")
            self._open.discard(message.message_id)
        self._client._unhold(self._session, [message.message_id])
        self._requests.put(
            pb.SubscribeRequest(
                ack=pb.SubscribeAck(message_ids=[message.message_id], ack_type=ack_type)
            )
        )

    def _request_stream(self) -> Iterator[pb.SubscribeRequest]:
        while True:
            request = self._requests.get()
            if request is _END:
                return
            yield request
