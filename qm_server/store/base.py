"""The storage interface: domain operations, each atomic, each durable before it returns.

The engine speaks to storage only through this interface, in domain terms (enqueue, claim
for a session, ack, release a session's messages, map operations) rather than rows, so
that each store does each operation atomically its own way: the embedded SQLite store with
one writer thread and being in flight kept in memory (one process owns every session), a
PostgreSQL store shared by several server processes with `FOR UPDATE SKIP LOCKED`.

Every method is a coroutine that returns only after its effect is committed durably; a
store that cannot commit raises errors.Unavailable and reports itself unhealthy. Domain
failures raise the errors module's classes and change nothing.

Users and grants have an interface of their own (UserDirectory), which Store includes:
`qm-server user ...` opens just that beside a running server, whatever the backend.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from qm_server.permissions import Grant, Permissions
from qm_server.quotas import Room


class Delivery(NamedTuple):
    """A message put in flight for a session.

    A named tuple rather than a dataclass: a store builds thousands per second straight
    from rows (`tuple.__new__(Delivery, row)`), at C speed.
    """

    message_id: int
    element: str
    delivery_count: int


def message_ids_of(deliveries: list[Delivery]) -> list[int]:
    return [d.message_id for d in deliveries]


@dataclass(frozen=True, slots=True)
class QueueCounts:
    ready: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password_hash: str
    is_admin: bool


HealthListener = Callable[[bool], None]


class UserDirectory(abc.ABC):
    """Users and their grants: what logins read and `qm-server user ...` edits.

    Every method is one transaction of its own: it sees only committed state, and a change
    is durable before it returns. Refusals (a name taken, a user missing) are return
    values and change nothing. A directory that cannot read or commit raises
    errors.Unavailable, and nothing changed. The server's Store is one (it serves logins);
    the user commands open a lighter one beside a running server (backends.py), so a
    change made there reaches the server through the store, which reads users afresh at
    each login and reloads every grant within about a second.
    """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; later calls raise Unavailable."""

    @abc.abstractmethod
    async def get_user(self, name: str) -> UserRecord | None:
        """The user, or None."""

    @abc.abstractmethod
    async def list_users(self) -> list[UserRecord]:
        """Every user, in name order (UTF-8 byte order), read in one snapshot."""

    @abc.abstractmethod
    async def count_users(self) -> int:
        """How many users exist (the first start creates the admin when there are none)."""

    @abc.abstractmethod
    async def create_user(self, record: UserRecord) -> bool:
        """Add the user; False, and nothing changed, when the name is taken.

        The check and the insert are one atomic step: of two creations of one name, at
        once or not, exactly one returns True and the other leaves the first untouched.
        """

    @abc.abstractmethod
    async def set_password(self, name: str, password_hash: str, make_admin: bool = False) -> bool:
        """Replace the user's password hash, and make them an admin if `make_admin` (an
        admin stays one either way), atomically; False, nothing changed, when there is
        no such user (it is not created)."""

    @abc.abstractmethod
    async def delete_user(self, name: str) -> bool:
        """Remove the user and every grant of theirs in one atomic step; False when there
        was no such user. A user created again by that name starts with no grants."""

    @abc.abstractmethod
    async def add_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        """Give the user every grant or none, atomically; one flag per grant, False when
        the user held it already. None, nothing changed, when there is no such user."""

    @abc.abstractmethod
    async def remove_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        """Take every grant away from the user at once, atomically; one flag per grant,
        False when the user did not hold it. None, nothing changed, when there is no
        such user."""

    @abc.abstractmethod
    async def load_permissions(self) -> dict[str, Permissions]:
        """Every user's admin flag, grants and credential (the password hash), read in
        one snapshot, keyed by name in name order (a small table, read whole)."""


