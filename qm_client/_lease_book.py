"""The lease keeper's bookkeeping, shared by the thread keeper and the asyncio one.

Sans-IO: which kept messages are due, how their renewals are grouped into
``ExtendLease`` calls, and what an answer means for each message. The rules (see
``_lease_keeper.py``):

- Each lease is renewed at a third of its length, with +-20 % jitter (many consumers
  started together do not renew in step), with the same length it was delivered with.
- A lease is never extended past ``max_lease`` from the delivery: a handler that runs
  that long is taken to be hung.
- A lost lease (an extension refused, the session gone, or ``max_lease`` reached) is
  reported: on the guard, to ``on_lease_lost`` (or the log), and by the message's ack.
- A failed call loses nothing by itself: the renewal is tried again soon.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from qm.v1 import queue_manager_pb2 as pb

from ._lifecycle import lease_result_from_pb
from ._message import Delivery, Login
from ._session_core import SessionCore
from .errors import ClientClosed, MessageReleased, QMError

__all__ = ["GuardState", "Kept", "LeaseBook"]

logger = logging.getLogger("qm_client")

MIN_LEASE_MS = 1_000
MAX_LEASE_MS = 12 * 3_600_000
# The largest ExtendLease the keeper sends (well under the server's batch limit).
EXTEND_BATCH = 500
# How soon a failed extension is tried again, as a share of the lease.
RETRY_SHARE = 1 / 6


class _Releaser(Protocol):
    def release(self, guard: Any) -> None: ...


class GuardState:
    """What a lease guard shows: ``lost``, ``cause`` (``None`` for ``max_lease``),
    ``expires_at`` (the end of the last extension) and ``renewals``. The guards of the
    two clients add how to wait for a change and how to let go."""

    def __init__(self, message: Delivery, keeper: _Releaser | None) -> None:
        self.message = message
        self._keeper = keeper
        self._lost = False
        self.cause: QMError | None = None
        self.renewals = 0
        self.expires_at: datetime | None = message.lease_expires_at

    @property
    def lost(self) -> bool:
        return self._lost

    def release(self) -> None:
        """Stop renewing the lease (the handler is done)."""
        if self._keeper is not None:
            self._keeper.release(self)

    def _renewed(self, expires_at: datetime | None) -> None:
        self.renewals += 1
        self.expires_at = expires_at

    def _lose(self, cause: QMError | None) -> None:
        self._lost = True
        self.cause = cause


@dataclass(eq=False)
class Kept:
    """A message being kept: when to act on it next (monotonic seconds)."""

    guard: GuardState
    lease_ms: int
    cap_at: float
    next_at: float
    released: bool = field(default=False)

    @property
    def message(self) -> Delivery:
        return self.guard.message


class LeaseBook:
    """The kept messages, by guard. Thread-safe; no I/O, no waiting."""

    def __init__(
        self,
        session: SessionCore[Any],
        max_lease: float,
        on_lease_lost: Callable[[Any, QMError | None], None] | None,
    ) -> None:
        self.session = session
        self.max_lease = max_lease
        self._on_lease_lost = on_lease_lost
        self._lock = threading.Lock()  # guards _kept, _stopped and each Kept's fields
        self._kept: dict[int, Kept] = {}  # by id of the guard
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def add(self, guard: GuardState, max_lease: float | None, now: float) -> None:
        """Start keeping ``guard``'s message; :class:`ClientClosed` once stopped."""
        message = guard.message
        assert message.lease_expires_at is not None
        remaining = (message.lease_expires_at - datetime.now(UTC)).total_seconds()
        lease_ms = message._lease_ms or _clamp_lease(round(remaining * 1000))
        cap = max_lease if max_lease is not None else self.max_lease
        kept = Kept(
            guard=guard,
            lease_ms=lease_ms,
            cap_at=message._received_at + cap,
            # A lease that has run partly out already (a message that waited in a
            # subscription's buffer) is renewed before half of what is left has passed.
            next_at=now + min(_interval(lease_ms), max(remaining, 0.0) / 2),
        )
        with self._lock:
            if self._stopped:
                raise ClientClosed("the client is closed")
            self._kept[id(guard)] = kept

    def release(self, guard: GuardState) -> None:
        with self._lock:
            kept = self._kept.pop(id(guard), None)
            if kept is not None:
                kept.released = True

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._kept.clear()

    def due(self, now: float) -> tuple[list[Kept], float | None]:
        """The messages due now (their renewal or their cap), else when the next is."""
        with self._lock:
            due = [k for k in self._kept.values() if min(k.next_at, k.cap_at) <= now]
            wake = min((min(k.next_at, k.cap_at) for k in self._kept.values()), default=None)
        return due, wake

    def plan(self, due: list[Kept], now: float) -> list[tuple[list[Kept], pb.ExtendLeaseRequest]]:
        """Report the messages past their cap lost; group the others into calls, one per
        login and lease length, at most ``EXTEND_BATCH`` messages each."""
        renew: dict[tuple[int, int], list[Kept]] = {}
        for kept in due:
            if now >= kept.cap_at:
                self.lose(kept, None)
                continue
            lease_ms = _clamp_lease(min(kept.lease_ms, round((kept.cap_at - now) * 1000)))
            renew.setdefault((id(kept.message._login), lease_ms), []).append(kept)
        calls = []
        for (_, lease_ms), group in renew.items():
            for start in range(0, len(group), EXTEND_BATCH):
                batch = group[start : start + EXTEND_BATCH]
                ids = [k.message.message_id for k in batch]
                calls.append(
                    (batch, pb.ExtendLeaseRequest(message_ids=ids, ack_deadline_ms=lease_ms))
                )
        return calls

    @staticmethod
    def login_of(group: list[Kept]) -> Login:
        return group[0].message._login

    def answered(
        self,
        group: list[Kept],
        request: pb.ExtendLeaseRequest,
        response: pb.ExtendLeaseResponse,
        now: float,
    ) -> None:
        """Apply an ExtendLease answer: renewed leases are due again in a third of their
        length, refused ones are lost."""
        # An id the answer left out (it should not) is tried again soon, not at once.
        self.retry_soon(group, now)
        by_id = {k.message.message_id: k for k in group}
        for result in map(lease_result_from_pb, response.results):
            renewed = by_id.get(result.message_id)
            if renewed is None:
                continue
            if result.error is not None:
                self.lose(renewed, result.error)
                continue
            with self._lock:
                renewed.next_at = now + _interval(request.ack_deadline_ms)
            renewed.guard._renewed(result.lease_expires_at)

    def failed(self, group: list[Kept], error: QMError, now: float) -> None:
        """A call failed. The session ended (:class:`MessageReleased`): the server released
        the messages, their leases are lost. Otherwise (UNAVAILABLE after the client's own
        repeats, a deadline) the lease may still run, and the server judges whether it ran
        out: try again soon."""
        if isinstance(error, MessageReleased):
            for kept in group:
                self.lose(kept, error)
            return
        logger.warning("extending %d lease(s) failed, trying again: %s", len(group), error)
        self.retry_soon(group, now)

    def retry_soon(self, group: list[Kept], now: float) -> None:
        with self._lock:
            for kept in group:
                kept.next_at = now + kept.lease_ms / 1000 * RETRY_SHARE

    def lose(self, kept: Kept, cause: QMError | None) -> None:
        """Report a lost lease, unless the message was finished or let go meanwhile."""
        with self._lock:
            if kept.released or self._kept.pop(id(kept.guard), None) is None:
                return
        if not self.session.mark_lost(kept.message, cause):
            return  # being acked or already finished: nothing was lost
        try:
            self._report(kept.message, cause)
        finally:
            # Last, so that whoever waits on the guard finds the loss reported already.
            kept.guard._lose(cause)

    def _report(self, message: Delivery, cause: QMError | None) -> None:
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
