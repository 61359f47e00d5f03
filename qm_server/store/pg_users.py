"""The users and grants of a PostgreSQL store, for `qm-server user ...` beside running
nodes: the store's own statements on a pool of its own, opened at the first call.

Each call is one transaction of the database, so a change is seen by every node at its
next login or grant reload. A schema that holds no store is refused at the first call
(errors.Unavailable, saying to start qm-server once), not created.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from qm_server.permissions import Grant, Permissions
from qm_server.store.base import UserDirectory, UserRecord
from qm_server.store.pg_store import PgStore

T = TypeVar("T")


class PgUserDirectory(UserDirectory):
    def __init__(self, url: str, schema: str) -> None:
        self._store = PgStore(url, schema, timed=False, pool_size=1)
        self._opened = False

    async def _call(self, run: Callable[[PgStore], Awaitable[T]]) -> T:
        if not self._opened:
            self._opened = True
            await self._store.open_directory()
        return await run(self._store)

    async def close(self) -> None:
        await self._store.close()

    async def get_user(self, name: str) -> UserRecord | None:
        return await self._call(lambda s: s.get_user(name))

    async def list_users(self) -> list[UserRecord]:
        return await self._call(lambda s: s.list_users())

    async def count_users(self) -> int:
        return await self._call(lambda s: s.count_users())

    async def create_user(self, record: UserRecord) -> bool:
        return await self._call(lambda s: s.create_user(record))

    async def set_password(self, name: str, password_hash: str, make_admin: bool = False) -> bool:
        return await self._call(lambda s: s.set_password(name, password_hash, make_admin))

    async def delete_user(self, name: str) -> bool:
        return await self._call(lambda s: s.delete_user(name))

    async def add_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._call(lambda s: s.add_grants(name, grants))

    async def remove_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._call(lambda s: s.remove_grants(name, grants))

    async def load_permissions(self) -> dict[str, Permissions]:
        return await self._call(lambda s: s.load_permissions())
