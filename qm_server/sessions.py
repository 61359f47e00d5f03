"""Sessions: who is logged in, found by the SHA-256 of their token.

Behind a small interface because the servers sharing a PostgreSQL store keep their
sessions in the database, where every node sees them (store/pg_sessions.py); the embedded
server keeps them in memory, which is right for it: a restart ends every session and
releases their messages anyway.

The interface is async where a registry may have to reach its database (a login, a token
this node has not seen, an end, the sweep, the listing), and plain where it must stay
cheap: `cached` (the hot path: a call with a token this node knows costs no round trip),
`touch` (activity is recorded here and written later, in batches) and the local counts.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from qm_server.auth import new_token, token_digest
from qm_server.quotas import Room, Usage


@dataclass(eq=False)
class Session:
    """One login. `ended` turns true once, when logout or expiry released its messages.

    `waiting` counts the session's long polls and subscriptions parked on the server: a
    session with a call in progress is active, so it does not expire under a long wait.
    """

    id: int
    username: str
    last_active: float
    credential: str = field(default="", repr=False)  # Permissions.credential at login
    ended: bool = field(default=False)
    waiting: int = field(default=0)
    peer: str = field(default="")
    """The address that logged in, as gRPC names it ("ipv4:127.0.0.1:53422"), for admins."""
    created_at: float = field(default=0.0)
    """When the login happened, Unix seconds (wall clock, unlike `last_active`)."""


class SessionRegistry(abc.ABC):
    @abc.abstractmethod
    async def create(
        self,
        username: str,
        credential: str,
        now: float,
        room: Room,
        peer: str = "",
        created_at: float = 0.0,
    ) -> tuple[str, Session]:
        """A new session and its token; only the token's digest is kept. `room` is
        checked against the sessions that exist (every node's, for a shared registry)
        before the session is made, atomically with its creation. `now` is the engine's
        clock, `created_at` the wall clock (Unix seconds) shown to admins."""

    @abc.abstractmethod
    def cached(self, token: str) -> Session | None:
        """The session for a token if this node knows it; no I/O."""

    @abc.abstractmethod
    async def find(self, token: str) -> Session | None:
        """The live session for a token, expired or not (the engine judges expiry)."""

    def touch(self, session: Session, now: float) -> None:
        """A call of the session's: it is active (a shared registry writes it later)."""
        session.last_active = now

    @abc.abstractmethod
    async def get(self, session_id: int) -> Session | None:
        """The live session with this id (EndSession names sessions by id), or None."""

    @abc.abstractmethod
    async def page(self, start_after: int, limit: int, username: str = "") -> list[Session]:
        """Up to `limit` sessions with ids above `start_after`, by id; only `username`'s
        when it is not empty (ListSessions)."""

    @abc.abstractmethod
    async def end(self, session: Session) -> None:
        """Forget the session (its token stops working) and release what it held."""

    async def confirm(self, session: Session) -> bool:
        """Whether the session still lives, asked where an answer would otherwise be
        wrong for a session that ended elsewhere unnoticed (an ack finding its messages
        gone). This node's own sessions are known here; a shared registry looks."""
        return not session.ended

    @abc.abstractmethod
    async def sweep(self, cutoff: float) -> list[Session]:
        """The periodic sweep: the sessions idle since `cutoff` (engine clock) for the
        engine to end. A shared registry expires sessions itself instead (by its
        database's clock) and reports them, as every session it finds ended elsewhere,
        to the ended listener."""

    @abc.abstractmethod
    def set_ended_listener(self, listener: Callable[[Session, str], None]) -> None:
        """Told, with why, of each session that ended without this node's `end` (on
        another node, or by a shared registry's sweep): what it held is released
        already; the engine ends its streams and waiting polls."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many sessions this node knows (for its metrics)."""

    @abc.abstractmethod
    def all(self) -> list[Session]:
        """Every session this node knows."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Write what is pending and stop the background work."""


class MemorySessions(SessionRegistry):
    """One server's sessions; `release` gives back what an ended session held."""

    def __init__(self, release: Callable[[int], Awaitable[None]]) -> None:
        self._release = release
        self._by_digest: dict[bytes, Session] = {}
        self._digest_by_id: dict[int, bytes] = {}
        self._of_user = Usage()

    async def create(
        self,
        username: str,
        credential: str,
        now: float,
        room: Room,
        peer: str = "",
        created_at: float = 0.0,
    ) -> tuple[str, Session]:
        room.check(len(self._by_digest), self._of_user.of(username))
        token = new_token()
        session_id = secrets.randbits(62)
        while session_id in self._digest_by_id:
            session_id = secrets.randbits(62)
        session = Session(session_id, username, now, credential, peer=peer, created_at=created_at)
        digest = token_digest(token)
        self._by_digest[digest] = session
        self._digest_by_id[session_id] = digest
        self._of_user.add(username)
        return token, session

    def cached(self, token: str) -> Session | None:
        return self._by_digest.get(token_digest(token))

    async def find(self, token: str) -> Session | None:
        return self.cached(token)

    async def get(self, session_id: int) -> Session | None:
        digest = self._digest_by_id.get(session_id)
        return None if digest is None else self._by_digest[digest]

    async def page(self, start_after: int, limit: int, username: str = "") -> list[Session]:
        # Sorting every session per page is fine for the few thousand one server holds.
        chosen = (
            s
            for s in self._by_digest.values()
            if s.id > start_after and (not username or s.username == username)
        )
        return sorted(chosen, key=lambda s: s.id)[:limit]

    async def end(self, session: Session) -> None:
        digest = self._digest_by_id.pop(session.id, None)
        if digest is not None:
            del self._by_digest[digest]
            self._of_user.remove(session.username)
        await self._release(session.id)

    async def sweep(self, cutoff: float) -> list[Session]:
        return [s for s in self._by_digest.values() if s.last_active < cutoff and not s.waiting]

    def count(self) -> int:
        return len(self._by_digest)

    def all(self) -> list[Session]:
        return list(self._by_digest.values())

    def set_ended_listener(self, listener: Callable[[Session, str], None]) -> None:
        """Sessions here end only through `end`: nobody to tell."""

    async def stop(self) -> None:
        """Nothing to write: the sessions end with the process."""
