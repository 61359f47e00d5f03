"""Seeing and ending sessions: HeartBeat's status for its caller, and the admin RPCs
ListSessions and EndSession.

Kept apart from the engine, which owns the sessions and how one ends; what this needs of
it (the caller's session, whether a user is an admin, ending a session, the streams a
session has open) comes as callables, as queue_admin.py does. The registry is read for
the sessions themselves, the store for the messages they hold: in flight is the store's
to know (it keeps the leases), so a count is always the committed one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qm_server import errors
from qm_server.sessions import Session, SessionRegistry
from qm_server.store.base import Store
from qm_server.validation import check_count


@dataclass(frozen=True, slots=True)
class SessionReport:
    """A session as HeartBeat shows it to its owner and ListSessions to an admin."""

    session_id: int
    username: str
    peer: str
    created_at_ms: int
    last_active_at_ms: int
    messages_held: int
    subscriptions: int


class SessionAdmin:
    def __init__(
        self,
        store: Store,
        registry: SessionRegistry,
        max_page: int,
        *,
        session: Callable[[str], Session],
        is_admin: Callable[[str], bool],
        end: Callable[[Session, str], Awaitable[None]],
        subscriptions_of: Callable[[int], int],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` is the one sessions' `last_active` is read on; `wall_clock` turns it
        into Unix time for admins."""
        self._store = store
        self._registry = registry
        self._max_page = max_page
        self._session = session
        self._is_admin = is_admin
        self._end = end
        self._subscriptions_of = subscriptions_of
        self._clock = clock
        self._wall_clock = wall_clock

    async def heartbeat(self, token: str) -> SessionReport:
        """Renew the caller's session (any call does) and report on it."""
        session = self._session(token)
        held = await self._store.messages_held([session.id])
        return self._report(session, held)

    async def list_sessions(
        self, token: str, start_after: int, limit: int, username: str
    ) -> tuple[list[SessionReport], int]:
        """Live sessions with ids above `start_after` (only `username`'s, unless it is
        empty), and the start_after of the next page (0 after the last)."""
        self._admin(token, "list sessions")
        check_count("limit", limit, self._max_page)
        fetched = self._registry.page(start_after, limit + 1, username)
        page = fetched[:limit]
        held = await self._store.messages_held([s.id for s in page])
        next_start_after = page[-1].id if len(fetched) > limit else 0
        return [self._report(s, held) for s in page], next_start_after

    async def end_session(self, token: str, session_id: int) -> None:
        """End another session as Logout ends one's own. SessionNotFound when it is not
        live (an admin may end its own, which is a logout)."""
        caller = self._admin(token, "end sessions")
        target = self._registry.get(session_id)
        if target is None or target.ended:
            raise errors.SessionNotFound(f"no live session has id {session_id}")
        await self._end(target, f"ended by admin {caller.username}")

    def _admin(self, token: str, what: str) -> Session:
        session = self._session(token)
        if not self._is_admin(session.username):
            raise errors.PermissionDenied(f"user {session.username!r} may not {what}: admins only")
        return session

    def _report(self, session: Session, held: dict[int, int]) -> SessionReport:
        # last_active is on the engine's clock (monotonic): shown as a wall-clock time.
        idle_s = max(0.0, self._clock() - session.last_active)
        return SessionReport(
            session_id=session.id,
            username=session.username,
            peer=session.peer,
            created_at_ms=int(session.created_at * 1000),
            last_active_at_ms=int((self._wall_clock() - idle_s) * 1000),
            messages_held=held.get(session.id, 0),
            subscriptions=self._subscriptions_of(session.id),
        )
