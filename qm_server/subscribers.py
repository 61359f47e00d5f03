"""Subscribe streams as the engine counts them: opening one (its caller, arguments and
quotas), and forgetting it once it closes.

A stream's own work (its window, pushes and acks) is subscription.py's; the engine
pokes the streams it finds in `by_session` (a drain, a grant reloaded, a queue
destroyed). What this needs of the engine (the caller's checks, a user's room, the
rules of an ack and of a grant) comes as callables, as queue_admin.py does, so it does
not depend on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from qm_server import errors
from qm_server.config import Limits
from qm_server.delivery import Deliverer
from qm_server.long_polls import check_lease
from qm_server.queue_admin import Authorize, Caller
from qm_server.quotas import Room, RoomOf, Usage
from qm_server.sessions import Session
from qm_server.store.base import Store
from qm_server.subscription import StreamRules, Subscription
from qm_server.validation import check_count

# (token, message ids, ack type) -> the live session, once the ack obeys every rule.
CheckAck = Callable[[str, Sequence[int], int], Awaitable[Session]]


class Subscribers:
    def __init__(
        self,
        store: Store,
        limits: Limits,
        deliverer: Deliverer,
        by_session: dict[int, set[Subscription]],
        usage: Usage,
        *,
        caller: Caller,
        room: RoomOf,
        make_room: Callable[[Room, int, int], None],
        check_ack: CheckAck,
        authorize: Authorize,
    ) -> None:
        """`by_session`: session id -> its open streams; `usage`: streams per user."""
        self._store = store
        self._limits = limits
        self._deliverer = deliverer
        self._subscriptions = by_session
        self._usage = usage
        self._caller = caller
        self._room = room
        self._make_room = make_room
        self._check_ack = check_ack
        self._authorize = authorize

    async def open(
        self, token: str, name: str, max_unacked: int, lease_ms: int | None = None
    ) -> Subscription:
        """A streaming consumer holding at most max_unacked messages at once, each on a
        lease of `lease_ms` (None: the queue's ack deadline)."""
        session = await self._caller(token, "read", "queue", name)
        check_count("max_unacked", max_unacked, self._limits.max_batch)
        check_lease(lease_ms)
        await self._store.check_queue(name)  # QueueNotFound now rather than on first push
        if self._deliverer.draining:
            raise errors.Unavailable("the server is shutting down")
        usage = self._usage
        room = self._room(
            session.username,
            "subscriptions",
            self._limits.max_subscriptions,
            self._limits.max_subscriptions_per_user,
        )
        self._make_room(room, usage.total, usage.of(session.username))
        rules = StreamRules(
            check_ack=lambda ids, ack_type: self._check_ack(token, ids, ack_type),
            check_grant=lambda: self._authorize(session, "read", "queue", name),
            closed=self._forget,
        )
        subscription = Subscription(self._deliverer, rules, session, name, max_unacked, lease_ms)
        self._subscriptions.setdefault(session.id, set()).add(subscription)
        usage.add(session.username)
        return subscription

    def _forget(self, subscription: Subscription) -> None:
        """A closed stream no longer counts, nor is poked."""
        subscriptions = self._subscriptions.get(subscription.session.id)
        if subscriptions is not None and subscription in subscriptions:
            subscriptions.remove(subscription)
            self._usage.remove(subscription.session.username)
            if not subscriptions:
                del self._subscriptions[subscription.session.id]
