"""A streaming consumer: pushes ready messages while it holds fewer than max_unacked.

One Subscription per Subscribe stream. It waits on one future that three things can
resolve: messages becoming ready in its queue, an ack freeing room, and its session
ending (or the server draining). So an idle subscription costs one parked future.

A message whose lease runs out (QueueSettings.ack_deadline_ms, or the stream's own) is
released by the store and may go to another consumer; the stream learns of it only
through the consumer: an ack of it (answered LEASE_EXPIRED) or an ExtendLease that finds
it expired takes it out of the window, as does a unary ack or an ExtendLease to 0 of a
message the stream delivered. A consumer that never acks keeps its window full: the
stream pushes nothing more until acks come or it closes, while the leases of what it holds
still expire and those messages go to other consumers (the window counts what the
stream handed out and was not answered for, not what the session still holds).

Refills come in batches: once the stream holds anything, it waits until a quarter of
its window is free (or REFILL_DELAY_S has passed), so a consumer acking one message at a
time does not cost a claim per message. An ack that frees enough room claims the refill
in the same transaction (one commit for both).

It claims and waits through a Deliverer (delivery.py), as long polls do; what it needs
of the service's other rules (an ack's checks, its read grant, being forgotten at its
close) comes as StreamRules from whoever opens it, so it does not depend on the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.answer_size import ACK_RESULT_BYTES
from qm_server.delivery import Deliverer
from qm_server.sessions import Session
from qm_server.store.base import Delivery, message_ids_of

# How long a stream with a little room (below the low-water mark) waits for more acks
# before it refills anyway.
REFILL_DELAY_S = 0.05

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamRules:
    """What a stream asks of the service's rules besides delivery, given by its opener."""

    # The rules every ack obeys, unary or on a stream (raises; counts as activity).
    check_ack: Callable[[Sequence[int], int], Awaitable[object]]
    # Raises PermissionDenied once the stream's read grant is revoked.
    check_grant: Callable[[], None]
    # Called once, at the close: the stream no longer counts against its user's quota.
    closed: Callable[[Subscription], None]


