"""Handing ready messages to a caller: the one home of the claim and the wait.

Long polls (`Engine.take`) and Subscribe streams (`Subscription`) deliver alike, so both
go through a Deliverer for the three steps whose details matter:

- The guarded claim: the store commits a claim even when its caller gives up (a client's
  deadline, a closed stream); what it took is then given back at once (ready again)
  instead of sitting in flight, unseen, until the session ends.
- The hand-over: a claim that committed after its session ended (its release may have
  run first) is released again and the caller answers UNAUTHENTICATED; when more is ready
  than this caller took, the wake-up goes on to the next waiter.
- The wait: park a future on the queue's ready signals (waiting.py), for at most a
  timeout, keeping the session alive meanwhile; a waiter that leaves after its wake-up
  came passes the wake-up on, or a ready message would wait for the next add.

It also knows whether the server drains, when no new wait may start. It holds the store
and the signals, never the engine: the engine and the streams both depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from qm_server import errors
from qm_server.background import Background, outliving_caller
from qm_server.sessions import Session
from qm_server.store.base import Delivery, Store, message_ids_of
from qm_server.waiting import ReadySignals

log = logging.getLogger(__name__)

T = TypeVar("T")
SESSION_ENDED = "the session ended; log in again"


class Deliverer:
    """One per engine; all of it runs on the engine's event loop."""

    def __init__(
        self,
        store: Store,
        signals: ReadySignals,
        background: Background,
        clock: Callable[[], float],
        answer_room: int,
    ) -> None:
        self.signals = signals
        # The bytes an answer's entries may take: what fits a default client, framed.
        self.answer_room = answer_room
        self.draining = False
        self._store = store
        self._background = background
        self._clock = clock

    def begin_drain(self) -> None:
        """Refuse new waits and answer every parked one now."""
        self.draining = True
        self.signals.wake_everyone()

    # Claims -----------------------------------------------------------------------------

    async def claim(
        self,
        session: Session,
        queue: str,
        number: int,
        lease_ms: int | None = None,
        *,
        ended: str = SESSION_ENDED,
    ) -> list[Delivery]:
        """Up to `number` of the queue's oldest ready messages, for the session (none if
        none is ready), each on a lease of `lease_ms` (None: the queue's ack deadline);
        `ended` is the message of the UNAUTHENTICATED answered when the session ended
        while the claim committed."""
        deliveries = await self.guarded(
            session,
            self._store.claim(queue, session.id, number, self.answer_room, lease_ms),
            message_ids_of,
        )
        return await self.hand_over(session, queue, deliveries, ended=ended)

    async def ack_and_claim(
        self,
        session: Session,
        message_ids: Sequence[int],
        done: bool,
        queue: str,
        number: int,
        room_bytes: int,
        lease_ms: int | None = None,
    ) -> tuple[list[errors.Code], list[Delivery]]:
        """Ack the session's messages and claim up to `number` more in one transaction,
        guarded as `claim` is. The caller hands the refill over (`hand_over`): a failure
        here means nothing of the transaction happened, a failure there does not."""
        return await self.guarded(
            session,
            self._store.ack_and_claim(
                session.id, message_ids, done, queue, number, room_bytes, lease_ms
            ),
            lambda outcome: message_ids_of(outcome[1]),
        )

    async def guarded(
        self, session: Session, claim: Awaitable[T], claimed: Callable[[T], list[int]]
    ) -> T:
        """Await a claim so that cancelling the caller cannot strand what it claims: if
        the caller leaves while it commits, `claimed(result)` is given back at once."""
        return await outliving_caller(
            claim, lambda result: self._give_back(session, claimed(result))
        )

    async def hand_over(
        self,
        session: Session,
        queue: str,
        deliveries: list[Delivery],
        *,
        ended: str = SESSION_ENDED,
    ) -> list[Delivery]:
        """What a claim took, for its caller; see the module's docstring."""
        if deliveries:
            if session.ended:  # it ended while the claim was committing
                await self._store.release_session(session.id)
                raise errors.Unauthenticated(ended)
            if self._store.ready_hint(queue) > 0:
                self.signals.wake(queue)  # more is ready: pass the wake-up on
        return deliveries

    async def release(self, session: Session, message_ids: Sequence[int]) -> None:
        """Make messages the session holds ready again now (what a closed stream held)."""
        await self._store.ack(session.id, message_ids, done=False)

    def _give_back(self, session: Session, ids: list[int]) -> None:
        if ids:
            self._background.start(self._release(session, ids))

    async def _release(self, session: Session, message_ids: list[int]) -> None:
        try:
            if session.ended:  # its release may have run before this claim committed
                await self._store.release_session(session.id)
            else:
                await self.release(session, message_ids)
        except errors.QmError as exc:
            log.warning("could not release %d abandoned messages: %s", len(message_ids), exc)

    # Waits ------------------------------------------------------------------------------

    async def wait(
        self,
        session: Session,
        waiter: asyncio.Future[None],
        timeout_s: float | None,
        *,
        queue: str | None = None,
    ) -> bool:
        """Wait until the waiter is resolved (by whoever holds it, or, parked on `queue`,
        by messages becoming ready there); False when timeout_s passed first.

        A caller cancelled after its wake-up came passes it on. One that leaves without
        claiming after it returns must call `pass_on` itself."""
        if queue is not None:
            self.signals.park(queue, waiter)
        try:
            with self.busy(session):
                async with asyncio.timeout(timeout_s):
                    await waiter
            return True
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if queue is not None and waiter.done() and not waiter.cancelled():
                self.signals.wake(queue)  # we were woken but leave: wake someone else
            raise
        finally:
            if queue is not None:
                self.signals.unpark(queue, waiter)

    def pass_on(self, queue: str) -> None:
        """A waiter leaves without claiming: the wake-up it may have taken for a ready
        message goes to the next waiter (a drain or a destroy wakes every one anyway)."""
        self.signals.wake(queue)

    @contextlib.contextmanager
    def busy(self, session: Session) -> Iterator[None]:
        """A call in progress keeps its session alive; its end counts as activity."""
        session.waiting += 1
        try:
            yield
        finally:
            session.waiting -= 1
            session.last_active = max(session.last_active, self._clock())
