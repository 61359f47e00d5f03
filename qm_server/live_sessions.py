"""The engine's side of sessions: who the caller is, and what ends with a session.

The registry (sessions.py) knows which sessions exist; this module judges a caller's
token on every call (`live`), ends sessions (logout, expiry, a removed user), and keeps
what lives on this node for a session: its Subscribe streams and parked long polls, which
an ending wakes at once, whether the session ended here or, for a registry that nodes
share, on another node (`ended`, the registry's ended listener).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from qm_server import errors
from qm_server.background import Background
from qm_server.sessions import Session, SessionRegistry

if TYPE_CHECKING:
    from qm_server.subscription import Subscription

log = logging.getLogger(__name__)

SESSION_EXPIRED = "the session expired; log in again"
UNKNOWN_TOKEN = "unknown or expired token; log in again"


class LiveSessions:
    def __init__(
        self,
        registry: SessionRegistry,
        ttl_s: float,
        clock: Callable[[], float],
        background: Background,
    ) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self._clock = clock
        self._background = background
        self.subscriptions: dict[int, set[Subscription]] = {}  # by session id
        self.polls: dict[int, set[asyncio.Future[None]]] = {}  # parked long polls, likewise
        registry.set_ended_listener(self.ended)

    async def live(self, token: str) -> Session:
        """The caller's live session; any call with a valid token counts as activity. A
        token this node knows costs no I/O (`cached`); another is looked up."""
        session = self.registry.cached(token) if token else None
        if session is None and token:
            session = await self.registry.find(token)
        now = self._clock()
        if session is None or session.ended:
            raise errors.Unauthenticated(UNKNOWN_TOKEN)
        if not session.waiting and now - session.last_active > self.ttl_s:
            self._background.start(self.end(session, "expired"))
            raise errors.Unauthenticated(SESSION_EXPIRED)
        self.registry.touch(session, now)
        return session

    async def end(self, session: Session, why: str) -> None:
        """End the session here and in the registry, which releases what it held."""
        if session.ended:
            return
        self.ended(session, why)
        await self.registry.end(session)

    def ended(self, session: Session, why: str) -> None:
        """What ends on this node with a session: its streams stop, and its parked long
        polls answer UNAUTHENTICATED now, not at their deadline."""
        if session.ended:
            return
        session.ended = True
        log.info("session %x of %s %s", session.id, session.username, why)
        for subscription in self.subscriptions.get(session.id, set()).copy():
            subscription.poke()
        for waiter in self.polls.pop(session.id, set()):
            if not waiter.done():
                waiter.set_result(None)

    async def expire_idle(self) -> None:
        for session in await self.registry.sweep(self._clock() - self.ttl_s):
            await self.end(session, "expired")

    def streams(self) -> list[Subscription]:
        """Every open Subscribe stream, of every session."""
        return [s for subscriptions in self.subscriptions.values() for s in subscriptions]