class Subscription:
    def __init__(
        self,
        deliverer: Deliverer,
        rules: StreamRules,
        session: Session,
        queue: str,
        max_unacked: int,
        lease_ms: int | None = None,
    ) -> None:
        self.session = session
        self.queue = queue
        self.max_unacked = max_unacked
        self.lease_ms = lease_ms  # None: the queue's ack deadline
        self._deliverer = deliverer
        self._rules = rules
        self._held: set[int] = set()  # ids delivered on this stream, not yet acked
        self._low_water = max(1, max_unacked // 4)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        # The pusher waits for nothing but acks to free room (its window is full).
        self._awaiting_room = False
        self._queue_destroyed = False

    @property
    def held(self) -> int:
        return len(self._held)

    def poke(self) -> None:
        """Re-check now: room was freed, the session ended, or the server drains."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def forget(self, message_ids: Sequence[int]) -> None:
        """Messages finished outside the stream (a unary ack, an ExtendLease to 0, or
        found expired) leave its window; the pusher re-checks its room."""
        before = len(self._held)
        self._held.difference_update(message_ids)
        if len(self._held) < before:
            self.poke()

    def queue_destroyed(self) -> None:
        """End the stream: what it holds is gone with its queue, so no ack will come."""
        self._queue_destroyed = True
        self.poke()

    async def next_batch(self) -> list[Delivery]:
        """Wait until messages are ready and there is room, then claim them.

        Raises Unauthenticated when the session ends, Unavailable when the server drains,
        QueueNotFound when the queue is destroyed.
        """
        overdue = False
        while True:
            if (stopped := self._stopped_by()) is not None:
                raise stopped
            room = self.max_unacked - len(self._held) if overdue else self._room()
            overdue = False
            if room:
                deliveries = await self._deliverer.claim(
                    self.session, self.queue, room, self.lease_ms
                )
                if deliveries:
                    self._held.update(message_ids_of(deliveries))
                    return deliveries
                await self._wait(park=True)
            elif len(self._held) < self.max_unacked:
                # Some room, below the low-water mark: wait a moment for more acks, then
                # refill anyway, so a consumer that waits for more messages before it
                # acks never stalls.
                overdue = not await self._wait(park=False, timeout_s=REFILL_DELAY_S)
            else:
                self._awaiting_room = True
                try:
                    await self._wait(park=False)
                finally:
                    self._awaiting_room = False

    def _stopped_by(self) -> errors.QmError | None:
        """Why the stream cannot go on, or None: its session ended, the server drains, its
        queue was destroyed, or its read grant was revoked (grants are reloaded every
        second). Checked at each turn of next_batch and around each wait, whose pokes may
        come while it claims."""
        if self._queue_destroyed:
            return errors.QueueNotFound(f"queue {self.queue!r} was destroyed")
        if self.session.ended:
            return errors.Unauthenticated("the session ended; log in again")
        if self._deliverer.draining:
            return errors.Unavailable("the server is shutting down")
        try:
            self._rules.check_grant()
        except errors.PermissionDenied as exc:
            return exc
        return None

    def _room(self) -> int:
        """How many to claim now: 0 while the window is more than three quarters full."""
        room = self.max_unacked - len(self._held)
        return room if room >= self._low_water or not self._held else 0

    async def _wait(self, park: bool, timeout_s: float | None = None) -> bool:
        """Wait for a poke (or, if parked, ready messages); False when timeout_s passed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        if self._stopped_by() is not None:
            waiter.set_result(None)  # its poke came while we claimed, with nobody waiting
        queue = self.queue if park else None
        try:
            woken = await self._deliverer.wait(self.session, waiter, timeout_s, queue=queue)
        finally:
            self._waiter = None
        if woken and park and self._stopped_by() is not None:
            self._deliverer.pass_on(self.queue)  # we leave without claiming
        return woken

    async def ack(
        self, message_ids: Sequence[int], ack_type: int
    ) -> tuple[list[errors.Code], list[Delivery]]:
        """Ack ids delivered on this stream (others are not found), and refill.

        Returns the per-id outcome and the messages claimed to refill the window. Every
        id acked leaves the window whatever its outcome: one answered LEASE_EXPIRED was
        released already (it may be redelivered, here or elsewhere).
        """
        await self._rules.check_ack(message_ids, ack_type)
        mine = [i for i in message_ids if i in self._held]
        if not mine:
            return [errors.Code.MESSAGE_NOT_FOUND] * len(message_ids), []
        self._held.difference_update(mine)
        # No refill for a stream that is ending: draining, its grant revoked, or its queue
        # destroyed (a queue created again under its name is not the one it opened).
        room = self._room() if self._stopped_by() is None else 0
        try:
            results, deliveries = await self._deliverer.ack_and_claim(
                self.session,
                mine,
                ack_type == pb.ACK_TYPE_DONE,
                self.queue,
                room,
                # The answer carries the refill and an AckResult per id not found.
                self._deliverer.answer_room - ACK_RESULT_BYTES * len(message_ids),
                self.lease_ms,
            )
        except errors.QmError:
            # Nothing of a failed transaction happened: the stream still holds them, and
            # its close must release them, or they stay in flight while the session lives.
            self._held.update(mine)
            raise
        if deliveries:
            deliveries = await self._deliverer.hand_over(self.session, self.queue, deliveries)
            self._held.update(message_ids_of(deliveries))
        # The pusher re-checks its room and parks on the queue if needed; one waiting for
        # room in a window that the refill filled again would only wait again.
        if not (self._awaiting_room and len(self._held) >= self.max_unacked):
            self.poke()
        if len(mine) < len(message_ids):  # some were not ours: not found, in their place
            found = dict.fromkeys(message_ids, errors.Code.MESSAGE_NOT_FOUND)
            found.update(zip(mine, results, strict=True))
            results = [found[i] for i in message_ids]
        return results, deliveries

    async def close(self) -> None:
        """Release what the stream still holds: ready again, for someone else."""
        if self._closed:
            return
        self._closed = True
        self._rules.closed(self)
        held, self._held = sorted(self._held), set()
        if held and not self.session.ended:
            try:
                await self._deliverer.release(self.session, held)
            except errors.QmError as exc:
                # A store that cannot commit (a drain while the disk fails): raised out of
                # the stream's handler, it was logged as a servicer error with a traceback.
                # They stay in flight until the session ends, as abandoned claims are left.
                log.warning("could not release %d messages of a closed stream: %s", len(held), exc)
