"""The thread that extends the leases of messages while their handlers run.

A queue with an ack deadline takes a message back from a consumer that neither acks nor
extends it in time, which is what unsticks a hung worker. A worker that is merely slow
must therefore extend its lease while it works: this keeper does it for the messages it
is given (``QueueManagerClient.keep_lease`` and ``handle``), from one named daemon thread
per client, with one ``ExtendLease`` call for all the messages due at once. When to renew,
how long for, and what a refusal means are ``_lease_book.py``'s, shared with the asyncio
client's keeper.

Messages without a lease (a queue without ack deadline) need no keeping: their guard
does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Self

from qm.v1 import queue_manager_pb2 as pb

from ._lease_book import GuardState, Kept, LeaseBook
from ._message import Message
from ._session import Session
from .errors import ClientClosed, QMError

__all__ = ["LeaseGuard", "LeaseKeeper"]

logger = logging.getLogger("qm_client")


class LeaseGuard(GuardState):
    """The keeper's hold on one message's lease; a context manager.

    Leaving the ``with`` block stops the renewals (ack the message inside the block or
    soon after it). ``lost`` tells whether the lease was lost, ``cause`` why (``None``
    for ``max_lease``), ``expires_at`` the end of the last extension and ``renewals``
    how many there were.
    """

    message: Message

    def __init__(self, message: Message, keeper: LeaseKeeper | None) -> None:
        super().__init__(message, keeper)
        self._changed = threading.Condition()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def wait_renewed(self, count: int, timeout: float) -> bool:
        """Wait until the lease was extended ``count`` times; ``False`` if it was lost or
        ``timeout`` s passed first. For monitoring and tests."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.renewals >= count or self._lost, timeout
            ) and (self.renewals >= count)

    def wait_lost(self, timeout: float) -> bool:
        """Wait until the lease is lost; ``False`` if ``timeout`` s passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._lost, timeout)

    def _renewed(self, expires_at: datetime | None) -> None:
        with self._changed:
            super()._renewed(expires_at)
            self._changed.notify_all()

    def _lose(self, cause: QMError | None) -> None:
        with self._changed:
            super()._lose(cause)
            self._changed.notify_all()


class LeaseKeeper:
    """Renews the leases of kept messages from one thread, started on first use."""

    def __init__(
        self,
        session: Session,
        max_lease: float,
        on_lease_lost: Callable[[Message, QMError | None], None] | None,
    ) -> None:
        self._session = session
        self._book = LeaseBook(session, max_lease, on_lease_lost)
        self._changed = threading.Condition()  # notified when the book changes
        self._thread: threading.Thread | None = None

    @property
    def max_lease(self) -> float:
        return self._book.max_lease

    def keep(self, message: Message, max_lease: float | None = None) -> LeaseGuard:
        """Start renewing ``message``'s lease; the returned guard stops it."""
        if message.lease_expires_at is None:
            return LeaseGuard(message, None)
        guard = LeaseGuard(message, self)
        with self._changed:
            self._book.add(guard, max_lease, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run,
                    name=f"qm-lease-keeper-{self._session.username}@{self._session.target}",
                    daemon=True,
                )
                self._thread.start()
            self._changed.notify_all()
        return guard

    def release(self, guard: LeaseGuard) -> None:
        self._book.release(guard)

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it)."""
        with self._changed:
            self._book.stop()
            thread = self._thread
            self._changed.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while (due := self._next_due()) is not None:
            for group, request in self._book.plan(due, time.monotonic()):
                try:
                    self._extend(group, request)
                except ClientClosed:
                    return
                except Exception:
                    # Not a service error: a dead keeper would let every lease lapse
                    # with no word, so log it and try again later.
                    logger.exception("extending leases failed")
                    self._book.retry_soon(group, time.monotonic())

    def _next_due(self) -> list[Kept] | None:
        """Wait for the next messages due (their renewal or their cap); None once stopped."""
        with self._changed:
            while not self._book.stopped:
                now = time.monotonic()
                due, wake = self._book.due(now)
                if due:
                    return due
                self._changed.wait(None if wake is None else wake - now)
            return None

    def _extend(self, group: list[Kept], request: pb.ExtendLeaseRequest) -> None:
        session = self._session
        login = self._book.login_of(group)
        try:
            response, _ = session.call(session.stub.ExtendLease, request, bound_to=login)
        except ClientClosed:
            raise
        except QMError as error:
            self._book.failed(group, error, time.monotonic())
            return
        self._book.answered(group, request, response, time.monotonic())
