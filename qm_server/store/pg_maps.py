"""The PostgreSQL store's maps: put, remove, get, the whole map, pages, destroy.

A mixin of PgStore (pg_base.py says why mixins): the Store interface's map operations,
each one transaction (`_tx`), reads in a read-only snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

from qm_server import errors
from qm_server.answer_size import key_value_size
from qm_server.quotas import Room
from qm_server.store import pg_sql as sql
from qm_server.store.pg_base import PgBase, _one, _row
from qm_server.store.pg_driver import Conn


class PgMaps(PgBase):
    async def map_put(self, name: str, pairs: Sequence[tuple[str, str]], room: Room) -> bool:
        async def run(conn: Conn) -> bool:
            cursor = await conn.execute(sql.MAP_ID, (name,))
            row = await cursor.fetchone()
            if row is None:
                await conn.execute(sql.LOCK_MAP_SET)
                cursor = await conn.execute(sql.MAP_ID, (name,))
                row = await cursor.fetchone()
            if created := row is None:
                cursor = await conn.execute(sql.COUNT_MAPS, (room.user,))
                total, owned = _row(await cursor.fetchone())
                room.check(int(total), int(owned) if room.user else 0)
                cursor = await conn.execute(sql.INSERT_MAP, (name, room.user))
                row = await cursor.fetchone()
            map_id = int(_one(row))
            # A key given twice: the last value wins, as with one put after another.
            last = {k.encode(): v.encode() for k, v in pairs}
            await conn.execute(sql.PUT_ENTRIES, (map_id, list(last), list(last.values())))
            return created

        return await self._tx(run)

    async def map_remove(self, name: str, key: str) -> None:
        async def run(conn: Conn) -> None:
            map_id = await self._map(conn, name)
            cursor = await conn.execute(sql.DELETE_ENTRY, (map_id, key.encode()))
            if cursor.rowcount == 0:
                raise errors.KeyNotFound(f"map {name!r} has no key {key!r}")

        await self._tx(run)

    async def map_get(self, name: str, key: str) -> str:
        async def run(conn: Conn) -> str:
            cursor = await conn.execute(sql.GET_ENTRY, (await self._map(conn, name), key.encode()))
            row = await cursor.fetchone()
            if row is None:
                raise errors.KeyNotFound(f"map {name!r} has no key {key!r}")
            return bytes(row[0]).decode()

        return await self._tx(run, snapshot=True)

    async def map_get_all(self, name: str, max_bytes: int) -> dict[str, str]:
        async def run(conn: Conn) -> dict[str, str]:
            entries: dict[str, str] = {}
            total = 0
            async with conn.cursor() as cursor:
                await cursor.execute(sql.ALL_ENTRIES, (await self._map(conn, name),))
                async for key, value in cursor:
                    total += key_value_size(len(key), len(value))
                    if total > max_bytes:
                        raise errors.ResourceExhausted(
                            f"map {name!r} holds more than one answer can carry ({max_bytes} "
                            "bytes); page it with MapGetList"
                        )
                    entries[bytes(key).decode()] = bytes(value).decode()
            return entries

        return await self._tx(run, snapshot=True)

    async def map_get_list(
        self, name: str, offset: int, size: int, max_bytes: int
    ) -> list[tuple[str, str]]:
        async def run(conn: Conn) -> list[tuple[str, str]]:
            cursor = await conn.execute(
                sql.PAGE_ENTRIES, (await self._map(conn, name), size, offset)
            )
            page: list[tuple[str, str]] = []
            total = 0
            for key, value in await cursor.fetchall():
                total += key_value_size(len(key), len(value))
                if page and total > max_bytes:
                    break
                page.append((bytes(key).decode(), bytes(value).decode()))
            return page

        return await self._tx(run, snapshot=True)

    async def map_page_after(
        self, name: str, start_after: str | None, size: int, max_bytes: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        async def run(conn: Conn) -> tuple[list[tuple[str, str]], str | None]:
            after = None if start_after is None else start_after.encode()
            cursor = await conn.execute(
                sql.PAGE_ENTRIES_AFTER, (await self._map(conn, name), after, after, size + 1)
            )
            page: list[tuple[str, str]] = []
            total = 0
            more = False
            for key, value in await cursor.fetchall():
                total += key_value_size(len(key), len(value))
                if len(page) == size or (page and total > max_bytes):
                    more = True
                    break
                page.append((bytes(key).decode(), bytes(value).decode()))
            return page, page[-1][0] if more else None

        return await self._tx(run, snapshot=True)

    async def map_destroy(self, name: str) -> None:
        async def run(conn: Conn) -> None:
            map_id = await self._map(conn, name)
            await conn.execute(sql.DELETE_MAP_ENTRIES, (map_id,))
            await conn.execute(sql.DELETE_MAP, (map_id,))

        await self._tx(run)
