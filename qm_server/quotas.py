"""Per-user quotas, and the share of each server-wide limit that only admins may use.

Why both: a per-user quota alone stops one user from taking everything, but many users
together could still fill a server-wide limit, and then nobody could log in or create
anything to repair it, admins included. So every server-wide limit (sessions, waiting
long polls, subscriptions, queues, maps) keeps `admin_reserve_percent` of itself for
admins, and each other user also has a quota of their own. Admins (Permissions.is_admin,
who hold every grant and manage users) have no per-user quota: they are bounded by the
server-wide limits alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qm_server import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Room:
    """What one user may hold of one resource: checked just before taking one more."""

    noun: str  # "sessions", "queues" ...: for the message
    limit: int  # server-wide
    reserve: int  # of the limit, kept for admins
    user: str | None = None  # None: a bare server-wide limit (tools, tests)
    per_user: int | None = None  # None: no quota of the user's own (admins)

    @classmethod
    def of(
        cls,
        noun: str,
        limit: int,
        per_user: int,
        reserve_percent: int,
        user: str,
        is_admin: bool,
    ) -> Room:
        reserve = limit * reserve_percent // 100
        return cls(noun, limit, reserve, user, None if is_admin else per_user)

    @classmethod
    def server_wide(cls, noun: str, limit: int) -> Room:
        return cls(noun, limit, 0)

    def check(self, in_all: int, of_user: int) -> None:
        """ResourceExhausted unless one more fits, given what is held in all and by the
        user."""
        if self.per_user is None:  # an admin, or a bare limit: the whole of it
            if in_all >= self.limit:
                raise errors.ResourceExhausted(f"the server holds {in_all} {self.noun} (limit)")
            return
        if of_user >= self.per_user:
            raise errors.ResourceExhausted(
                f"user {self.user!r} holds {of_user} {self.noun} (per-user limit)"
            )
        if in_all >= self.limit - self.reserve:
            raise errors.ResourceExhausted(
                f"the server holds {in_all} {self.noun}: the limit is {self.limit}, "
                f"of which the last {self.reserve} are kept for admins"
            )

    @contextlib.contextmanager
    def refusals_logged(self) -> Iterator[None]:
        """A refusal (ResourceExhausted) of what is done inside, logged with the user it
        refused, so that an operator sees who hits limits."""
        try:
            yield
        except errors.ResourceExhausted as exc:
            log.warning("refused user %s one more of its %s: %s", self.user, self.noun, exc)
            raise


# (username, noun, limit, per_user) -> what the user may hold of a resource.
RoomOf = Callable[[str, str, int, int], Room]


class Usage:
    """How many of one resource are held, in all and per user."""

    def __init__(self) -> None:
        self.total = 0
        self._by_user: Counter[str] = Counter()

    def of(self, user: str) -> int:
        return self._by_user[user]

    def add(self, user: str) -> None:
        self.total += 1
        self._by_user[user] += 1

    def remove(self, user: str) -> None:
        self.total -= 1
        self._by_user[user] -= 1
        if self._by_user[user] <= 0:
            del self._by_user[user]
