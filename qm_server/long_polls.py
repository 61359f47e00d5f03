"""Poll and PullElements: claim the oldest ready messages, and wait for one when the
queue has none and the caller asked to wait.

A wait is a future, not a thread (delivery.py wakes it), counted against its user's
quota of waiting long polls and answered at once when its session ends: the engine's
LiveSessions resolves the waiters it finds in `polls`. A wait cut short by a drain is
UNAVAILABLE, never QUEUE_EMPTY. What it needs of the engine (the caller's checks, a
user's room) comes as callables, as queue_admin.py does, so it does not depend on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from qm_server import errors
from qm_server.config import Limits
from qm_server.delivery import Deliverer
from qm_server.lifecycle import check_ack_deadline_ms
from qm_server.live_sessions import SESSION_EXPIRED
from qm_server.queue_admin import Caller
from qm_server.quotas import Room, RoomOf, Usage
from qm_server.sessions import Session
from qm_server.store.base import Delivery
from qm_server.validation import check_count
from qm_server.waiting import ReadySignals


class LongPolls:
    def __init__(
        self,
        limits: Limits,
        deliverer: Deliverer,
        signals: ReadySignals,
        polls: dict[int, set[asyncio.Future[None]]],
        usage: Usage,
        *,
        caller: Caller,
        room: RoomOf,
        make_room: Callable[[Room, int, int], None],
        clock: Callable[[], float],
    ) -> None:
        """`polls`: session id -> the waits of its long polls; `usage`: waits per user."""
        self._limits = limits
        self._deliverer = deliverer
        self._signals = signals
        self._polls = polls
        self._usage = usage
        self._caller = caller
        self._room = room
        self._make_room = make_room
        self._clock = clock

    async def take(
        self, token: str, name: str, number: int, wait_ms: int, lease_ms: int | None = None
    ) -> list[Delivery]:
        """Poll (number 1) and PullElements: the oldest ready messages, waiting if asked;
        `lease_ms` None takes the queue's ack deadline."""
        session = await self._caller(token, "read", "queue", name)
        check_count("number", number, self._limits.max_batch)
        if wait_ms < 0:
            raise errors.InvalidArgument("wait_ms must not be negative")
        check_lease(lease_ms)
        deadline = self._clock() + min(wait_ms, self._limits.max_wait_ms) / 1000
        while True:
            deliveries = await self._deliverer.claim(
                session, name, number, lease_ms, ended=SESSION_EXPIRED
            )
            if deliveries:
                return deliveries
            remaining = deadline - self._clock()
            if remaining <= 0:  # a poll with wait_ms 0 too, draining or not: it is true
                raise errors.QueueEmpty(f"queue {name!r} has no ready message")
            if self._deliverer.draining:
                # The wait is cut short, not over: QUEUE_EMPTY would tell a consumer that
                # the queue ran dry. Nothing was claimed, so polling again is safe.
                raise errors.Unavailable("the server is shutting down; poll again later")
            room = self._room(
                session.username,
                "waiting long polls",
                self._limits.max_waiting_polls,
                self._limits.max_waiting_polls_per_user,
            )
            self._make_room(room, self._signals.waiting(), self._usage.of(session.username))
            await self._wait_for_ready(session, name, remaining)
            try:
                # Grants are reloaded every second: a revocation made while this poll
                # waited must stop it before it claims, not after its wait_ms (20 s).
                session = await self._caller(token, "read", "queue", name)
            except (errors.Unauthenticated, errors.PermissionDenied):
                self._deliverer.pass_on(name)
                raise

    async def _wait_for_ready(self, session: Session, name: str, timeout_s: float) -> None:
        """A long poll's wait, counted against its user's quota and answered at once when
        its session ends (the engine's `_end_session` resolves the waiters it finds in `polls`)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if session.ended:
            waiter.set_result(None)  # it ended while we claimed, with nobody to wake
        polls = self._polls.setdefault(session.id, set())
        polls.add(waiter)
        self._usage.add(session.username)
        try:
            await self._deliverer.wait(session, waiter, timeout_s, queue=name)
        finally:
            self._usage.remove(session.username)
            polls.discard(waiter)
            if not polls and self._polls.get(session.id) is polls:
                del self._polls[session.id]


def check_lease(lease_ms: int | None) -> None:
    """A call's own ack deadline (Poll, PullElements, Subscribe): unset or in bounds."""
    if lease_ms is not None:
        check_ack_deadline_ms("ack_deadline_ms", lease_ms, allow_zero=False)
