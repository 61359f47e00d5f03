"""The asyncio task that extends the leases of messages while their handlers run.

The sync client's keeper (``_lease_keeper.py``) as a task of the client's event loop:
when to renew, how long for, and what a refusal means are ``_lease_book.py``'s, shared
by both. A handler that awaits keeps its lease; a handler that blocks the event loop
blocks this task too, so handlers that compute for long belong in a thread
(``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Self

from qm.v1 import queue_manager_pb2 as pb

from ._aio_session import AsyncSession
from ._lease_book import GuardState, Kept, LeaseBook
from ._message import AsyncMessage
from .errors import ClientClosed, QMError

__all__ = ["AsyncLeaseGuard", "AsyncLeaseKeeper"]

logger = logging.getLogger("qm_client")


class AsyncLeaseGuard(GuardState):
    """The keeper's hold on one message's lease; an async context manager.

    Leaving the ``async with`` block stops the renewals. ``lost``, ``cause``,
    ``expires_at`` and ``renewals`` as on :class:`LeaseGuard`.
    """

    message: AsyncMessage

    def __init__(self, message: AsyncMessage, keeper: AsyncLeaseKeeper | None) -> None:
        super().__init__(message, keeper)
        self._changed = asyncio.Event()  # replaced by a fresh one at every change

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def wait_renewed(self, count: int, timeout: float) -> bool:
        """Wait until the lease was extended ``count`` times; ``False`` if it was lost or
        ``timeout`` s passed first. For monitoring and tests."""
        await self._wait_for(lambda: self.renewals >= count or self._lost, timeout)
        return self.renewals >= count

    async def wait_lost(self, timeout: float) -> bool:
        """Wait until the lease is lost; ``False`` if ``timeout`` s passed first."""
        return await self._wait_for(lambda: self._lost, timeout)

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            pass
        return predicate()

    def _renewed(self, expires_at: datetime | None) -> None:
        super()._renewed(expires_at)
        self._notify()

    def _lose(self, cause: QMError | None) -> None:
        super()._lose(cause)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class AsyncLeaseKeeper:
    """Renews the leases of kept messages from one task, started on first use."""

    def __init__(
        self,
        session: AsyncSession,
        max_lease: float,
        on_lease_lost: Callable[[AsyncMessage, QMError | None], None] | None,
    ) -> None:
        self._session = session
        self._book = LeaseBook(session, max_lease, on_lease_lost)
        self._changed = asyncio.Event()  # set when the book changes
        self._task: asyncio.Task[None] | None = None

    def keep(self, message: AsyncMessage, max_lease: float | None = None) -> AsyncLeaseGuard:
        """Start renewing ``message``'s lease; the returned guard stops it."""
        if message.lease_expires_at is None:
            return AsyncLeaseGuard(message, None)
        guard = AsyncLeaseGuard(message, self)
        self._book.add(guard, max_lease, time.monotonic())
        if self._task is None:
            name = f"qm-lease-keeper-{self._session.username}@{self._session.target}"
            self._task = asyncio.get_running_loop().create_task(self._run(), name=name)
        self._changed.set()
        return guard

    def release(self, guard: AsyncLeaseGuard) -> None:
        self._book.release(guard)

    async def stop(self) -> None:
        """Stop the task and wait for it (unless called from it)."""
        self._book.stop()
        self._changed.set()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait([task])

    async def _run(self) -> None:
        while (due := await self._next_due()) is not None:
            for group, request in self._book.plan(due, time.monotonic()):
                try:
                    await self._extend(group, request)
                except ClientClosed:
                    return
                except Exception:
                    # Not a service error: a dead keeper would let every lease lapse
                    # with no word, so log it and try again later.
                    logger.exception("extending leases failed")
                    self._book.retry_soon(group, time.monotonic())

    async def _next_due(self) -> list[Kept] | None:
        """Wait for the next messages due; ``None`` once stopped."""
        while not self._book.stopped:
            now = time.monotonic()
            due, wake = self._book.due(now)
            if due:
                return due
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), None if wake is None else wake - now)
        return None

    async def _extend(self, group: list[Kept], request: pb.ExtendLeaseRequest) -> None:
        session = self._session
        login = self._book.login_of(group)
        try:
            response, _ = await session.call(session.stub.ExtendLease, request, bound_to=login)
        except ClientClosed:
            raise
        except QMError as error:
            self._book.failed(group, error, time.monotonic())
            return
        self._book.answered(group, request, response, time.monotonic())