class Store(UserDirectory):
    """Durable queues, maps and users. Safe to call from many coroutines at once."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema, then make every in-flight message ready again.

        Sessions do not outlive the server process that owns them, so whatever was in
        flight at a crash is redelivered (at-least-once).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued operations and release the files; later calls raise Unavailable."""

    @abc.abstractmethod
    def set_health_listener(self, listener: HealthListener) -> None:
        """`listener(False)` when commits start failing, `listener(True)` once they work."""

    def unhealthy_reason(self) -> str:
        """Why the store last reported itself unhealthy, for people ("" if it gave none)."""
        return ""

    # Queues -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_queue(self, name: str, room: Room) -> None:
        """QueueAlreadyExists, or ResourceExhausted when `room` (the creator's quota and
        limit, quotas.py; Room.server_wide for a bare limit) has no room for one more.
        The creator (room.user) is recorded, so that their quota holds after a restart."""

    @abc.abstractmethod
    async def destroy_queue(self, name: str, force: bool) -> None:
        """Delete the queue and its messages. QueueNotFound; QueueNotEmpty unless force."""

    @abc.abstractmethod
    async def enqueue(self, name: str, elements: Sequence[str]) -> list[int]:
        """Append all elements or none; return their ids, increasing. QueueNotFound."""

    @abc.abstractmethod
    async def claim(self, name: str, session_id: int, limit: int, max_bytes: int) -> list[Delivery]:
        """Atomically move up to `limit` oldest ready messages in flight for the session.

        Stops early once the entries, encoded as ElementInfo (answer_size.py), would
        exceed `max_bytes` (the first message is always taken). Raises delivery counts
        by one. Returns [] when none is ready. QueueNotFound.
        """

    @abc.abstractmethod
    async def ack(self, session_id: int, message_ids: Sequence[int], done: bool) -> list[bool]:
        """Finish messages in flight for the session: done deletes, else ready again.

        One flag per id: False when the id is unknown, already acked or held by another
        session (and nothing changed for it).
        """

    async def ack_and_claim(
        self,
        session_id: int,
        message_ids: Sequence[int],
        done: bool,
        name: str,
        limit: int,
        max_bytes: int,
    ) -> tuple[list[bool], list[Delivery]]:
        """Ack, then claim up to `limit` (0: none) more from `name` for the same session.

        A streaming consumer's refill; a store that can do both in one transaction (one
        commit instead of two) overrides this. Ack failures are per id as in `ack`; the
        claim may raise QueueNotFound after the ack was applied.
        """
        found = await self.ack(session_id, message_ids, done)
        return found, await self.claim(name, session_id, limit, max_bytes) if limit else []

    @abc.abstractmethod
    async def release_session(self, session_id: int) -> None:
        """Make every message in flight for the session ready again (logout, expiry)."""

    @abc.abstractmethod
    async def queue_counts(self, name: str) -> QueueCounts:
        """Ready and in-flight counts. QueueNotFound."""

    @abc.abstractmethod
    def ready_hint(self, name: str) -> int:
        """A cheap, possibly stale, count of ready messages (1 for an unknown queue).

        Long polls use it to avoid claiming from a queue known to be empty; a store that
        cannot tell cheaply returns 1 so that the caller claims. So does an unknown queue:
        one destroyed between a waiter's claim and its parking has woken its waiters
        already, and the waiter must claim again to learn that it is gone.
        """

    @abc.abstractmethod
    def set_ready_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(queue_name)` after messages become ready in that queue (add, nack,
        release), so that waiting consumers wake up. Called on the event loop."""

    # Maps -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def map_put(self, name: str, pairs: Sequence[tuple[str, str]], room: Room) -> None:
        """Set all pairs or none, creating the map (and recording its creator, as
        create_queue does). ResourceExhausted when a new map does not fit `room`."""

    @abc.abstractmethod
    async def map_remove(self, name: str, key: str) -> None:
        """MapNotFound, KeyNotFound."""

    @abc.abstractmethod
    async def map_get(self, name: str, key: str) -> str:
        """MapNotFound, KeyNotFound."""

    @abc.abstractmethod
    async def map_get_all(self, name: str, max_bytes: int) -> dict[str, str]:
        """MapNotFound; ResourceExhausted when the entries, encoded (answer_size.py),
        exceed max_bytes."""

    @abc.abstractmethod
    async def map_get_list(
        self, name: str, offset: int, size: int, max_bytes: int
    ) -> list[tuple[str, str]]:
        """One page in key order (UTF-8 byte order), at most `size` entries, and fewer
        once they would exceed max_bytes encoded (answer_size.py; the first entry always
        comes). MapNotFound."""

    @abc.abstractmethod
    async def map_destroy(self, name: str) -> None:
        """MapNotFound."""
