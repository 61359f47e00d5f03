"""The Python client: one object per user session, thread-safe.

The session is the unit the server reasons about (what is in flight, what is released on
logout or expiry), so the client makes it explicit: it logs in once, keeps the session alive
from a heartbeat thread, and when the session is gone anyway it logs in again and *says so*,
because every message the old session held went back to the queue.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

from ._channel import open_channel
from ._login import check_server_key, encrypt_password
from ._retry import answer_retry_delays, retried_on_unavailable_answer
from .errors import (
    ClientClosed,
    MessageNotFound,
    MessageReleased,
    QMError,
    Unauthenticated,
    error_for_code,
    error_for_rpc_error,
)

if TYPE_CHECKING:
    from .maps import QMap
    from .subscribe import Subscription

__all__ = ["DEFAULT_TIMEOUT", "Message", "QueueManagerClient", "SessionLoss", "health"]

logger = logging.getLogger("qm_client")

DEFAULT_TIMEOUT = 10.0
"""Seconds every call may take before it fails with DeadlineExceeded (plus any wait)."""


class _TokenRequest(Protocol):
    token: str


class _Response(Protocol):
    @property
    def code(self) -> int: ...

    @property
    def message(self) -> str: ...


_Req = TypeVar("_Req", bound=_TokenRequest)
_AnyReq = TypeVar("_AnyReq")
_Resp = TypeVar("_Resp", bound=_Response)


class _Finisher(Protocol):
    def _finish(self, message: Message, ack_type: pb.AckType) -> None: ...


@dataclass(eq=False)
class _Session:
    """One server session. ``held`` is what the server will release when it ends."""

    token: str
    ttl: float
    generation: int
    held: dict[int, Message] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """A delivered message, in flight for the session that received it until finished.

    Immutable because it is a record of one delivery: a redelivery is a new ``Message``
    with a higher ``delivery_count``. Call exactly one of :meth:`ack` or :meth:`nack`.
    """

    element: str
    message_id: int
    delivery_count: int
    queue: str
    _owner: _Finisher = field(repr=False, compare=False)
    _session: object = field(repr=False, compare=False)

    def ack(self) -> None:
        """Done: the server removes the message for good.

        Raises :class:`MessageReleased` if the session it was delivered to has ended (the
        message is back in the queue, so processing it again elsewhere is expected), and
        :class:`MessageNotFound` if it was already finished.
        """
        self._owner._finish(self, pb.ACK_TYPE_DONE)

    def nack(self) -> None:
        """Failed: the message goes back to ready at its original place, to be redelivered.

        Raises as :meth:`ack`.
        """
        self._owner._finish(self, pb.ACK_TYPE_ERROR)


@dataclass(frozen=True)
class SessionLoss:
    """What the caller is told when the client had to log in again.

    ``released`` are the messages the lost session held: the server has put them back to
    ready, so their ``ack``/``nack`` now raise :class:`MessageReleased` and another
    consumer may already be working on them. Empty when the session held nothing.
    """

    released: tuple[Message, ...]
    generation: int


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
        self._password = password
        self._pin = pin_fingerprint
        self._timeout = timeout
        self._on_session_lost = on_session_lost
        self._channel = open_channel(target, root_certificates, certificate_chain, private_key)
        self._stub = pb_grpc.QueueManagerServiceStub(self._channel)
        # Guards _session and _closed; never held across a network call.
        self._lock = threading.Lock()
        # Serializes logins, so that threads finding the same dead session log in once.
        self._login_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        try:
            self._session = self._login(generation=1)
        except BaseException:
            self._channel.close()
            raise
        if heartbeat:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop,
                name=f"qm-heartbeat-{username}@{target}",
                daemon=True,
            )
            self._heartbeat_thread.start()

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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session = self._session
        self._stop.set()
        thread = self._heartbeat_thread
        # The heartbeat thread itself may close (from on_session_lost); it cannot join itself.
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        try:
            if logout:
                self._logout(session)
        finally:
            self._channel.close()

    def _logout(self, session: _Session) -> None:
        try:
            response = self._send(
                self._stub.Logout, pb.LogoutRequest(token=session.token), self._timeout
            )
        except QMError as error:
            logger.warning("logout failed, the session will expire instead: %s", error)
            return
        if response.code not in (pb.CODE_OK, pb.CODE_UNAUTHENTICATED):
            failure = error_for_code(response.code, response.message)
            logger.warning("logout failed, the session will expire instead: %s", failure)

    @property
    def token(self) -> str:
        """The current session token, for tools that speak the wire protocol directly."""
        return self._current().token

    @property
    def session_ttl(self) -> float:
        """Seconds of inactivity after which the server ends the session."""
        return self._current().ttl

    # -- queues ---------------------------------------------------------------------------

    def new_queue(self, name: str, *, exist_ok: bool = False) -> None:
        """Create an empty queue; the only way a queue comes to exist.

        Raises :class:`QueueAlreadyExists` unless ``exist_ok``.
        """
        accept = (pb.CODE_QUEUE_ALREADY_EXISTS,) if exist_ok else ()
        self._call(self._stub.NewQueue, pb.NewQueueRequest(queue_name=name), accept=accept)

    def add(self, queue: str, element: str) -> int:
        """Append one message and return its id. Not retried: a retry could add it twice."""
        response, _ = self._call(self._stub.Add, pb.AddRequest(queue_name=queue, element=element))
        return response.message_id

    def add_all(self, queue: str, elements: Iterable[str]) -> list[int]:
        """Append several messages atomically (all or none); ids in the same order."""
        request = pb.AddAllRequest(queue_name=queue, elements=list(elements))
        response, _ = self._call(self._stub.AddAll, request)
        return list(response.message_ids)

    def poll(self, queue: str, *, wait: float = 0.0) -> Message | None:
        """Take the oldest ready message, or ``None`` if none is ready within ``wait`` s.

        The message stays in flight for this session until acked, nacked, or the session
        ends. The server caps ``wait`` (20 s by default).
        """
        request = pb.PollRequest(queue_name=queue, wait_ms=_millis(wait))
        response, session = self._call(
            self._stub.Poll, request, timeout=self._timeout + wait, accept=(pb.CODE_QUEUE_EMPTY,)
        )
        if response.code == pb.CODE_QUEUE_EMPTY:
            return None
        return self._hold(session, queue, response)

    def pull(self, queue: str, max_count: int, *, wait: float = 0.0) -> list[Message]:
        """Take up to ``max_count`` of the oldest ready messages; ``[]`` if none is ready.

        Waits up to ``wait`` s for the first one; returns what is ready then, not a full
        batch.
        """
        request = pb.PullElementsRequest(queue_name=queue, number=max_count, wait_ms=_millis(wait))
        response, session = self._call(
            self._stub.PullElements,
            request,
            timeout=self._timeout + wait,
            accept=(pb.CODE_QUEUE_EMPTY,),
        )
        return [self._hold(session, queue, info) for info in response.element_info]

    def ack(self, message: Message) -> None:
        """Same as ``message.ack()``.

        Finished by the message's owner: a subscription's message goes on its stream,
        which must learn that it has room again (a unary Ack would leave the stream
        counting it as held, and a full window would push nothing more).
        """
        message._owner._finish(message, pb.ACK_TYPE_DONE)

    def nack(self, message: Message) -> None:
        """Same as ``message.nack()``; finished by its owner, as for :meth:`ack`."""
        message._owner._finish(message, pb.ACK_TYPE_ERROR)

    def ack_many(self, messages: Iterable[Message], *, nack: bool = False) -> list[Message]:
        """Finish many messages in one durable step (BatchAck); return those that failed.

        A message fails when its session has ended (it was released) or the server no
        longer has it in flight for this session. Failures are returned rather than raised
        because the others were finished all the same.
        """
        batch = list(messages)
        ack_type = pb.ACK_TYPE_ERROR if nack else pb.ACK_TYPE_DONE
        failed: list[Message] = []
        # Messages from a subscription are finished on their stream, which must learn that
        # it has room again.
        for message in [m for m in batch if m._owner is not self]:
            try:
                message._owner._finish(message, ack_type)
            except MessageNotFound:
                failed.append(message)
        batch = [m for m in batch if m._owner is self]
        if not batch:
            return failed
        session = self._current()
        current = [m for m in batch if m._session is session]
        failed.extend(m for m in batch if m._session is not session)
        if not current:
            return failed
        request = pb.BatchAckRequest(message_ids=[m.message_id for m in current], ack_type=ack_type)
        try:
            response, _ = self._call(self._stub.BatchAck, request, bound_to=session)
        except MessageReleased:
            return failed + current
        by_id = {m.message_id: m for m in current}
        self._unhold(session, by_id)
        failed.extend(
            by_id[result.message_id]
            for result in response.results
            if result.code != pb.CODE_OK and result.message_id in by_id
        )
        return failed

    def size(self, queue: str) -> int:
        """The number of ready messages (in-flight ones are not counted)."""
        response, _ = self._call(self._stub.Size, pb.SizeRequest(queue_name=queue))
        return response.size

    def is_empty(self, queue: str) -> bool:
        """Whether no message is ready (messages may still be in flight)."""
        response, _ = self._call(self._stub.IsEmpty, pb.IsEmptyRequest(queue_name=queue))
        return response.empty

    def unacked(self, queue: str) -> int:
        """The number of messages in flight over all sessions (seed: get_uncheck_num)."""
        response, _ = self._call(
            self._stub.GetUncheckNum, pb.GetUncheckNumRequest(queue_name=queue)
        )
        return response.ack_num

    def destroy_queue(self, queue: str, *, force: bool = False) -> None:
        """Delete a queue. Without ``force``, :class:`QueueNotEmpty` while it holds messages."""
        self._call(self._stub.DestroyQueue, pb.DestroyQueueRequest(queue_name=queue, force=force))

    def subscribe(self, queue: str, max_unacked: int = 16) -> Subscription:
        """Stream messages as they arrive, at most ``max_unacked`` held at once.

        Iterate the returned object; ack or nack each message to make room for the next.
        Closing it (or leaving its ``with`` block) releases what it still holds.
        """
        from .subscribe import Subscription

        return Subscription(self, queue, max_unacked)

    # -- maps -----------------------------------------------------------------------------

    def map(self, name: str, *, page_size: int = 500) -> QMap:
        """A ``MutableMapping`` view of a map; no call is made until it is used."""
        from .maps import QMap

        return QMap(self, name, page_size=page_size)

    # -- plumbing -------------------------------------------------------------------------

    def _current(self) -> _Session:
        with self._lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            return self._session

    def _send(
        self,
        method: grpc.UnaryUnaryMultiCallable[_AnyReq, _Resp],
        request: _AnyReq,
        timeout: float,
    ) -> _Resp:
        """One attempt at the transport level; gRPC failures become typed errors."""
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise error_for_rpc_error(error) from error
        except ValueError as error:
            # grpc raises ValueError for a call on a closed channel.
            if self._closed:
                raise ClientClosed("the client is closed") from error
            raise

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
        bound_to: _Session | None = None,
    ) -> tuple[_Resp, _Session]:
        """Make a token call, logging in again once if the session is gone, and making it
        again after a CODE_UNAVAILABLE answer if its method allows (``_retry.py``).

        A call answered UNAUTHENTICATED was not applied, so repeating it under a new
        session is safe for every method, except one that only makes sense in the session
        it names (``bound_to``: acks), which raises :class:`MessageReleased` instead.
        A call answered UNAVAILABLE was not applied either; it is repeated after a pause,
        up to the retry policy's attempts, each with the full deadline.
        Returns the response with the session that answered it.
        """
        deadline = self._timeout if timeout is None else timeout
        session = self._current()
        if bound_to is not None and bound_to is not session:
            raise MessageReleased("the session this message was delivered to has ended")
        rpc = type(request).__name__.removesuffix("Request")
        pauses = answer_retry_delays() if retried_on_unavailable_answer(rpc) else iter(())
        renewed = False
        while True:
            request.token = session.token
            response = self._send(method, request, deadline)
            if response.code == pb.CODE_UNAUTHENTICATED and not renewed:
                session = self._renew(session)
                renewed = True
                if bound_to is not None:
                    raise MessageReleased("the session this message was delivered to has ended")
                continue
            if response.code != pb.CODE_UNAVAILABLE or (pause := next(pauses, None)) is None:
                break
            logger.debug(
                "%s answered UNAVAILABLE (%s); again in %.2f s", rpc, response.message, pause
            )
            if self._stop.wait(pause):  # closed meanwhile: report the last answer
                break
        if response.code != pb.CODE_OK and response.code not in accept:
            raise error_for_code(response.code, response.message)
        return response, session

    def _login(self, generation: int) -> _Session:
        challenge = self._send(self._stub.GetChallenge, pb.GetChallengeRequest(), self._timeout)
        if challenge.code != pb.CODE_OK:
            raise error_for_code(challenge.code, challenge.message)
        key = check_server_key(challenge, self._pin)
        request = pb.AuthRequest(
            username=self.username,
            password=encrypt_password(key, self._password, challenge.challenge),
        )
        response = self._send(self._stub.Auth, request, self._timeout)
        if response.code != pb.CODE_OK:
            raise error_for_code(response.code, response.message)
        return _Session(
            token=response.token, ttl=response.session_ttl_ms / 1000, generation=generation
        )

    def _renew(self, stale: _Session) -> _Session:
        """Replace a dead session with a new login, unless another thread already did."""
        with self._login_lock:
            current = self._current()
            if current is not stale:
                return current
            try:
                fresh = self._login(generation=stale.generation + 1)
            except Unauthenticated as error:
                raise Unauthenticated(
                    f"session ended and logging in again failed: {error.message}",
                    code=error.code,
                ) from error
            with self._lock:
                closed = self._closed
                if not closed:
                    self._session = fresh
            if closed:
                # close() ran during the login: end the new session too, or it would hold
                # whatever it is given until its ttl.
                self._logout(fresh)
                raise ClientClosed("the client is closed")
        loss = SessionLoss(released=tuple(stale.held.values()), generation=fresh.generation)
        self._report(loss)
        return fresh

    def _report(self, loss: SessionLoss) -> None:
        if self._on_session_lost is None:
            logger.warning(
                "session of %s@%s ended; logged in again; %d held message(s) were released: %s",
                self.username,
                self.target,
                len(loss.released),
                [m.message_id for m in loss.released],
            )
            return
        try:
            self._on_session_lost(loss)
        except Exception:
            # The callback runs on the heartbeat thread too; a bug in it must not stop
            # the heartbeat, but it must be seen.
            logger.exception("on_session_lost callback failed")

    def _hold(
        self,
        session: _Session,
        queue: str,
        info: pb.ElementInfo | pb.PollResponse,
        owner: _Finisher | None = None,
    ) -> Message:
        """Record a delivery, so that a lost session can say what it released."""
        message = Message(
            element=info.element,
            message_id=info.message_id,
            delivery_count=info.delivery_count,
            queue=queue,
            _owner=self if owner is None else owner,
            _session=session,
        )
        with self._lock:
            session.held[message.message_id] = message
        return message

    def _finish(self, message: Message, ack_type: pb.AckType) -> None:
        session = message._session
        if not isinstance(session, _Session):
            raise TypeError("message was not delivered by this client")
        request = pb.AckRequest(message_id=message.message_id, ack_type=ack_type)
        try:
            self._call(self._stub.Ack, request, bound_to=session)
        except MessageNotFound:
            # Already finished or released: either way no longer held here.
            self._unhold(session, [message.message_id])
            raise
        self._unhold(session, [message.message_id])

    def _unhold(self, session: _Session, message_ids: Iterable[int]) -> None:
        with self._lock:
            for message_id in message_ids:
                session.held.pop(message_id, None)

    def _heartbeat_loop(self) -> None:
        """Renew the session at a jittered third of its ttl until close.

        Heartbeats are sent even while other calls are active, because a long poll may
        count as activity only when it starts. Failures are logged and retried on the
        next beat; a lost session is renewed and reported by ``_call``.
        """
        while True:
            try:
                ttl = self._current().ttl
            except ClientClosed:
                return
            interval = max(ttl / 3, 0.05)
            if self._stop.wait(interval * random.uniform(0.7, 1.0)):
                return
            try:
                self._call(
                    self._stub.HeartBeat, pb.HeartBeatRequest(), timeout=min(self._timeout, ttl / 2)
                )
            except ClientClosed:
                return
            except QMError as error:
                logger.warning("heartbeat for %s@%s failed: %s", self.username, self.target, error)
            except Exception:
                # Not a service error (a re-login that cannot parse the server's key, say):
                # a dead heartbeat would let the session lapse with no word, so log it and
                # beat again on the next interval.
                logger.exception("heartbeat for %s@%s failed", self.username, self.target)


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
