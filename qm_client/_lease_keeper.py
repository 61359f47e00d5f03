"""The thread that extends the leases of messages while their handlers run.

A queue with an ack deadline takes a message back from a consumer that neither acks nor
extends it in time, which is what unsticks a hung worker. A worker that is merely slow
must therefore extend its lease while it works: this keeper does it for the messages it
is given (``QueueManagerClient.keep_lease`` and ``handle``), from one named daemon thread
per client, with one ``ExtendLease`` call for all the messages due at once.

- Each lease is renewed at a third of its length, with +-20 % jitter (many consumers
  started together do not renew in step), with the same length it was delivered with.
- A lease is never extended past ``max_lease`` from the delivery: a handler that runs
  that long is taken to be hung, and its message goes to another consumer when the last
  extension runs out.
- A lost lease (an extension answered LEASE_EXPIRED or MESSAGE_NOT_FOUND, the session
  gone, or ``max_lease`` reached) is never swallowed: the guard says so (``lost``,
  ``cause``), ``on_lease_lost`` is called (or a warning logged), and the message's
  ``ack``/``nack`` raise :class:`LeaseLost` instead of calling the server.
- A failed call (UNAVAILABLE after the client's own repeats, a deadline) loses nothing by
  itself: the keeper tries again soon, since the lease may still be running; the server
  is the judge of whether it ran out.

Messages without a lease (a queue without ack deadline) need no keeping: their guard
does nothing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from qm.v1 import queue_manager_pb2 as pb

from ._lifecycle import lease_result_from_pb
from ._message import Login, Message
from ._session import Session
from .errors import ClientClosed, MessageReleased, QMError

__all__ = ["LeaseGuard", "LeaseKeeper"]

logger = logging.getLogger("qm_client")

MIN_LEASE_MS = 1_000
MAX_LEASE_MS = 12 * 3_600_000
# The largest ExtendLease the keeper sends (well under the server's batch limit).
EXTEND_BATCH = 500
# How soon a failed extension is tried again, as a share of the lease.
RETRY_SHARE = 1 / 6


class LeaseGuard:
    """The keeper's hold on one message's lease; a context manager.

    Leaving the ``with`` block stops the renewals (ack the message inside the block or
    soon after it). ``lost`` tells whether the lease was lost, ``cause`` why (``None``
    for ``max_lease``), ``expires_at`` the end of the last extension and ``renewals``
    how many there were.
    """

    def __init__(self, message: Message, keeper: LeaseKeeper | None) -> None:
        self.message = message
        self._keeper = keeper
        self._changed = threading.Condition()
        self._lost = False
        self.cause: QMError | None = None
        self.renewals = 0
        self.expires_at: datetime | None = message.lease_expires_at

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @property
    def lost(self) -> bool:
        return self._lost

    def release(self) -> None:
        """Stop renewing the lease (the handler is done)."""
        if self._keeper is not None:
            self._keeper.release(self)

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
            self.renewals += 1
            self.expires_at = expires_at
            self._changed.notify_all()

    def _lose(self, cause: QMError | None) -> None:
        with self._changed:
            self._lost = True
            self.cause = cause
            self._changed.notify_all()


@dataclass(eq=False)
class _Kept:
    """A message being kept: when to act on it next (monotonic seconds)."""

    guard: LeaseGuard
    lease_ms: int
    cap_at: float
    next_at: float
    released: bool = field(default=False)

    @property
    def message(self) -> Message:
        return self.guard.message


class LeaseKeeper:
    """Renews the leases of kept messages from one thread, started on first use."""

    def __init__(
        self,
        session: Session,
        max_lease: float,
        on_lease_lost: Callable[[Message, QMError | None], None] | None,
    ) -> None:
        self._session = session
        self.max_lease = max_lease
        self._on_lease_lost = on_lease_lost
        self._changed = threading.Condition()
        self._kept: dict[int, _Kept] = {}  # by id of the guard
        self._stopped = False
        self._thread: threading.Thread | None = None

    def keep(self, message: Message, max_lease: float | None = None) -> LeaseGuard:
        """Start renewing ``message``'s lease; the returned guard stops it."""
        if message.lease_expires_at is None:
            return LeaseGuard(message, None)
        guard = LeaseGuard(message, self)
        now = time.monotonic()
        remaining = (message.lease_expires_at - datetime.now(UTC)).total_seconds()
        lease_ms = message._lease_ms or _clamp_lease(round(remaining * 1000))
        cap = max_lease if max_lease is not None else self.max_lease
        kept = _Kept(
            guard=guard,
            lease_ms=lease_ms,
            cap_at=message._received_at + cap,
            # A lease that has run partly out already (a message that waited in a
            # subscription's buffer) is renewed before half of what is left has passed.
            next_at=now + min(_interval(lease_ms), max(remaining, 0.0) / 2),
        )
        with self._changed:
            if self._stopped:
                raise ClientClosed("the client is closed")
            self._kept[id(guard)] = kept
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
        with self._changed:
            kept = self._kept.pop(id(guard), None)
            if kept is not None:
                kept.released = True

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it)."""
        with self._changed:
            self._stopped = True
            self._kept.clear()
            thread = self._thread
            self._changed.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while (due := self._next_due()) is not None:
            now = time.monotonic()
            renew: dict[tuple[int, int], list[_Kept]] = {}
            for kept in due:
                if now >= kept.cap_at:
                    self._lose(kept, None)
                    continue
                lease_ms = _clamp_lease(min(kept.lease_ms, round((kept.cap_at - now) * 1000)))
                renew.setdefault((id(kept.message._login), lease_ms), []).append(kept)
            for (_, lease_ms), group in renew.items():
                for start in range(0, len(group), EXTEND_BATCH):
                    try:
                        self._extend(group[start : start + EXTEND_BATCH], lease_ms)
                    except ClientClosed:
                        return
                    except Exception:
                        # Not a service error: a dead keeper would let every lease lapse
                        # with no word, so log it and try again later.
                        logger.exception("extending leases failed")
                        self._retry_soon(group[start : start + EXTEND_BATCH])

    def _next_due(self) -> list[_Kept] | None:
        """Wait for the next messages due (their renewal or their cap); None once stopped."""
        with self._changed:
            while not self._stopped:
                now = time.monotonic()
                due = [k for k in self._kept.values() if min(k.next_at, k.cap_at) <= now]
                if due:
                    return due
                wake = min((min(k.next_at, k.cap_at) for k in self._kept.values()), default=None)
                self._changed.wait(None if wake is None else wake - now)
            return None

    def _extend(self, group: list[_Kept], lease_ms: int) -> None:
        login: Login = group[0].message._login
        request = pb.ExtendLeaseRequest(
            message_ids=[k.message.message_id for k in group], ack_deadline_ms=lease_ms
        )
        session = self._session
        try:
            response, _ = session.call(session.stub.ExtendLease, request, bound_to=login)
        except MessageReleased as error:  # the session ended: the server released them
            for kept in group:
                self._lose(kept, error)
            return
        except ClientClosed:
            raise
        except QMError as error:
            logger.warning("extending %d lease(s) failed, trying again: %s", len(group), error)
            self._retry_soon(group)
            return
        # An id the answer left out (it should not) is tried again soon, not at once.
        self._retry_soon(group)
        by_id = {k.message.message_id: k for k in group}
        now = time.monotonic()
        for result in map(lease_result_from_pb, response.results):
            renewed = by_id.get(result.message_id)
            if renewed is None:
                continue
            if result.error is not None:
                self._lose(renewed, result.error)
                continue
            with self._changed:
                renewed.next_at = now + _interval(lease_ms)
            renewed.guard._renewed(result.lease_expires_at)

    def _retry_soon(self, group: list[_Kept]) -> None:
        now = time.monotonic()
        with self._changed:
            for kept in group:
                kept.next_at = now + kept.lease_ms / 1000 * RETRY_SHARE

    def _lose(self, kept: _Kept, cause: QMError | None) -> None:
        """Report a lost lease, unless the message was finished or let go meanwhile."""
        with self._changed:
            if kept.released or self._kept.pop(id(kept.guard), None) is None:
                return
        if not self._session.mark_lost(kept.message, cause):
            return  # being acked or already finished: nothing was lost
        try:
            self._report(kept.message, cause)
        finally:
            # Last, so that whoever waits on the guard finds the loss reported already.
            kept.guard._lose(cause)

    def _report(self, message: Message, cause: QMError | None) -> None:
        if self._on_lease_lost is None:
            why = "max_lease reached" if cause is None else str(cause)
            logger.warning(
                "lease of message %d of %s lost while it was handled (%s); it will be "
                "delivered again",
                message.message_id,
                message.queue,
                why,
            )
            return
        try:
            self._on_lease_lost(message, cause)
        except Exception:
            logger.exception("on_lease_lost callback failed")


def _interval(lease_ms: int) -> float:
    """Seconds until the next renewal of a lease of ``lease_ms``: a third, +-20 %."""
    return lease_ms / 1000 / 3 * random.uniform(0.8, 1.2)


def _clamp_lease(lease_ms: int) -> int:
    return max(MIN_LEASE_MS, min(lease_ms, MAX_LEASE_MS))
