"""The PostgreSQL store's queues as a whole: create, settings, GetQueueInfo, listings,
destroy, purge, redrive and dead letters.

A mixin of PgStore (pg_base.py says why mixins). Messages themselves (adds, claims,
acks, releases) and what falls due stay in pg_store.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qm_server import errors
from qm_server.errors import Code
from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, SettingsChange
from qm_server.quotas import Room
from qm_server.store import pg_sql as sql
from qm_server.store.base import DeadLetter, QueueCounts, QueueInfo
from qm_server.store.listing import visible_names
from qm_server.store.pg_base import PgBase, _row, _scalar
from qm_server.store.pg_driver import Conn
from qm_server.store.pg_notify import GONE
from qm_server.store.settings_json import settings_from_json, settings_to_json


class PgQueues(PgBase):
    async def create_queue(
        self, name: str, room: Room, settings: QueueSettings = DEFAULT_SETTINGS
    ) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(sql.LOCK_QUEUE_SET)
            if await self._queue_row(conn, name) is not None:
                raise errors.QueueAlreadyExists(f"queue {name!r} already exists")
            await self._check_dead_letter_queue(conn, name, settings)
            cursor = await conn.execute(sql.COUNT_QUEUES, (room.user,))
            total, owned = _row(await cursor.fetchone())
            room.check(int(total), int(owned) if room.user else 0)
            await conn.execute(sql.INSERT_QUEUE, (name, room.user, settings_to_json(settings)))

        await self._tx(run)

    async def update_queue(self, name: str, change: SettingsChange) -> QueueSettings:
        async def run(conn: Conn) -> QueueSettings:
            queue_id, _, text = await self._queue(conn, name, lock=True)
            settings = change.applied_to(settings_from_json(text))
            if change.dead_letter_queue is not None:
                await self._check_dead_letter_queue(conn, name, settings)
            await conn.execute(sql.SET_QUEUE_SETTINGS, (settings_to_json(settings), queue_id))
            return settings

        settings = await self._tx(run)
        if change.max_age_ms:
            self._due_soon(0)
        return settings

    async def _check_dead_letter_queue(
        self, conn: Conn, name: str, settings: QueueSettings
    ) -> None:
        target = settings.dead_letter_queue
        if not target:
            return
        if target == name:
            raise errors.InvalidArgument(
                f"queue {name!r} cannot be its own dead_letter_queue: a message past "
                "max_deliveries would never leave it"
            )
        if await self._queue_row(conn, target) is None:
            raise errors.QueueNotFound(
                f"dead_letter_queue {target!r} does not exist: create it first"
            )

    async def queue_info(self, name: str) -> QueueInfo:
        async def run(conn: Conn) -> QueueInfo:
            queue_id, _, text = await self._queue(conn, name)
            counts = await self._counts(conn, queue_id)
            dead_lettered = await _scalar(conn, sql.DEAD_LETTERED_FROM, (name,))
            held = await _scalar(conn, sql.DEAD_LETTERS_HELD, (queue_id,))
            cursor = await conn.execute(
                "SELECT enqueued_at FROM messages WHERE queue_id = %s AND state = 0"
                " ORDER BY id LIMIT 1",
                (queue_id,),
            )
            oldest = await cursor.fetchone()
            sessions = await _scalar(conn, sql.HOLDING_SESSIONS, (queue_id,))
            return QueueInfo(
                settings=settings_from_json(text),
                counts=counts,
                dead_lettered=dead_lettered,
                dead_letters_held=held,
                oldest_ready_enqueued_at_ms=int(oldest[0]) if oldest else 0,
                holding_sessions=sessions,
            )

        # One snapshot: REPEATABLE READ makes every statement see the same state.
        return await self._tx(run, snapshot=True)

    async def list_queues(
        self, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[tuple[str, QueueCounts]]:
        names = await self._visible_names(sql.QUEUE_NAMES_AFTER, start_after, limit, visible)
        if not names:
            return []
        async with self._conn(commits=False) as conn:
            cursor = await conn.execute(sql.COUNTS_OF_QUEUES, (names,))
            rows = await cursor.fetchall()
        counts = {str(n): QueueCounts(int(r), int(f), int(d)) for n, r, f, d in rows}
        return [(name, counts[name]) for name in names if name in counts]

    async def list_maps(
        self, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[str]:
        return await self._visible_names(sql.MAP_NAMES_AFTER, start_after, limit, visible)

    async def _visible_names(
        self, statement: str, start_after: str, limit: int, visible: Callable[[str], bool]
    ) -> list[str]:
        """Names after the cursor (listing.visible_names)."""

        async def names_after(cursor_name: str, count: int) -> list[str]:
            async with self._conn(commits=False) as conn:
                cursor = await conn.execute(statement, (cursor_name, count))
                return [str(row[0]) for row in await cursor.fetchall()]

        return await visible_names(names_after, start_after, limit, visible)

    async def destroy_queue(self, name: str, force: bool) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(sql.LOCK_QUEUE_SET)
            queue_id, _, _ = await self._queue(conn, name, lock=True)
            if not force:
                counts = await self._counts(conn, queue_id)
                if counts.ready or counts.in_flight or counts.delayed:
                    raise errors.QueueNotEmpty(
                        f"queue {name!r} holds {counts.ready} ready, {counts.delayed} "
                        f"delayed and {counts.in_flight} in-flight messages; use force to "
                        "destroy it anyway"
                    )
            await conn.execute(sql.DELETE_QUEUE_MESSAGES, (queue_id,))
            await conn.execute(sql.DELETE_HELD_DEAD_LETTERS, (queue_id,))
            await conn.execute(sql.DELETE_QUEUE, (queue_id,))

        await self._tx(run)
        self._hints.pop(name, None)
        if self._signals is not None:
            self._signals.announce(GONE, {name})

    async def purge(self, name: str) -> int:
        async def run(conn: Conn) -> int:
            queue_id, _, _ = await self._queue(conn, name)
            return await _scalar(conn, sql.PURGE, (queue_id,))

        removed = await self._tx(run)
        self._hints[name] = 0
        return removed

    async def redrive(
        self, name: str, message_ids: Sequence[int] | None, may_write: Callable[[str], bool]
    ) -> tuple[int, list[tuple[int, Code]]]:
        async def run(conn: Conn) -> tuple[int, list[tuple[int, Code]], set[str]]:
            holder, _, _ = await self._queue(conn, name)
            if message_ids is None:
                cursor = await conn.execute(sql.HELD_DEAD_LETTERS, (holder,))
                found = await cursor.fetchall()
                wanted = [int(r[0]) for r in found]
            else:
                wanted = list(dict.fromkeys(message_ids))
                cursor = await conn.execute(sql.HELD_DEAD_LETTERS_OF, (holder, wanted))
                found = await cursor.fetchall()
            origins = {int(i): (str(o), int(s)) for i, o, s in found}
            names = sorted({o for o, _ in origins.values()})
            cursor = await conn.execute(
                "SELECT name, id FROM queues WHERE name = ANY(%s)", (names,)
            )
            queue_ids = {str(n): int(i) for n, i in await cursor.fetchall()}
            failed: list[tuple[int, Code]] = []
            by_target: dict[str, list[int]] = {}
            for message_id in wanted:
                entry = origins.get(message_id)
                if entry is None or entry[1] == sql.HELD:
                    failed.append((message_id, Code.MESSAGE_NOT_FOUND))
                elif entry[0] not in queue_ids:
                    failed.append((message_id, Code.QUEUE_NOT_FOUND))
                elif not may_write(entry[0]):
                    failed.append((message_id, Code.PERMISSION_DENIED))
                else:
                    by_target.setdefault(entry[0], []).append(message_id)
            moved = 0
            for origin, ids in by_target.items():
                await conn.execute(sql.REDRIVE, {"target": queue_ids[origin], "ids": ids})
                moved += len(ids)
            return moved, failed, set(by_target)

        moved, failed, ready = await self._tx(run)
        self._notify(ready)
        return moved, failed

    async def dead_letters(
        self, name: str, after_id: int, limit: int, max_bytes: int
    ) -> list[DeadLetter]:
        async with self._conn(commits=False) as conn:
            queue_id, _, _ = await self._queue(conn, name)
            cursor = await conn.execute(sql.DEAD_LETTERS_PAGE, (queue_id, after_id, limit))
            letters: list[DeadLetter] = []
            total = 0
            async for i, origin, n, enqueued, at, cause, payload in cursor:
                total += len(payload)
                if letters and total > max_bytes:
                    break
                letters.append(
                    DeadLetter(
                        int(i),
                        origin,
                        int(n),
                        int(enqueued),
                        int(at),
                        cause,
                        bytes(payload).decode(),
                    )
                )
            return letters
