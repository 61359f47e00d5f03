"""The asyncio client: ``AsyncQueueManagerClient``, the sync client's surface, awaited.

    async with AsyncQueueManagerClient("localhost:50051", "admin", password) as qm:
        await qm.add("jobs", "hello")
        async for message in qm.subscribe("jobs"):
            print(message.element)
            await message.ack()

Built on ``grpc.aio``, in one event loop: no thread of its own. It shares its rules with
:class:`QueueManagerClient` rather than copying them: the operations (``_ops.py``), the
call protocol and session state (``_session_core.py``), the login (``_login.py``), the
lease bookkeeping (``_lease_book.py``) and the subscription state
(``_subscription_core.py``). Here are only the awaits: ``_aio_session.py`` (the calls),
``_aio_heartbeat.py`` and ``_aio_lease_keeper.py`` (tasks), ``aio_maps.py`` and
``aio_subscribe.py`` (views).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Self, TypeVar

import qm_client._ops as ops

from ._aio_heartbeat import AsyncHeartbeat
from ._aio_lease_keeper import AsyncLeaseGuard, AsyncLeaseKeeper
from ._aio_session import AsyncSession
from ._client_base import DEFAULT_PAGE_SIZE, ClientBase
from ._lifecycle import (
    AddedIds,
    DeadLetter,
    LeaseResult,
    QueueInfo,
    QueueSettings,
    QueueSummary,
    RedriveResult,
)
from ._message import AsyncMessage
from ._sessions import SessionStatus, SessionSummary
from .aio_maps import AsyncQMap
from .aio_subscribe import AsyncSubscription
from .errors import ClientClosed, MessageNotFound, QMError

__all__ = ["AsyncQueueManagerClient"]

_T = TypeVar("_T")


class AsyncQueueManagerClient(ClientBase[AsyncMessage]):
    """A session with a queue manager server, for asyncio code.

    Construction makes no call; logging in does, so use ``async with`` (which logs in on
    entry and closes on exit), ``await AsyncQueueManagerClient.connect(...)``, or
    ``await client.login()``. Arguments and behaviour are those of
    :class:`QueueManagerClient`, except that the heartbeat and the lease keeper are
    tasks of the running event loop, and the callbacks run in it. Every method is a
    coroutine (listings are async iterators); the messages are :class:`AsyncMessage`,
    whose ``ack`` and ``nack`` are awaited. Cancelling a task that awaits a call
    cancels the call: a cancelled ``poll`` takes no message.
    """

    _session_type = AsyncSession
    _lease_keeper_type = AsyncLeaseKeeper
    _heartbeat_type = AsyncHeartbeat
    _session: AsyncSession
    _lease_keeper: AsyncLeaseKeeper
    _heartbeat: AsyncHeartbeat | None

    def _assembled(self) -> None:
        self._subscriptions: weakref.WeakSet[AsyncSubscription] = weakref.WeakSet()

    @classmethod
    async def connect(cls, target: str, username: str, password: str, **kwargs: object) -> Self:
        """A logged-in client (the constructor's arguments)."""
        client = cls(target, username, password, **kwargs)  # type: ignore[arg-type]
        await client.login()
        return client

    # -- lifecycle ------------------------------------------------------------------------

    async def login(self) -> None:
        """Open the channel, log in and start the heartbeat; does nothing the second time.
        Raises as the sync client's constructor does."""
        if self._session.closed:
            raise ClientClosed("the client is closed")
        if self._session.logged_in:
            return
        await self._session.open()
        if self._heartbeat is not None:
            self._heartbeat.start()

    async def __aenter__(self) -> Self:
        await self.login()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, *, logout: bool = True) -> None:
        """Close open subscriptions (their ``async for`` ends), stop the heartbeat and the
        lease keeper, log out and close the channel. Safe to call twice; a failed logout
        is logged, not raised."""
        for subscription in list(self._subscriptions):
            await subscription.close()
        login = self._session.shut()
        await self._lease_keeper.stop()
        if self._heartbeat is not None:
            await self._heartbeat.join()
        await self._session.end(login, logout=logout)

    # -- sessions -------------------------------------------------------------------------

    async def heartbeat(self) -> SessionStatus:
        """As ``QueueManagerClient.heartbeat``: the session's status, renewed now."""
        return await self._session.run(ops.heartbeat())

    def list_sessions(
        self, *, username: str = "", page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[SessionSummary]:
        """As ``QueueManagerClient.list_sessions``: ``async for``, a page per call."""
        return self._session.pages(ops.list_sessions(username, page_size))

    async def end_session(self, session_id: int) -> None:
        """As ``QueueManagerClient.end_session`` (admins only)."""
        await self._session.run(ops.end_session(session_id))

    # -- queues ---------------------------------------------------------------------------

    async def new_queue(
        self, name: str, settings: QueueSettings | None = None, *, exist_ok: bool = False
    ) -> None:
        """As ``QueueManagerClient.new_queue``."""
        await self._session.run(ops.new_queue(name, settings, exist_ok))

    async def update_queue(self, name: str, settings: QueueSettings) -> QueueSettings:
        """As ``QueueManagerClient.update_queue``."""
        return await self._session.run(ops.update_queue(name, settings))

    async def queue_info(self, name: str) -> QueueInfo:
        """As ``QueueManagerClient.queue_info``."""
        return await self._session.run(ops.queue_info(name))

    def list_queues(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[QueueSummary]:
        """As ``QueueManagerClient.list_queues``: ``async for``, a page per call."""
        return self._session.pages(ops.list_queues(page_size))

    def list_maps(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[str]:
        """As ``QueueManagerClient.list_maps``: ``async for``, a page per call."""
        return self._session.pages(ops.list_maps(page_size))

    async def purge(self, queue: str) -> int:
        """As ``QueueManagerClient.purge``."""
        return await self._session.run(ops.purge(queue))

    def dead_letters(
        self, queue: str, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[DeadLetter]:
        """As ``QueueManagerClient.dead_letters``: ``async for``, a page per call."""
        return self._session.pages(ops.dead_letters(queue, page_size))

    async def redrive(self, queue: str, ids: Iterable[int] | None = None) -> RedriveResult:
        """As ``QueueManagerClient.redrive``."""
        return await self._session.run(ops.redrive(queue, ids))

    async def size(self, queue: str) -> int:
        """As ``QueueManagerClient.size``."""
        return await self._session.run(ops.size(queue))

    async def is_empty(self, queue: str) -> bool:
        """As ``QueueManagerClient.is_empty``."""
        return await self._session.run(ops.is_empty(queue))

    async def unacked(self, queue: str) -> int:
        """As ``QueueManagerClient.unacked``."""
        return await self._session.run(ops.unacked(queue))

    async def destroy_queue(self, queue: str, *, force: bool = False) -> None:
        """As ``QueueManagerClient.destroy_queue``."""
        await self._session.run(ops.destroy_queue(queue, force))

    # -- messages -------------------------------------------------------------------------

    async def add(
        self,
        queue: str,
        element: str,
        *,
        delay: float | None = None,
        request_id: str | None = None,
        idempotent: bool = False,
    ) -> int:
        """As ``QueueManagerClient.add``: repeated after UNAVAILABLE only with a request
        id (or ``idempotent=True``)."""
        return await self._session.run(ops.add(queue, element, delay, request_id, idempotent))

    async def add_all(
        self,
        queue: str,
        elements: Iterable[str],
        *,
        delay: float | None = None,
        request_id: str | None = None,
        idempotent: bool = False,
    ) -> AddedIds:
        """As ``QueueManagerClient.add_all``."""
        op = ops.add_all(queue, elements, delay, request_id, idempotent)
        return await self._session.run(op)

    async def poll(
        self, queue: str, *, wait: float = 0.0, ack_deadline: float | None = None
    ) -> AsyncMessage | None:
        """As ``QueueManagerClient.poll``. Cancelling the awaiting task cancels the wait
        on the server, which then delivers nothing to it."""
        return await self._session.run(ops.poll(self._session, queue, wait, ack_deadline))

    async def pull(
        self,
        queue: str,
        max_count: int,
        *,
        wait: float = 0.0,
        ack_deadline: float | None = None,
    ) -> list[AsyncMessage]:
        """As ``QueueManagerClient.pull``."""
        op = ops.pull(self._session, queue, max_count, wait, ack_deadline)
        return await self._session.run(op)

    async def extend_lease(
        self, messages: Iterable[AsyncMessage | int], deadline: float
    ) -> list[LeaseResult]:
        """As ``QueueManagerClient.extend_lease``."""
        return await self._session.run(ops.extend_lease(self._session, messages, deadline))

    def keep_lease(
        self, message: AsyncMessage, *, max_lease: float | None = None
    ) -> AsyncLeaseGuard:
        """As ``QueueManagerClient.keep_lease``, from the lease keeper's task; use the
        guard with ``async with``."""
        return self._lease_keeper.keep(message, max_lease)

    async def handle(
        self,
        message: AsyncMessage,
        handler: Callable[[AsyncMessage], Awaitable[_T]],
        *,
        max_lease: float | None = None,
    ) -> _T:
        """Await ``handler(message)`` with its lease kept alive; ack the message when it
        returns, nack it when it raises (and re-raise), as ``QueueManagerClient.handle``."""
        async with self.keep_lease(message, max_lease=max_lease):
            try:
                result = await handler(message)
            except Exception:
                # The handler's error is the one to raise; a lost or released message
                # comes back either way.
                with contextlib.suppress(QMError):
                    await message.nack()
                raise
            await message.ack()
        return result

    async def ack(self, message: AsyncMessage) -> None:
        """Same as ``await message.ack()`` (finished by its owner: a subscription's
        message on its stream)."""
        await message.ack()

    async def nack(self, message: AsyncMessage) -> None:
        """Same as ``await message.nack()``."""
        await message.nack()

    async def ack_many(
        self, messages: Iterable[AsyncMessage], *, nack: bool = False
    ) -> list[AsyncMessage]:
        """As ``QueueManagerClient.ack_many``: one BatchAck; returns those that failed."""
        own, others = ops.split_by_owner(messages, self._session)
        failed: list[AsyncMessage] = []
        for message in others:
            try:
                await (message.nack() if nack else message.ack())
            except MessageNotFound:
                failed.append(message)
        return failed + await self._session.run(ops.batch_ack(self._session, own, nack))

    def subscribe(
        self, queue: str, max_unacked: int = 16, *, ack_deadline: float | None = None
    ) -> AsyncSubscription:
        """As ``QueueManagerClient.subscribe``: ``async for message in ...``; closing
        the client closes it."""
        lease_ms = ops.optional_millis(ack_deadline)
        subscription = AsyncSubscription(self._session, queue, max_unacked, lease_ms)
        self._subscriptions.add(subscription)
        return subscription

    # -- maps -----------------------------------------------------------------------------

    def map(self, name: str, *, page_size: int = 500) -> AsyncQMap:
        """An :class:`AsyncQMap` view of a map; no call is made until it is used."""
        return AsyncQMap(self._session, name, page_size=page_size)
