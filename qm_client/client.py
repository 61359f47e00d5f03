"""The Python client: one object per user session, thread-safe.

``QueueManagerClient`` composes parts that each have one job. Each part is given the
shared session, not the client, so none of them imports this module:

- ``_session.py``: the session (channel, current login, the unary call that logs in again
  and reports a lost session, the messages held);
- ``_heartbeat.py``: the thread that keeps the session alive;
- ``maps.py`` (``QMap``) and ``subscribe.py`` (``Subscription``): views built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qm.v1 import queue_manager_pb2 as pb

from ._channel import open_channel
from ._heartbeat import Heartbeat
from ._message import Message
from ._session import Session, SessionLoss
from .errors import MessageNotFound, MessageReleased, error_for_rpc_error
from .maps import QMap
from .subscribe import Subscription

__all__ = ["DEFAULT_TIMEOUT", "Message", "QueueManagerClient", "SessionLoss", "health"]

DEFAULT_TIMEOUT = 10.0
"""Seconds every call may take before it fails with DeadlineExceeded (plus any wait)."""


class QueueManagerClient:
    """A logged-in session with a queue manager server.

    Logging in happens in the constructor, so a wrong password or an unreachable server
    fails here rather than on first use. Use it as a context manager, or call
    :meth:`close`: closing logs out, which hands every message still held back to the queue
    at once instead of after the session ttl.

    Args:
        target: ``host:port`` of the server.
        username: The user to log in as.
        password: Its password; it only ever travels RSA-OAEP encrypted with a one-use
            challenge, so a captured login cannot be replayed.
        root_certificates: PEM roots to verify a TLS server with. With neither these nor
            a client certificate the channel is plaintext; with only a client certificate,
            the system's roots verify the server.
        certificate_chain: PEM certificate chain of this client, for a server that
            requires mutual TLS; goes with ``private_key``.
        private_key: PEM private key of that certificate.
        pin_fingerprint: Hex SHA-256 of the server's login key (the server logs it at
            start). When given, a server with any other key gets no password:
            :class:`FingerprintMismatch`.
        timeout: Deadline in seconds for each call; waits asked of ``poll``/``pull`` are
            added to it.
        heartbeat: Keep the session alive from a background thread. Turn off only when
            the caller makes calls often enough itself.
        on_session_lost: Called (from whichever thread noticed) after the client logged in
            again because its session had ended. Without it, the loss is logged at
            WARNING on the ``qm_client`` logger.
    """

    def __init__(
        self,
        target: str,
        username: str,
        password: str,
        *,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        pin_fingerprint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: bool = True,
        on_session_lost: Callable[[SessionLoss], None] | None = None,
    ) -> None:
        self.target = target
        self.username = username
        self._session = Session(
            target,
            username,
            password,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            pin_fingerprint=pin_fingerprint,
            timeout=timeout,
            on_session_lost=on_session_lost,
        )
        self._stub = self._session.stub
        self._heartbeat: Heartbeat | None = None
        if heartbeat:
            self._heartbeat = Heartbeat(self._session)
            self._heartbeat.start()

    # -- lifecycle ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"QueueManagerClient({self.target!r}, user={self.username!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, *, logout: bool = True) -> None:
        """Stop the heartbeat, log out and close the channel. Safe to call twice.

        ``logout=False`` leaves the session alive on the server until its ttl runs out
        (``qm token`` hands that session to another tool). A failed logout is logged, not
        raised: the session then ends by expiry, which releases the same messages later.
        """
        login = self._session.shut()
        if login is None:
            return
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._session.end(login, logout=logout)

    @property
    def token(self) -> str:
        """The current session token, for tools that speak the wire protocol directly."""
        return self._session.current().token

    @property
    def session_ttl(self) -> float:
        """Seconds of inactivity after which the server ends the session."""
        return self._session.current().ttl

    # -- queues ---------------------------------------------------------------------------

    def new_queue(self, name: str, *, exist_ok: bool = False) -> None:
        """Create an empty queue; the only way a queue comes to exist.

        Raises :class:`QueueAlreadyExists` unless ``exist_ok``.
        """
        accept = (pb.CODE_QUEUE_ALREADY_EXISTS,) if exist_ok else ()
        self._session.call(self._stub.NewQueue, pb.NewQueueRequest(queue_name=name), accept=accept)

    def add(self, queue: str, element: str) -> int:
        """Append one message and return its id. Not retried: a retry could add it twice."""
        response, _ = self._session.call(
            self._stub.Add, pb.AddRequest(queue_name=queue, element=element)
        )
        return response.message_id

    def add_all(self, queue: str, elements: Iterable[str]) -> list[int]:
        """Append several messages atomically (all or none); ids in the same order."""
        request = pb.AddAllRequest(queue_name=queue, elements=list(elements))
        response, _ = self._session.call(self._stub.AddAll, request)
        return list(response.message_ids)

    def poll(self, queue: str, *, wait: float = 0.0) -> Message | None:
        """Take the oldest ready message, or ``None`` if none is ready within ``wait`` s.

        The message stays in flight for the client's session until acked, nacked, or the session
        ends. The server caps ``wait`` (20 s by default).
        """
        request = pb.PollRequest(queue_name=queue, wait_ms=_millis(wait))
        response, login = self._session.call(
            self._stub.Poll,
            request,
            timeout=self._session.timeout + wait,
            accept=(pb.CODE_QUEUE_EMPTY,),
        )
        if response.code == pb.CODE_QUEUE_EMPTY:
            return None
        return self._session.hold(login, queue, response)

    def pull(self, queue: str, max_count: int, *, wait: float = 0.0) -> list[Message]:
        """Take up to ``max_count`` of the oldest ready messages; ``[]`` if none is ready.

        Waits up to ``wait`` s for the first one; returns what is ready then, not a full
        batch.
        """
        request = pb.PullElementsRequest(queue_name=queue, number=max_count, wait_ms=_millis(wait))
        response, login = self._session.call(
            self._stub.PullElements,
            request,
            timeout=self._session.timeout + wait,
            accept=(pb.CODE_QUEUE_EMPTY,),
        )
        return [self._session.hold(login, queue, info) for info in response.element_info]

    def ack(self, message: Message) -> None:
        """Same as ``message.ack()``.

        Finished by the message's owner: a subscription's message goes on its stream,
        which must learn that it has room again (a unary Ack would leave the stream
        counting it as held, and a full window would push nothing more).
        """
        message.ack()

    def nack(self, message: Message) -> None:
        """Same as ``message.nack()``; finished by its owner, as for :meth:`ack`."""
        message.nack()

    def ack_many(self, messages: Iterable[Message], *, nack: bool = False) -> list[Message]:
        """Finish many messages in one durable step (BatchAck); return those that failed.

        A message fails when its session has ended (it was released) or the server no
        longer has it in flight for the client's session. Failures are returned rather than raised
        because the others were finished all the same.
        """
        batch = list(messages)
        ack_type = pb.ACK_TYPE_ERROR if nack else pb.ACK_TYPE_DONE
        failed: list[Message] = []
        # Messages from a subscription are finished on their stream, which must learn that
        # it has room again.
        for message in [m for m in batch if m._owner is not self._session]:
            try:
                if nack:
                    message.nack()
                else:
                    message.ack()
            except MessageNotFound:
                failed.append(message)
        batch = [m for m in batch if m._owner is self._session]
        if not batch:
            return failed
        login = self._session.current()
        current = [m for m in batch if m._login is login]
        failed.extend(m for m in batch if m._login is not login)
        if not current:
            return failed
        request = pb.BatchAckRequest(message_ids=[m.message_id for m in current], ack_type=ack_type)
        try:
            response, _ = self._session.call(self._stub.BatchAck, request, bound_to=login)
        except MessageReleased:
            return failed + current
        by_id = {m.message_id: m for m in current}
        self._session.unhold(login, by_id)
        failed.extend(
            by_id[result.message_id]
            for result in response.results
            if result.code != pb.CODE_OK and result.message_id in by_id
        )
        return failed

    def size(self, queue: str) -> int:
        """The number of ready messages (in-flight ones are not counted)."""
        response, _ = self._session.call(self._stub.Size, pb.SizeRequest(queue_name=queue))
        return response.size

    def is_empty(self, queue: str) -> bool:
        """Whether no message is ready (messages may still be in flight)."""
        response, _ = self._session.call(self._stub.IsEmpty, pb.IsEmptyRequest(queue_name=queue))
        return response.empty

    def unacked(self, queue: str) -> int:
        """The number of messages in flight over all sessions (seed: get_uncheck_num)."""
        response, _ = self._session.call(
            self._stub.GetUncheckNum, pb.GetUncheckNumRequest(queue_name=queue)
        )
        return response.ack_num

    def destroy_queue(self, queue: str, *, force: bool = False) -> None:
        """Delete a queue. Without ``force``, :class:`QueueNotEmpty` while it holds messages."""
        self._session.call(
            self._stub.DestroyQueue, pb.DestroyQueueRequest(queue_name=queue, force=force)
        )

    def subscribe(self, queue: str, max_unacked: int = 16) -> Subscription:
        """Stream messages as they arrive, at most ``max_unacked`` held at once.

        Iterate the returned object; ack or nack each message to make room for the next.
        Closing it (or leaving its ``with`` block) releases what it still holds.
        """
        return Subscription(self._session, queue, max_unacked)

    # -- maps -----------------------------------------------------------------------------

    def map(self, name: str, *, page_size: int = 500) -> QMap:
        """A ``MutableMapping`` view of a map; no call is made until it is used."""
        return QMap(self._session, name, page_size=page_size)


def _millis(seconds: float) -> int:
    return round(seconds * 1000)


def health(
    target: str,
    service: str = "",
    *,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """The ``grpc.health.v1`` status of ``service`` (``""`` for the whole server).

    Needs no login, so monitors can call it. Returns the status name, e.g. ``SERVING``.
    TLS arguments as for :class:`QueueManagerClient`.
    """
    with open_channel(target, root_certificates, certificate_chain, private_key) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            raise error_for_rpc_error(error) from error
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name
