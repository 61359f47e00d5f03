"""The map RPCs: MapPut, MapPutAll, MapRemove, MapGet, MapGetAll, MapGetList and
MapDestroy.

Each checks the caller (session, name, grant) and its arguments, then asks the store,
which does the work atomically. Reads hold their answer's bytes in a budget first
(byte_budget.py), so many large reads in progress cannot hold more memory than
--max-reads-in-progress-bytes. What it needs of the engine (the caller's checks, a
user's room for one more map) comes as callables, as queue_admin.py does, so it does
not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from qm_server import audit, errors
from qm_server.byte_budget import ByteBudget
from qm_server.config import Limits
from qm_server.pages import offset_page
from qm_server.queue_admin import Caller
from qm_server.quotas import RoomOf
from qm_server.store.base import Store
from qm_server.validation import check_count, check_text_size


class MapCalls:
    def __init__(
        self, store: Store, limits: Limits, answer_room: int, *, caller: Caller, room: RoomOf
    ) -> None:
        self.store = store
        self.limits = limits
        self.answer_room = answer_room
        self._caller = caller
        self._room = room
        # Map reads in progress hold at most this many bytes of answers (byte_budget.py).
        self._reads = ByteBudget(limits.max_reads_in_progress_bytes)

    async def map_put(self, token: str, name: str, pairs: Sequence[tuple[str, str]]) -> None:
        session = await self._caller(token, "write", "map", name)
        check_count("list", len(pairs), self.limits.max_batch)
        for key, value in pairs:
            check_text_size("key", key, self.limits.max_element_bytes)
            check_text_size("value", value, self.limits.max_element_bytes)
        room = self._room(
            session.username, "maps", self.limits.max_maps, self.limits.max_maps_per_user
        )
        with room.refusals_logged():
            created = await self.store.map_put(name, pairs, room)
        if created:
            audit.record(audit.Event.MAP_CREATED, user=session.username, map=name)

    async def map_remove(self, token: str, name: str, key: str) -> None:
        await self._caller(token, "write", "map", name)
        await self.store.map_remove(name, key)

    async def map_get(self, token: str, name: str, key: str) -> str:
        await self._caller(token, "read", "map", name)
        async with self._reads.hold(self.limits.max_element_bytes):
            return await self.store.map_get(name, key)

    async def map_get_all(self, token: str, name: str) -> dict[str, str]:
        await self._caller(token, "read", "map", name)
        async with self._reads.hold(self.limits.max_response_bytes):
            return await self.store.map_get_all(name, self.answer_room)

    async def map_get_list(
        self, token: str, name: str, offset: int, size: int
    ) -> list[tuple[str, str]]:
        """One page by offset (the seed's paging)."""
        await self._caller(token, "read", "map", name)
        if offset < 0:
            raise errors.InvalidArgument("offset must not be negative")
        check_count("size", size, self.limits.max_page)
        async with self._reads.hold(self.limits.max_response_bytes):
            return await self.store.map_get_list(name, offset, size, self.answer_room)

    async def map_page(
        self, token: str, name: str, offset: int, size: int, start_after: str | None = None
    ) -> tuple[list[tuple[str, str]], str | None]:
        """MapGetList: one page by offset, or, with `start_after`, by key cursor (offset
        must then be 0: the two do not mix); and the start_after of the next page, None
        once no entry follows. The first page by offset is the first by cursor, so a
        client may start cursor paging without a start_after ("" is a key like any
        other: starting after it would skip it)."""
        await self._caller(token, "read", "map", name)
        if offset < 0:
            raise errors.InvalidArgument("offset must not be negative")
        if start_after is not None and offset:
            raise errors.InvalidArgument("offset must be 0 when start_after is given")
        check_count("size", size, self.limits.max_page)
        room = self.answer_room
        async with self._reads.hold(self.limits.max_response_bytes):
            if offset == 0:
                return await self.store.map_page_after(name, start_after, size, room)
            fetched = await self.store.map_get_list(name, offset, size + 1, room)
        return offset_page(fetched, size, room, self.limits.max_element_bytes)

    async def map_destroy(self, token: str, name: str) -> None:
        user = (await self._caller(token, "manage", "map", name)).username
        await self.store.map_destroy(name)
        audit.record(audit.Event.MAP_DESTROYED, user=user, map=name)
