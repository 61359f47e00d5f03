"""The lifecycle RPCs that look after queues rather than deliver: UpdateQueue,
GetQueueInfo, Purge, Redrive, ListDeadLetters, ListQueues and ListMaps.

Each checks the caller (session, name, grant) and its arguments, then asks the store,
which does the work atomically; nothing here changes state on its own, so a refusal
leaves everything as it was. What it needs of the engine (the caller's session and
grants, the streams open on a queue) comes as callables, so it does not depend on it.

Grants (permissions.py): `manage` for UpdateQueue and Purge, and for Redrive on the
dead-letter queue, with `write` on each original queue a message moves back to (a
message whose queue the caller may not write stays, PERMISSION_DENIED for its id);
naming a dead_letter_queue needs `write` on it, as it is where messages will be added;
`read` for GetQueueInfo and ListDeadLetters; ListQueues and ListMaps need no grant but
list only the names the caller may `read`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from qm_server import errors
from qm_server.config import Limits
from qm_server.errors import Code
from qm_server.lifecycle import QueueSettings, SettingsChange
from qm_server.pages import dead_letter_page, one_page
from qm_server.permissions import Permissions
from qm_server.sessions import Session
from qm_server.store.base import DeadLetter, QueueCounts, QueueInfo, Store
from qm_server.validation import check_count, check_name, check_unique

# (token, action, kind, name) -> the caller's session, after its name and grant checks.
Caller = Callable[[str, str, str, str], Awaitable[Session]]
# (session, action, kind, name): raises PermissionDenied.
Authorize = Callable[[Session, str, str, str], None]

DEAD_LETTER_FIELD = "settings.dead_letter_queue"


@dataclass(frozen=True, slots=True)
class QueueReport:
    """GetQueueInfo's answer: the store's view and the engine's."""

    info: QueueInfo
    oldest_ready_age_ms: int
    subscriptions: int
    """Subscribe streams open on the queue on this server."""


class QueueAdmin:
    def __init__(
        self,
        store: Store,
        limits: Limits,
        answer_room: int,
        *,
        caller: Caller,
        session: Callable[[str], Awaitable[Session]],
        authorize: Authorize,
        permissions: Callable[[str], Permissions],
        subscriptions_on: Callable[[str], int],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._limits = limits
        self._answer_room = answer_room
        self._caller = caller
        self._session = session
        self._authorize = authorize
        self._permissions = permissions
        self._subscriptions_on = subscriptions_on
        self._wall_clock = wall_clock

    def check_dead_letter_queue(self, session: Session, name: str, queue: str) -> None:
        """A dead_letter_queue being set for `queue`: a valid name, not the queue itself,
        and one the caller may write to (messages will be added there in their name)."""
        if not name:
            return  # none, or turned off
        check_name(DEAD_LETTER_FIELD, name)
        if name == queue:
            raise errors.InvalidArgument(
                f"{DEAD_LETTER_FIELD} must be another queue than {queue!r}"
            )
        self._authorize(session, "write", "queue", name)

    async def update_queue(self, token: str, name: str, change: SettingsChange) -> QueueSettings:
        session = await self._caller(token, "manage", "queue", name)
        if change.dead_letter_queue is not None:
            self.check_dead_letter_queue(session, change.dead_letter_queue, name)
        return await self._store.update_queue(name, change)

    async def queue_info(self, token: str, name: str) -> QueueReport:
        await self._caller(token, "read", "queue", name)
        info = await self._store.queue_info(name)
        oldest = info.oldest_ready_enqueued_at_ms
        age = max(0, int(self._wall_clock() * 1000) - oldest) if oldest else 0
        return QueueReport(info, age, self._subscriptions_on(name))

    async def purge(self, token: str, name: str) -> int:
        await self._caller(token, "manage", "queue", name)
        return await self._store.purge(name)

    async def redrive(
        self, token: str, name: str, message_ids: Sequence[int]
    ) -> tuple[int, list[tuple[int, Code]]]:
        """How many moved, and a result per id given (request order; OK for those that
        moved), or, with no ids, one per dead letter that stayed."""
        session = await self._caller(token, "manage", "queue", name)
        if message_ids:
            check_count("message_ids", len(message_ids), self._limits.max_batch)
            check_unique("message_ids", message_ids)
        permissions = self._permissions(session.username)
        moved, stayed = await self._store.redrive(
            name,
            list(message_ids) or None,
            lambda queue: permissions.allows("write", "queue", queue),
        )
        if not message_ids:
            return moved, stayed
        why = dict(stayed)
        return moved, [(i, why.get(i, Code.OK)) for i in message_ids]

    async def dead_letters(
        self, token: str, name: str, after_id: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        """A page of the dead letters the queue holds, and the after_id of the next."""
        await self._caller(token, "read", "queue", name)
        if after_id < 0:
            raise errors.InvalidArgument(f"after_id must not be negative, not {after_id}")
        check_count("limit", limit, self._limits.max_page)
        room = self._answer_room
        fetched = await self._store.dead_letters(name, after_id, limit + 1, room)
        return dead_letter_page(fetched, limit, room, self._limits.max_element_bytes)

    async def list_queues(
        self, token: str, start_after: str, limit: int
    ) -> tuple[list[tuple[str, QueueCounts]], str]:
        """Queues the caller may read, after `start_after`, and the cursor of the next
        page ("" after the last)."""
        visible = await self._visible(token, "queue", limit)
        fetched = await self._store.list_queues(start_after, limit + 1, visible)
        page, more = one_page(fetched, limit)
        return page, page[-1][0] if more else ""

    async def list_maps(self, token: str, start_after: str, limit: int) -> tuple[list[str], str]:
        """As list_queues, for maps."""
        visible = await self._visible(token, "map", limit)
        fetched = await self._store.list_maps(start_after, limit + 1, visible)
        page, more = one_page(fetched, limit)
        return page, page[-1] if more else ""

    async def _visible(self, token: str, kind: str, limit: int) -> Callable[[str], bool]:
        """Whether the caller may read a name of `kind`, judged on the grants held now
        (the store may call it on another thread: it reads only a frozen snapshot)."""
        session = await self._session(token)
        check_count("limit", limit, self._limits.max_page)
        permissions = self._permissions(session.username)
        return lambda name: permissions.allows("read", kind, name)
