"""The session the client, its map views and its subscriptions share.

The session is the unit the server reasons about (what is in flight, what is released on
logout or expiry), so one object owns it: the channel and stub, the current login, and the
unary call that keeps that login current. When the server says the session is gone, the
call logs in again and *says so*, because every message the old session held went back to
the queue. ``QueueManagerClient`` composes this object with the views built on it
(``QMap``, ``Subscription``) and the heartbeat that keeps it alive; none of them reaches
into the client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

from ._channel import open_channel
from ._lifecycle import datetime_from_ms, required_datetime_from_ms
from ._login import check_server_key, encrypt_password
from ._message import Finisher, Login, Message
from ._retry import answer_retry_delays, retried_by_request_id, retried_on_unavailable_answer
from .errors import (
    ClientClosed,
    LeaseLost,
    MessageNotFound,
    MessageReleased,
    QMError,
    Unauthenticated,
    Unavailable,
    error_for_code,
    error_for_rpc_error,
)

__all__ = ["Session", "SessionLoss"]

logger = logging.getLogger("qm_client")


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


@dataclass(frozen=True)
class SessionLoss:
    """What the caller is told when the client had to log in again.

    ``released`` are the messages the lost session held: the server has put them back to
    ready, so their ``ack``/``nack`` now raise :class:`MessageReleased` and another
    consumer may already be working on them. Empty when the session held nothing.
    """

    released: tuple[Message, ...]
    generation: int


class Session:
    """A logged-in connection to the server; thread-safe.

    Logs in on construction (closing the channel again if that fails). ``timeout`` is the
    deadline of each call; ``closing`` is set once :meth:`shut` ran, so that waits (retry
    pauses, the heartbeat's interval) end at once.
    """

    def __init__(
        self,
        target: str,
        username: str,
        password: str,
        *,
        root_certificates: bytes | None,
        certificate_chain: bytes | None,
        private_key: bytes | None,
        pin_fingerprint: str | None,
        timeout: float,
        on_session_lost: Callable[[SessionLoss], None] | None,
    ) -> None:
        self.target = target
        self.username = username
        self.timeout = timeout
        self._password = password
        self._pin = pin_fingerprint
        self._on_session_lost = on_session_lost
        self.channel = open_channel(target, root_certificates, certificate_chain, private_key)
        self.stub = pb_grpc.QueueManagerServiceStub(self.channel)
        # Guards _login, _closed and every Login's held; never held across a network call.
        self._lock = threading.Lock()
        # Serializes logins, so that threads finding the same dead session log in once.
        self._login_lock = threading.Lock()
        self._closed = False
        self.closing = threading.Event()
        try:
            self._current_login = self._log_in(generation=1)
        except BaseException:
            self.channel.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def current(self) -> Login:
        """The login calls are made under now; :class:`ClientClosed` once shut."""
        with self._lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            return self._current_login

    def shut(self) -> Login | None:
        """Refuse further calls and end waits; returns the login to end, or ``None`` if
        already shut. The caller then stops its threads and calls :meth:`end`."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            login = self._current_login
        self.closing.set()
        return login

    def end(self, login: Login, *, logout: bool) -> None:
        """Log ``login`` out (unless told not to) and close the channel.

        A failed logout is logged, not raised: the session then ends by expiry, which
        releases the same messages later.
        """
        try:
            if logout:
                self._log_out(login)
        finally:
            self.channel.close()

    def _log_out(self, login: Login) -> None:
        try:
            response = self.send(
                self.stub.Logout, pb.LogoutRequest(token=login.token), self.timeout
            )
        except QMError as error:
            logger.warning("logout failed, the session will expire instead: %s", error)
            return
        if response.code not in (pb.CODE_OK, pb.CODE_UNAUTHENTICATED):
            failure = error_for_code(response.code, response.message)
            logger.warning("logout failed, the session will expire instead: %s", failure)

    # -- calls ----------------------------------------------------------------------------

    def send(
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

    def call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
        bound_to: Login | None = None,
    ) -> tuple[_Resp, Login]:
        """Make a token call, logging in again once if the session is gone, and making it
        again after a CODE_UNAVAILABLE answer if its method allows (``_retry.py``).

        A call answered UNAUTHENTICATED was not applied, so repeating it under a new
        session is safe for every method, except one that only makes sense in the session
        it names (``bound_to``: acks), which raises :class:`MessageReleased` instead.
        A call answered UNAVAILABLE was not applied either; it is repeated after a pause,
        up to the retry policy's attempts, each with the full deadline. An add with a
        request id is also repeated after a gRPC UNAVAILABLE status: the server answers a
        repeat of an applied one with its first ids.
        Returns the response with the login that answered it.
        """
        deadline = self.timeout if timeout is None else timeout
        login = self.current()
        if bound_to is not None and bound_to is not login:
            raise MessageReleased("the session this message was delivered to has ended")
        rpc = type(request).__name__.removesuffix("Request")
        retried = retried_on_unavailable_answer(rpc, request)
        pauses = answer_retry_delays() if retried else iter(())
        by_request_id = retried_by_request_id(rpc, request)
        renewed = False
        while True:
            request.token = login.token
            try:
                response = self.send(method, request, deadline)
            except Unavailable as error:
                if not by_request_id or (pause := next(pauses, None)) is None:
                    raise
                logger.debug("%s failed (%s); again in %.2f s", rpc, error, pause)
                if self.closing.wait(pause):
                    raise
                continue
            if response.code == pb.CODE_UNAUTHENTICATED and not renewed:
                login = self.renew(login)
                renewed = True
                if bound_to is not None:
                    raise MessageReleased("the session this message was delivered to has ended")
                continue
            if response.code != pb.CODE_UNAVAILABLE or (pause := next(pauses, None)) is None:
                break
            logger.debug(
                "%s answered UNAVAILABLE (%s); again in %.2f s", rpc, response.message, pause
            )
            if self.closing.wait(pause):  # closed meanwhile: report the last answer
                break
        if response.code != pb.CODE_OK and response.code not in accept:
            raise error_for_code(response.code, response.message)
        return response, login

    # -- logins ---------------------------------------------------------------------------

    def _log_in(self, generation: int) -> Login:
        challenge = self.send(self.stub.GetChallenge, pb.GetChallengeRequest(), self.timeout)
        if challenge.code != pb.CODE_OK:
            raise error_for_code(challenge.code, challenge.message)
        key = check_server_key(challenge, self._pin)
        request = pb.AuthRequest(
            username=self.username,
            password=encrypt_password(key, self._password, challenge.challenge),
        )
        response = self.send(self.stub.Auth, request, self.timeout)
        if response.code != pb.CODE_OK:
            raise error_for_code(response.code, response.message)
        return Login(
            token=response.token,
            ttl=response.session_ttl_ms / 1000,
            generation=generation,
            max_batch=response.max_batch,
            max_request_bytes=response.max_request_bytes,
        )

    def renew(self, stale: Login) -> Login:
        """Replace a dead login with a new one, unless another thread already did; report
        the loss of what the dead one held."""
        with self._login_lock:
            current = self.current()
            if current is not stale:
                return current
            try:
                fresh = self._log_in(generation=stale.generation + 1)
            except Unauthenticated as error:
                raise Unauthenticated(
                    f"session ended and logging in again failed: {error.message}",
                    code=error.code,
                ) from error
            with self._lock:
                closed = self._closed
                if not closed:
                    self._current_login = fresh
            if closed:
                # shut() ran during the login: end the new session too, or it would hold
                # whatever it is given until its ttl.
                self._log_out(fresh)
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

    # -- messages held ----------------------------------------------------------------------

    def hold(
        self,
        login: Login,
        queue: str,
        info: pb.ElementInfo | pb.PollResponse,
        owner: Finisher | None = None,
        lease_ms: int | None = None,
    ) -> Message:
        """Record a delivery, so that a lost session can say what it released.

        ``owner`` finishes the message; by default the session itself, with an ``Ack`` call.
        ``lease_ms`` is the ack deadline the call asked for, if it asked.
        """
        message = Message(
            element=info.element,
            message_id=info.message_id,
            delivery_count=info.delivery_count,
            queue=queue,
            enqueued_at=required_datetime_from_ms(info.enqueued_at_ms),
            lease_expires_at=datetime_from_ms(info.lease_expires_at_ms),
            _owner=self if owner is None else owner,
            _login=login,
            _lease_ms=lease_ms,
        )
        with self._lock:
            login.held[message.message_id] = message
        return message

    def unhold(self, login: Login, message_ids: Iterable[int]) -> None:
        """Forget deliveries that were finished or released."""
        with self._lock:
            for message_id in message_ids:
                login.held.pop(message_id, None)
                login.lost.pop(message_id, None)
                login.finishing.discard(message_id)

    # -- leases lost --------------------------------------------------------------------

    def mark_lost(self, message: Message, cause: QMError | None) -> bool:
        """The lease keeper lost this message's lease: its ack or nack will say so.

        ``False`` when the message is no longer held or its ack is under way: then the
        refusal the keeper got is the ack's doing, and nothing was lost.
        """
        login, message_id = message._login, message.message_id
        with self._lock:
            if message_id not in login.held or message_id in login.finishing:
                return False
            login.lost[message_id] = cause
            return True

    def check_lease(self, message: Message) -> None:
        """Before an ack or nack: raise :class:`LeaseLost` (and forget the message) if its
        lease was lost, else note that it is being finished."""
        login = message._login
        with self._lock:
            if message.message_id not in login.lost:
                login.finishing.add(message.message_id)
                return
            cause = login.lost.pop(message.message_id)
            login.held.pop(message.message_id, None)
        why = "it reached max_lease" if cause is None else f"an extension failed: {cause}"
        raise LeaseLost(
            f"the lease of message {message.message_id} was lost while it was handled ({why})",
            cause=cause,
        )

    def _finish(self, message: Message, ack_type: pb.AckType) -> None:
        """Finish a message delivered to the session by a unary call (``Finisher``)."""
        login = message._login
        if not isinstance(login, Login):
            raise TypeError("message was not delivered by this client")
        self.check_lease(message)
        request = pb.AckRequest(message_id=message.message_id, ack_type=ack_type)
        try:
            self.call(self.stub.Ack, request, bound_to=login)
        except MessageNotFound:
            # Already finished or released: either way no longer held here.
            self.unhold(login, [message.message_id])
            raise
        self.unhold(login, [message.message_id])
