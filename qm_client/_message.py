"""A delivered message, and the login it was delivered to.

These are the records every other client module shares, so they import nothing of the
client: the session hands messages out, subscriptions finish them on their stream, and the
client only passes them on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from qm.v1 import queue_manager_pb2 as pb

from .errors import QMError

__all__ = ["AsyncFinisher", "AsyncMessage", "Delivery", "Finisher", "Login", "Message"]


class Finisher(Protocol):
    """Whoever finishes a message: the session (an ``Ack`` call) or the subscription it
    came on (an ack on its stream).

    Underscored because ``Subscription`` is public and this hook is not part of its API.
    """

    def _finish(self, message: Message, ack_type: pb.AckType) -> None: ...


class AsyncFinisher(Protocol):
    """The asyncio client's :class:`Finisher`: the same hook, awaited."""

    async def _finish(self, message: AsyncMessage, ack_type: pb.AckType) -> None: ...


@dataclass(eq=False)
class Login:
    """One server session, as one login got it. ``held`` is what the server will release
    when it ends, so that the client can say which messages a lost session took with it.

    Compared by identity: a message can only be acked under the login it was delivered to.
    ``lost`` are held messages whose lease the lease keeper lost, with why: their ack or
    nack raises :class:`LeaseLost` instead of calling the server. ``finishing`` are held
    messages whose ack or nack is under way: a refused extension of one of them means
    the ack came first, not that its lease was lost.
    """

    token: str
    ttl: float
    generation: int
    max_batch: int = 0  # the server's limits, as Auth told them (0: not told)
    max_request_bytes: int = 0
    held: dict[int, Delivery] = field(default_factory=dict)
    lost: dict[int, QMError | None] = field(default_factory=dict)
    finishing: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Delivery:
    """A delivered message, in flight for the session that received it until finished.

    Immutable because it is a record of one delivery: a redelivery is a new record
    with a higher ``delivery_count``. The sync client hands out :class:`Message`, the
    asyncio one :class:`AsyncMessage`; they differ only in whether finishing is awaited,
    so the bookkeeping of both clients works on this base.

    ``enqueued_at`` is when the message was first added (UTC; kept across redeliveries,
    dead-lettering and redrive). ``lease_expires_at`` is when this delivery's lease runs
    out unless acked or extended (the server's clock, UTC), ``None`` when the queue has no
    ack deadline: the message is then held while the session lives.
    """

    element: str
    message_id: int
    delivery_count: int
    queue: str
    enqueued_at: datetime
    lease_expires_at: datetime | None
    _owner: object = field(repr=False, compare=False)
    _login: Login = field(repr=False, compare=False)
    _lease_ms: int | None = field(default=None, repr=False, compare=False)
    """The lease asked for when it was delivered (``ack_deadline``), if any: the lease
    keeper renews with the same length."""
    _received_at: float = field(default_factory=time.monotonic, repr=False, compare=False)
    """When the client received it (monotonic seconds): ``max_lease`` counts from here."""


@dataclass(frozen=True)
class Message(Delivery):
    """A message delivered to the sync client. Call exactly one of :meth:`ack` or
    :meth:`nack`."""

    _owner: Finisher = field(repr=False, compare=False)

    def ack(self) -> None:
        """Done: the server removes the message for good.

        Raises :class:`MessageReleased` if the session it was delivered to has ended (the
        message is back in the queue, so processing it again elsewhere is expected), and
        :class:`MessageNotFound` if it was already finished.
        """
        self._owner._finish(self, pb.ACK_TYPE_DONE)

    def nack(self) -> None:
        """Failed: the message goes back to ready at its original place, to be redelivered.

        Raises as :meth:`ack`.
        """
        self._owner._finish(self, pb.ACK_TYPE_ERROR)


@dataclass(frozen=True)
class AsyncMessage(Delivery):
    """A message delivered to :class:`AsyncQueueManagerClient`; ``await`` exactly one of
    :meth:`ack` or :meth:`nack`."""

    _owner: AsyncFinisher = field(repr=False, compare=False)

    async def ack(self) -> None:
        """Done: the server removes the message for good; raises as ``Message.ack``."""
        await self._owner._finish(self, pb.ACK_TYPE_DONE)

    async def nack(self) -> None:
        """Failed: back to ready at its original place; raises as ``Message.ack``."""
        await self._owner._finish(self, pb.ACK_TYPE_ERROR)
