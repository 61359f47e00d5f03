"""Sessions: who is logged in, found by the SHA-256 of their token.

Behind a small interface because several server processes sharing a PostgreSQL store will
need sessions every node can see; the embedded server keeps them in memory, which is
right for it: a restart ends every session and releases their messages anyway.
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass, field

from qm_server.auth import new_token, token_digest


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
    def create(
        self, username: str, credential: str, now: float, peer: str = "", created_at: float = 0.0
    ) -> tuple[str, Session]:
        """A new session and its token; only the token's digest is kept. `now` is the
        engine's clock, `created_at` the wall clock (Unix seconds) shown to admins."""

    @abc.abstractmethod
    def find(self, token: str) -> Session | None:
        """The live session for a token, expired or not (the engine judges expiry)."""

    @abc.abstractmethod
    def get(self, session_id: int) -> Session | None:
        """The live session with this id (EndSession names sessions by id), or None."""

    @abc.abstractmethod
    def page(self, start_after: int, limit: int, username: str = "") -> list[Session]:
        """Up to `limit` sessions with ids above `start_after`, by id; only `username`'s
        when it is not empty (ListSessions)."""

    @abc.abstractmethod
    def remove(self, session: Session) -> None:
        """Forget the session; its token stops working."""

    @abc.abstractmethod
    def idle_since(self, cutoff: float) -> list[Session]:
        """Sessions with no call in progress whose last activity is older than cutoff."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many sessions exist."""

    @abc.abstractmethod
    def all(self) -> list[Session]:
        """Every session."""


class MemorySessions(SessionRegistry):
    def __init__(self) -> None:
        self._by_digest: dict[bytes, Session] = {}
        self._digest_by_id: dict[int, bytes] = {}

    def create(
        self, username: str, credential: str, now: float, peer: str = "", created_at: float = 0.0
    ) -> tuple[str, Session]:
        token = new_token()
        session_id = secrets.randbits(62)
        while session_id in self._digest_by_id:
            session_id = secrets.randbits(62)
        session = Session(session_id, username, now, credential, peer=peer, created_at=created_at)
        digest = token_digest(token)
        self._by_digest[digest] = session
        self._digest_by_id[session_id] = digest
        return token, session

    def find(self, token: str) -> Session | None:
        return self._by_digest.get(token_digest(token))

    def get(self, session_id: int) -> Session | None:
        digest = self._digest_by_id.get(session_id)
        return None if digest is None else self._by_digest[digest]

    def page(self, start_after: int, limit: int, username: str = "") -> list[Session]:
        # Sorting every session per page is fine for the few thousand one server holds.
        chosen = (
            s
            for s in self._by_digest.values()
            if s.id > start_after and (not username or s.username == username)
        )
        return sorted(chosen, key=lambda s: s.id)[:limit]

    def remove(self, session: Session) -> None:
        digest = self._digest_by_id.pop(session.id, None)
        if digest is not None:
            del self._by_digest[digest]

    def idle_since(self, cutoff: float) -> list[Session]:
        return [s for s in self._by_digest.values() if s.last_active < cutoff and not s.waiting]

    def count(self) -> int:
        return len(self._by_digest)

    def all(self) -> list[Session]:
        return list(self._by_digest.values())
