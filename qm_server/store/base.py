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
from dataclasses import dataclass, field
from typing import NamedTuple

from qm_server.config import AuthSettings
from qm_server.errors import Code
from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, SettingsChange
from qm_server.login_failures import LoginFailures
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
    enqueued_at_ms: int = 0
    """When the message was first added (Unix time, ms)."""
    lease_expires_at_ms: int = 0
    """When this delivery's lease runs out (Unix time, ms); 0 for none (held while the
    session lives)."""


def message_ids_of(deliveries: list[Delivery]) -> list[int]:
    return [d.message_id for d in deliveries]


@dataclass(frozen=True, slots=True)
class QueueCounts:
    ready: int
    in_flight: int
    delayed: int = 0
    """Waiting for their delay or retry backoff: neither ready nor in flight."""
    # Filled in published_counts only (metrics); not part of a comparison of depths.
    dead_letters: int = field(default=0, compare=False)
    """Dead letters this queue holds, already counted in the states above: a dead letter
    is a message of its dead-letter queue."""
    oldest_ready_enqueued_at_ms: int = field(default=0, compare=False)
    """The first add of its oldest ready message (Unix time, ms); 0 when none is ready."""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """GetQueueInfo's answer, but for the subscriptions (the engine counts those)."""

    settings: QueueSettings
    counts: QueueCounts
    dead_lettered: int
    """Messages dead-lettered from this queue that still sit in its dead-letter queue."""
    dead_letters_held: int
    """Dead letters from any queue that this queue holds."""
    oldest_ready_enqueued_at_ms: int
    """The first add of the oldest ready message (Unix time, ms); 0 when none is ready."""
    holding_sessions: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message and its history (the proto's DeadLetter)."""

    message_id: int
    original_queue: str
    delivery_count: int
    enqueued_at_ms: int
    dead_lettered_at_ms: int
    cause: str
    element: str


class IdempotencyKey(NamedTuple):
    """What makes an Add or AddAll repeatable (AIP-155): the same user and request_id within
    the window answer the first call's ids. `fingerprint` is a digest of the queue name
    and the elements, so that reusing an id for another request is told apart."""

    user: str
    request_id: str
    fingerprint: bytes


class Enqueued(NamedTuple):
    ids: list[int]
    replayed: bool
    """True when an IdempotencyKey matched an earlier add: nothing was added now."""


class LeaseOutcome(NamedTuple):
    """ExtendLease's result for one id: Code.OK, MESSAGE_NOT_FOUND or LEASE_EXPIRED, and
    the new lease end (Unix time, ms; 0 when given back or not OK)."""

    code: Code
    lease_expires_at_ms: int


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
        """Create or migrate the schema, then release what was in flight.

        In the embedded store sessions do not outlive the server process that owns them,
        so whatever was in flight at a stop or crash is ready again (its delivery
        counted; the SQLite store dead-letters nothing then, sqlite.py says why) and
        redelivered: at-least-once. Delivery counts, delayed and backed-off messages
        with their ready times, and dead letters with their history survive. A store
        shared by several processes keeps each delivery's owner session, lease deadline
        and delivery count in its database and releases only what expired.
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
    async def create_queue(
        self, name: str, room: Room, settings: QueueSettings = DEFAULT_SETTINGS
    ) -> None:
        """QueueAlreadyExists, or ResourceExhausted when `room` (the creator's quota and
        limit, quotas.py; Room.server_wide for a bare limit) has no room for one more.
        The creator (room.user) is recorded, so that their quota holds after a restart.
        `settings` were checked (lifecycle.check_settings) but for their dead-letter
        queue: QueueNotFound when it does not exist, InvalidArgument when it is `name`."""

    @abc.abstractmethod
    async def update_queue(self, name: str, change: SettingsChange) -> QueueSettings:
        """Apply the change atomically (SettingsChange.applied_to checks bounds; the store
        checks the dead-letter queue as create_queue does) and return the settings now.
        Deliveries in flight keep their lease; everything else follows the new settings
        from the commit on. QueueNotFound."""

    @abc.abstractmethod
    async def queue_info(self, name: str) -> QueueInfo:
        """Settings and counts, from one consistent state. QueueNotFound."""

    @abc.abstractmethod
    async def list_queues(
        self, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[tuple[str, QueueCounts]]:
        """Up to `limit` queues named after `start_after` (UTF-8 byte order) for which
        `visible(name)` holds, in name order, with their counts."""

    @abc.abstractmethod
    async def list_maps(
        self, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[str]:
        """As list_queues, for maps: their names."""

    @abc.abstractmethod
    async def destroy_queue(self, name: str, force: bool) -> None:
        """Delete the queue and its messages. QueueNotFound; QueueNotEmpty unless force."""

    @abc.abstractmethod
    async def enqueue(
        self,
        name: str,
        elements: Sequence[str],
        delay_ms: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Enqueued:
        """Append all elements or none; their ids, increasing. QueueNotFound;
        ResourceExhausted past the queue's max_length (ready plus delayed).

        `delay_ms` (None: the queue's delay_ms) keeps them delayed that long. With an
        `idempotency` key seen within the window, nothing is added and the first call's
        ids come back (replayed); the same key with another fingerprint is
        InvalidArgument. Keys are kept durably with the add, across restarts.
        """

    @abc.abstractmethod
    async def claim(
        self,
        name: str,
        session_id: int,
        limit: int,
        max_bytes: int,
        lease_ms: int | None = None,
    ) -> list[Delivery]:
        """Atomically move up to `limit` oldest ready messages in flight for the session.

        Stops early once the entries, encoded as ElementInfo (answer_size.py), would
        exceed `max_bytes` (the first message is always taken). Raises delivery counts
        by one. Each delivery's lease ends `lease_ms` from now (None: the queue's
        ack_deadline_ms; 0 there means no deadline). Returns [] when none is ready.
        QueueNotFound. Delayed messages are not ready until their time, and any number of
        them does not slow a claim.
        """

    @abc.abstractmethod
    async def ack(self, session_id: int, message_ids: Sequence[int], done: bool) -> list[Code]:
        """Finish messages in flight for the session: done deletes, else releases them
        (ready again, after the queue's retry backoff, or dead-lettered past
        max_deliveries).

        One code per id: OK; MESSAGE_NOT_FOUND when the id is unknown, already acked or
        held by another session; LEASE_EXPIRED when the session held it until its lease
        ran out (it stays released). Nothing changes for an id that is not OK.
        """

    @abc.abstractmethod
    async def extend_leases(
        self, session_id: int, message_ids: Sequence[int], lease_ms: int
    ) -> list[LeaseOutcome]:
        """Move the lease of messages the session holds to `lease_ms` from now; 0 gives
        them back (released as by a lease expiry: no backoff, dead-lettered past
        max_deliveries). Codes as `ack`."""

    @abc.abstractmethod
    async def run_due(self) -> None:
        """Apply what is due now: expire leases, make delayed and backed-off messages
        ready, age out messages past max_age. The store arranges to call this itself
        when something falls due (no thread or timer per message); a test on a fake clock
        calls it after moving the clock."""

    @abc.abstractmethod
    async def purge(self, name: str) -> int:
        """Delete every ready and delayed message of the queue at once; how many.
        In-flight messages stay with their holders. QueueNotFound."""

    @abc.abstractmethod
    async def redrive(
        self, name: str, message_ids: Sequence[int] | None, may_write: Callable[[str], bool]
    ) -> tuple[int, list[tuple[int, Code]]]:
        """Move dead letters held by queue `name` (those ids, or all when None) back to
        their original queues, ready at once, ids and delivery counts kept, atomically.
        Returns how many moved and, per id that did not move, why: MESSAGE_NOT_FOUND (not
        a dead letter held by `name`, or in flight), QUEUE_NOT_FOUND (its original queue
        is gone), PERMISSION_DENIED (not `may_write(original queue)`). QueueNotFound."""

    @abc.abstractmethod
    async def dead_letters(
        self, name: str, after_id: int, limit: int, max_bytes: int
    ) -> list[DeadLetter]:
        """Dead letters held by queue `name`, ids above `after_id`, in id order, at most
        `limit` and fewer past `max_bytes` of elements (the first always comes).
        QueueNotFound."""

    async def ack_and_claim(
        self,
        session_id: int,
        message_ids: Sequence[int],
        done: bool,
        name: str,
        limit: int,
        max_bytes: int,
        lease_ms: int | None = None,
    ) -> tuple[list[Code], list[Delivery]]:
        """Ack, then claim up to `limit` (0: none) more from `name` for the same session.

        A streaming consumer's refill; a store that can do both in one transaction (one
        commit instead of two) overrides this. Ack failures are per id as in `ack`; the
        claim may raise QueueNotFound after the ack was applied.
        """
        found = await self.ack(session_id, message_ids, done)
        claimed = await self.claim(name, session_id, limit, max_bytes, lease_ms) if limit else []
        return found, claimed

    @abc.abstractmethod
    async def release_session(self, session_id: int) -> None:
        """Release every message in flight for the session (logout, expiry): ready again
        at once, or dead-lettered past max_deliveries."""

    @abc.abstractmethod
    async def messages_held(self, session_ids: Sequence[int]) -> dict[int, int]:
        """How many messages each of the sessions holds in flight, on every queue;
        sessions holding none are left out. Read-only (HeartBeat, ListSessions); may be
        a moment behind a claim or ack under way."""

    @abc.abstractmethod
    async def queue_counts(self, name: str) -> QueueCounts:
        """Ready and in-flight counts. QueueNotFound."""

    async def check_queue(self, name: str) -> None:
        """QueueNotFound unless the queue exists. A store whose counts cost a scan of the
        queue (PostgreSQL's count a table) answers without counting."""
        await self.queue_counts(name)

    @abc.abstractmethod
    def ready_hint(self, name: str) -> int:
        """A cheap, possibly stale, count of ready messages (1 for an unknown queue).

        Long polls use it to avoid claiming from a queue known to be empty; a store that
        cannot tell cheaply returns 1 so that the caller claims. So does an unknown queue:
        one destroyed between a waiter's claim and its parking has woken its waiters
        already, and the waiter must claim again to learn that it is gone.
        """

    def published_counts(self) -> dict[str, QueueCounts] | None:
        """Every queue's counts as last committed, for metrics: a copy, cheap, and safe to
        take from any thread; None from a store that cannot tell without a query."""
        return None

    def set_commit_observer(self, observer: Callable[[int, float], None]) -> None:
        """`observer(operations, seconds)` after each commit of a store that groups
        operations into commits (the commit's size and duration, fsync included), on the
        thread that committed; a store without group commit ignores it."""
        del observer

    @abc.abstractmethod
    def set_ready_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(queue_name)` after messages become ready in that queue (add, nack,
        release), so that waiting consumers wake up. Called on the event loop."""

    async def shared_secret(self, name: str, create: Callable[[], bytes]) -> bytes | None:
        """The value every server sharing this store uses under `name` (the server's key
        pair): created with `create()` by the first that asks, then read by all. None
        from a store that only one server uses: the server keeps its own (a file in its
        data directory), hence this default."""
        del name, create
        return None

    async def burn_challenge(self, nonce: bytes, expires_at_ms: int) -> bool:
        """Use a login challenge (challenges.SignedChallenges): True the first time a nonce
        is used before `expires_at_ms` (Unix ms, by the store's clock); False for a nonce
        already used, on any server sharing the store, or for one already expired. Only
        a store whose shared_secret is not None is asked."""
        raise NotImplementedError("a store of one server keeps no login challenges")

    def login_failures(self, settings: AuthSettings) -> LoginFailures | None:
        """Failed-login counts that every server sharing this store sees, so that login
        throttles hold across them (login_failures.py). None from a store that only one
        server uses: the server counts in its memory, hence this default."""
        del settings
        return None

    def set_queue_gone_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(queue_name)` when another node sharing this store destroyed the
        queue, so that this node's waits and streams on it end as a local destroy ends
        them. Called on the event loop. A store that only one server uses never calls
        it (the engine handles its own destroys), hence this default."""
        del listener

    # Maps -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def map_put(self, name: str, pairs: Sequence[tuple[str, str]], room: Room) -> bool:
        """Set all pairs or none, creating the map (and recording its creator, as
        create_queue does); True when this call created it. ResourceExhausted when a new
        map does not fit `room`."""

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
    async def map_page_after(
        self, name: str, start_after: str | None, size: int, max_bytes: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        """Key-cursor paging: entries with keys after `start_after` (None: from the first
        key; "" is a key like any other, so it cannot also mean "the start"), as
        map_get_list, and the cursor of the next page (the last key returned), or None
        when no entry follows. MapNotFound."""

    @abc.abstractmethod
    async def map_destroy(self, name: str) -> None:
        """MapNotFound."""
