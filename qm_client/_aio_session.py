"""The asyncio client's session: ``Session`` with ``grpc.aio`` calls.

The rules are the sync session's (``_session_core.py``: state, the call protocol, the
messages held; ``_ops.py``: the operations); this module only awaits the calls. Logging in
needs the event loop, so it happens in :meth:`AsyncSession.open`, not the constructor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

from ._channel import open_aio_channel
from ._login import auth_request, login_from
from ._message import AsyncMessage, Login
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

__all__ = ["AsyncSession"]

_T = TypeVar("_T")


class AsyncSession(SessionCore[AsyncMessage]):
    """A logged-in ``grpc.aio`` connection; use it from one event loop."""

    message_type = AsyncMessage

    def __init__(
        self, endpoint: Endpoint, on_session_lost: Callable[[SessionLoss], None] | None
    ) -> None:
        super().__init__(endpoint, on_session_lost)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.QueueManagerServiceStub | None = None
        # Serializes logins, so that tasks finding the same dead session log in once.
        self._login_lock = asyncio.Lock()
        self.closing = asyncio.Event()

    @property
    def stub(self) -> pb_grpc.QueueManagerServiceStub:
        if self._stub is None:
            raise ClientClosed("the client is not logged in: await login() or use async with")
        return self._stub

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the channel and log in (closing the channel again if that fails)."""
        if self._channel is not None:
            return
        self._channel = open_aio_channel(
            self.target, *self.endpoint.tls, load_balancing=self.endpoint.load_balancing
        )
        self._stub = pb_grpc.QueueManagerServiceStub(self._channel)
        try:
            self.adopt(await self._log_in(generation=1))
        except BaseException:
            await self._channel.close()
            self._channel = self._stub = None
            raise

    def shut(self) -> Login | None:
        """Refuse further calls and end waits; returns the login to end, or ``None`` if
        already shut (or never logged in)."""
        login = self.shut_login()
        self.closing.set()
        return login

    async def end(self, login: Login | None, *, logout: bool) -> None:
        """Log ``login`` out (unless told not to) and close the channel; a failed logout
        is logged, not raised (the session then ends by expiry)."""
        try:
            if logout and login is not None:
                await self._log_out(login)
        finally:
            if self._channel is not None:
                await self._channel.close()

    async def _log_out(self, login: Login) -> None:
        try:
            request = pb.LogoutRequest(token=login.token)
            response = await self.send(self.stub.Logout, request, self.timeout)
        except QMError as error:
            logger.warning("logout failed, the session will expire instead: %s", error)
            return
        check_logout(response)

    # -- calls ----------------------------------------------------------------------------

    async def send(self, method: Any, request: Any, timeout: float) -> Any:
        """One attempt at the transport level; gRPC failures become typed errors."""
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise error_for_rpc_error(error) from error
        except grpc.aio.UsageError as error:
            # grpc.aio's answer to a call on a closed channel.
            raise ClientClosed("the client is closed") from error

    async def run(self, plan: Plan[_T]) -> _T:
        """Make the call of an operation (``_ops.py``) and return its result."""
        if isinstance(plan, Done):
            return plan.value
        try:
            response, login = await self.call(
                getattr(self.stub, plan.rpc),
                plan.request,
                timeout=self.timeout + plan.wait,
                accept=plan.accept,
                bound_to=plan.bound_to,
            )
        except QMError as error:
            return plan.failed(error)
        return plan.result(response, login)

    async def pages(self, first: Op[Page[_T]]) -> AsyncIterator[_T]:
        """The items of a listing, a call per page."""
        op: Op[Page[_T]] | None = first
        while op is not None:
            page = await self.run(op)
            for item in page.items:
                yield item
            op = page.next

    async def call(
        self,
        method: Any,
        request: Any,
        *,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
        bound_to: Login | None = None,
    ) -> tuple[Any, Login]:
        """``Session.call``, awaited: the same ``call_steps``, driven with ``grpc.aio``."""
        deadline = self.timeout if timeout is None else timeout
        stepper = Stepper(call_steps(self, request, deadline, accept, bound_to))
        while (action := stepper.next()) is not None:
            try:
                if isinstance(action, Send):
                    stepper.done(await self.send(method, action.request, action.timeout))
                elif isinstance(action, Pause):
                    stepper.done(await self.closed_within(action.seconds))
                else:
                    stepper.done(await self.renew(action.login))
            except QMError as error:
                stepper.failed(error)
        return stepper.answer()

    async def closed_within(self, seconds: float) -> bool:
        """Wait ``seconds``; ``True`` (at once) if the session is shut meanwhile."""
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # -- logins ---------------------------------------------------------------------------

    async def _log_in(self, generation: int) -> Login:
        challenge = await self.send(self.stub.GetChallenge, pb.GetChallengeRequest(), self.timeout)
        request = auth_request(challenge, self.endpoint)
        return login_from(await self.send(self.stub.Auth, request, self.timeout), generation)

    async def renew(self, stale: Login) -> Login:
        """Replace a dead login with a new one, unless another task already did; report
        the loss of what the dead one held."""
        async with self._login_lock:
            current = self.current()
            if current is not stale:
                return current
            try:
                fresh = await self._log_in(generation=stale.generation + 1)
            except Unauthenticated as error:
                raise relogin_failed(error) from error
            if not self.adopt(fresh):
                await self._log_out(fresh)
                raise ClientClosed("the client is closed")
        self.lost(stale, fresh)
        return fresh

    # -- finishing --------------------------------------------------------------------------

    async def _finish(self, message: AsyncMessage, ack_type: pb.AckType) -> None:
        """Finish a message delivered to the session by a unary call (``AsyncFinisher``)."""
        await self.run(ack(self, message, ack_type))
