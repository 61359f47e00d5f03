"""The session the client, its map views and its subscriptions share (blocking calls).

The session is the unit the server reasons about (what is in flight, what is released on
logout or expiry), so one object owns it: the channel and stub, the current login, and the
unary call that keeps that login current. When the server says the session is gone, the
call logs in again and *says so*, because every message the old session held went back to
the queue. The rules live in ``_session_core.py`` (state and decisions) and ``_ops.py``
(the operations), shared with the asyncio client; this module only makes the calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

from ._channel import open_channel
from ._login import auth_request, login_from
from ._message import Login, Message
from ._ops import Done, Op, Page, Plan, ack
from ._session_core import (
    Endpoint,
    Pause,
    Send,
    SessionCore,
    SessionLoss,
    Stepper,
    call_steps,
    check_logout,
    logger,
    relogin_failed,
)
from .errors import ClientClosed, QMError, Unauthenticated, error_for_rpc_error

__all__ = ["Session", "SessionLoss"]

_T = TypeVar("_T")


class Session(SessionCore[Message]):
    """A logged-in connection to the server; thread-safe.

    Logs in on construction (closing the channel again if that fails). ``timeout`` is the
    deadline of each call; ``closing`` is set once :meth:`shut` ran, so that waits (retry
    pauses, the heartbeat's interval) end at once.
    """

    message_type = Message

    def __init__(
        self, endpoint: Endpoint, on_session_lost: Callable[[SessionLoss], None] | None
    ) -> None:
        super().__init__(endpoint, on_session_lost)
        self.channel = open_channel(
            endpoint.target, *endpoint.tls, load_balancing=endpoint.load_balancing
        )
        self.stub = pb_grpc.QueueManagerServiceStub(self.channel)
        # Serializes logins, so that threads finding the same dead session log in once.
        self._login_lock = threading.Lock()
        self.closing = threading.Event()
        try:
            self.adopt(self._log_in(generation=1))
        except BaseException:
            self.channel.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def shut(self) -> Login | None:
        """Refuse further calls and end waits; returns the login to end, or ``None`` if
        already shut. The caller then stops its threads and calls :meth:`end`."""
        login = self.shut_login()
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
        check_logout(response)

    # -- calls ----------------------------------------------------------------------------

    def send(self, method: Any, request: Any, timeout: float) -> Any:
        """One attempt at the transport level; gRPC failures become typed errors."""
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise error_for_rpc_error(error) from error
        except ValueError as error:
            # grpc raises ValueError for a call on a closed channel.
            if self.closed:
                raise ClientClosed("the client is closed") from error
            raise

    def run(self, plan: Plan[_T]) -> _T:
        """Make the call of an operation (``_ops.py``) and return its result."""
        if isinstance(plan, Done):
            return plan.value
        try:
            response, login = self.call(
                getattr(self.stub, plan.rpc),
                plan.request,
                timeout=self.timeout + plan.wait,
                accept=plan.accept,
                bound_to=plan.bound_to,
            )
        except QMError as error:
            return plan.failed(error)
        return plan.result(response, login)

    def pages(self, first: Op[Page[_T]]) -> Iterator[_T]:
        """The items of a listing, a call per page."""
        op: Op[Page[_T]] | None = first
        while op is not None:
            page = self.run(op)
            yield from page.items
            op = page.next

    def call(
        self,
        method: Any,
        request: Any,
        *,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
        bound_to: Login | None = None,
    ) -> tuple[Any, Login]:
        """Make a token call of ``method`` (``call_steps``: logging in again once if the
        session is gone, repeating after an UNAVAILABLE answer if its method allows).
        Returns the response with the login that answered it.
        """
        deadline = self.timeout if timeout is None else timeout
        stepper = Stepper(call_steps(self, request, deadline, accept, bound_to))
        while (action := stepper.next()) is not None:
            try:
                if isinstance(action, Send):
                    stepper.done(self.send(method, action.request, action.timeout))
                elif isinstance(action, Pause):
                    stepper.done(self.closing.wait(action.seconds))
                else:
                    stepper.done(self.renew(action.login))
            except QMError as error:
                stepper.failed(error)
        return stepper.answer()

    # -- logins ---------------------------------------------------------------------------

    def _log_in(self, generation: int) -> Login:
        challenge = self.send(self.stub.GetChallenge, pb.GetChallengeRequest(), self.timeout)
        request = auth_request(challenge, self.endpoint)
        return login_from(self.send(self.stub.Auth, request, self.timeout), generation)

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
                raise relogin_failed(error) from error
            if not self.adopt(fresh):
                self._log_out(fresh)
                raise ClientClosed("the client is closed")
        self.lost(stale, fresh)
        return fresh

    # -- finishing --------------------------------------------------------------------------

    def _finish(self, message: Message, ack_type: pb.AckType) -> None:
        """Finish a message delivered to the session by a unary call (``Finisher``)."""
        self.run(ack(self, message, ack_type))
