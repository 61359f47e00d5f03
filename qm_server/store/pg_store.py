"""The PostgreSQL store: queues, maps and users in a database that several nodes share.

Statements are pg_sql's, the schema is migrated by pg_migrate (once, however many nodes
start at once). Every operation runs on a connection of a pool (psycopg_pool) and commits
before it returns; the database does the group commit (synchronous_commit as the database
is configured: on by default, so an answered write survives a crash of the database).

Being in flight is three columns of the message's row: the owner (node, session), the
lease deadline, the delivery count. A claim is ONE statement (pg_sql.CLAIM: the oldest
ready rows of the queue, `FOR UPDATE SKIP LOCKED`, cut to the answer's byte budget, put
in flight); an ack or an extension names the holder in its WHERE clause, so a node whose
session lost a message (its lease expired, its node was declared dead) changes nothing.

Time is the database's (`now()`, pg_sql.NOW), never a node's: leases, delays and ages
mean the same on every node. A test passes `clock` to use a fake one instead.

Nodes and restarts. Sessions still live in each node's memory, and their ids are only
unique within a node, so each store registers itself as a node (a row of `nodes` with
an expiry that `run_due` pushes forward) and owns rows as (node, session). Unlike the
embedded store, opening this one does NOT release what is in flight: other nodes' sessions
may hold it. A clean close releases what this node's sessions held (their sessions end
with the node); a node that dies stops its heartbeat, and once its row expires
(NODE_TTL_MS) any node's `run_due` deletes it and releases its rows in the same
transaction, exactly once (the DELETE decides who). So nothing stays in flight for ever
after a crash: it comes back NODE_TTL_MS after the node's last heartbeat.

What falls due (leases, delays and backoff, max_age, dead nodes) is applied by `run_due`,
which every node runs in one background task (no timer per message): at the earliest due
time this node knows of, and at least every DUE_POLL_S, since other nodes add deadlines
too. The row updates make each expiry happen once, whichever node runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

from qm_server import errors, lifecycle
from qm_server.answer_size import key_value_size
from qm_server.errors import Code
from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, SettingsChange
from qm_server.permissions import Grant, Permissions
from qm_server.quotas import Room
from qm_server.store import pg_sql as sql
from qm_server.store.base import (
    DeadLetter,
    Delivery,
    Enqueued,
    HealthListener,
    IdempotencyKey,
    LeaseOutcome,
    QueueCounts,
    QueueInfo,
    Store,
    UserRecord,
)
from qm_server.store.listing import visible_names
from qm_server.store.pg_driver import psycopg, psycopg_pool
from qm_server.store.pg_migrate import current_version, migrate
from qm_server.store.pg_notify import GONE, READY, ClusterSignals
from qm_server.store.settings_json import settings_from_json, settings_to_json

log = logging.getLogger(__name__)

T = TypeVar("T")

Conn: TypeAlias = "psycopg.AsyncConnection[tuple[Any, ...]]"

DEFAULT_IDEMPOTENCY_WINDOW_S = 600.0
IDEMPOTENCY_PRUNE_BATCH = 8
# A node whose heartbeat is this old is dead: its sessions' messages are released.
NODE_TTL_MS = 15_000
# run_due runs at least this often (other nodes' deadlines are not announced yet).
DUE_POLL_S = 1.0
# Rows one statement of run_due moves at most (it loops until none is left).
DUE_CHUNK = 1000
CONNECT_TIMEOUT_S = 10.0
# Runs of a transaction that the database rolls back for a deadlock.
TX_ATTEMPTS = 3


class PgStore(Store):
    """Queues, maps and users in PostgreSQL (`url`, tables in `schema`)."""

    releases_in_flight_at_open = False
    """Opening does not release what other nodes' sessions hold (the module says how
    what a dead node held comes back). Unlike the embedded store, which cannot tell at a
    start what was in flight, this one knows each delivery's holder, so a clean stop
    ends its sessions as release_session does: past max_deliveries, dead-lettered."""

    def __init__(
        self,
        url: str,
        schema: str = "qm",
        clock: Callable[[], float] | None = None,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        timed: bool = True,
        pool_size: int = 10,
        notify: bool = True,
    ) -> None:
        """`clock`: None for the database's clock; a test's fake one (Unix seconds) is
        used for every time instead. `timed`: run what falls due in the background (a
        test on a fake clock turns it off and calls run_due). `notify`: wake other nodes
        through LISTEN/NOTIFY (pg_notify.py); off for a PostgreSQL-compatible database
        without it, when the fallback alone wakes them, within DUE_POLL_S."""
        if idempotency_window_s < 0:
            raise ValueError("idempotency_window_s must be 0 or more")
        self.url = url
        self.schema = schema
        self._clock = clock
        self._timed = timed
        self._window_ms = int(idempotency_window_s * 1000)
        self._pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=CONNECT_TIMEOUT_S,
        )
        self._node = 0
        self._closed = False
        self._stopping = False  # close() began: the due loop ends
        self._healthy = True
        self._reason = ""
        self._health_listener: HealthListener | None = None
        self._ready_listener: Callable[[str], None] | None = None
        self._gone_listener: Callable[[str], None] | None = None
        self._signals = (
            ClusterSignals(
                url,
                schema,
                lambda: self._node,
                on_ready=lambda name: self._wake({name}),
                on_gone=self._gone,
                on_gap=lambda: self._due_soon(0, recheck=True),
            )
            if notify
            else None
        )
        self._recheck_at = 0.0  # monotonic time of the next fallback recheck
        self._hints: dict[str, int] = {}
        self._due_task: asyncio.Task[None] | None = None
        self._sooner = asyncio.Event()
        self._wake_at = 0.0  # monotonic time the due loop sleeps until

    async def _configure(self, conn: Conn) -> None:
        await conn.execute(
            psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(self.schema))
        )
        # No bitmap scans on the store's connections. A queue filled faster than
        # autovacuum analyzes it has statistics that call it tiny, and on those the claim
        # was planned as a bitmap scan of EVERY ready row and a sort (41 ms instead of
        # 0.1 ms for 200,000 rows, until ANALYZE ran). Without bitmaps the only plan left
        # walks the ready index in id order and stops at the limit, whatever the
        # statistics say; the store's other statements are index lookups that lose
        # nothing by it (tests/test_pg_store.py holds the claim to its plan).
        await conn.execute("SET enable_bitmapscan = off")

    # Life cycle -------------------------------------------------------------------------

    async def _open_pool(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            await self._pool.close()
            self._closed = True
            raise errors.Unavailable(f"cannot reach PostgreSQL: {exc}") from exc

    async def open_directory(self) -> None:
        """Open for the user commands only: no migration (a schema that is missing or
        older is refused, as the embedded store refuses a missing database), no node,
        nothing in the background."""
        await self._open_pool()
        async with self._conn() as conn:
            version = await current_version(conn, self.schema)
        if version != len(sql.MIGRATIONS):
            await self._pool.close()
            self._closed = True
            raise errors.Unavailable(
                f"schema {self.schema!r} holds no qm store at this version (found "
                f"{version}, want {len(sql.MIGRATIONS)}): start qm-server with this "
                "--store once to create it"
            )

    async def open(self) -> None:
        await self._open_pool()
        async with self._conn() as conn:
            applied = await migrate(conn, self.schema)
            if applied:
                log.info("schema %s: %d migrations applied", self.schema, applied)
            cursor = await conn.execute(sql.REGISTER_NODE, self._p(ttl=NODE_TTL_MS))
            self._node = int(_one(await cursor.fetchone()))
        if self._signals is not None:
            await self._signals.start()
        if self._timed:
            self._due_task = asyncio.ensure_future(self._due_loop())

    async def close(self) -> None:
        if self._closed:
            return
        self._stopping = True
        if self._due_task is not None:
            self._due_task.cancel()
            await asyncio.gather(self._due_task, return_exceptions=True)
        if self._node and not self._closed:
            with contextlib.suppress(errors.Unavailable):
                # This node's sessions end with it: what they held is ready again now.
                ready = await self._tx(self._release_node)
                self._notify(ready)
        if self._signals is not None:
            await self._signals.stop()
        self._closed = True
        await self._pool.close()

    async def _release_node(self, conn: Conn) -> set[str]:
        cursor = await conn.execute(sql.RELEASE_NODE, {"node": self._node})
        rows = await cursor.fetchall()
        await conn.execute(sql.DELETE_NODE, (self._node,))
        return await self._released(conn, rows, lifecycle.CAUSE_SESSION_END, backoff=False)

    def set_health_listener(self, listener: HealthListener) -> None:
        self._health_listener = listener

    def unhealthy_reason(self) -> str:
        return self._reason

    def set_ready_listener(self, listener: Callable[[str], None]) -> None:
        self._ready_listener = listener

    async def shared_secret(self, name: str, create: Callable[[], bytes]) -> bytes | None:
        """Created once, under an advisory lock: nodes starting together queue on it, the
        first stores `create()`, the others read what it stored."""

        async def run(conn: Conn) -> bytes:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('qm-secret:' || %s || ':' || %s))",
                (self.schema, name),
            )
            cursor = await conn.execute(sql.GET_SECRET, (name,))
            row = await cursor.fetchone()
            if row is not None:
                return bytes(row[0])
            value = await asyncio.to_thread(create)  # an RSA key takes a while
            await conn.execute(sql.PUT_SECRET, (name, value))
            return value

        return await self._tx(run)

    async def burn_challenge(self, nonce: bytes, expires_at_ms: int) -> bool:
        async with self._conn() as conn:
            cursor = await conn.execute(
                sql.BURN_CHALLENGE, self._p(nonce=nonce, expires=expires_at_ms)
            )
            return cursor.rowcount == 1

    async def _prune_challenges(self) -> None:
        """Used challenges past their expiry: refused by their expiry alone now."""
        async with self._conn() as conn:
            await conn.execute(sql.PRUNE_CHALLENGES, self._p(limit=DUE_CHUNK))

    def set_queue_gone_listener(self, listener: Callable[[str], None]) -> None:
        self._gone_listener = listener

    # Queues -----------------------------------------------------------------------------

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
        async with self._conn() as conn:
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
            async with self._conn() as conn:
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

    # Messages ---------------------------------------------------------------------------

    async def enqueue(
        self,
        name: str,
        elements: Sequence[str],
        delay_ms: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Enqueued:
        if idempotency is None:
            plain = await self._enqueue_plain(name, elements, delay_ms)
            if plain is not None:
                return plain

        async def run(conn: Conn) -> tuple[Enqueued, int]:
            if idempotency is not None:
                replayed = await self._replayed(conn, idempotency)
                if replayed is not None:
                    return replayed, 0
            # KEY SHARE: a destroy of the queue waits for this add (and then deletes it).
            cursor = await conn.execute(
                "SELECT id, settings FROM queues WHERE name = %s FOR KEY SHARE", (name,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise errors.QueueNotFound(f"queue {name!r} does not exist")
            queue_id, text = int(row[0]), row[1]
            settings = settings_from_json(text)
            if settings.max_length:
                # Adds to a bounded queue take their turn, so the count stays exact.
                await conn.execute("SELECT 1 FROM queues WHERE id = %s FOR UPDATE", (queue_id,))
                live = await _scalar(conn, sql.LIVE_COUNT, (queue_id,))
                if live + len(elements) > settings.max_length:
                    raise errors.ResourceExhausted(
                        f"queue {name!r} holds {live} ready and delayed messages; its "
                        f"max_length is {settings.max_length}"
                    )
            delay = settings.delay_ms if delay_ms is None else delay_ms
            ids: list[int] = []
            if elements:
                cursor = await conn.execute(
                    sql.ENQUEUE,
                    self._p(
                        queue=queue_id,
                        state=sql.WAITING if delay > 0 else sql.READY,
                        delay=delay if delay > 0 else 0,
                        payloads=[e.encode() for e in elements],
                    ),
                )
                ids = sorted(int(r[0]) for r in await cursor.fetchall())
            if idempotency is not None:
                await self._remember(conn, idempotency, ids)
            return Enqueued(ids, False), delay if elements else -1

        enqueued, delay = await self._tx(run)
        if delay == 0:
            self._hints[name] = self._hints.get(name, 0) + len(enqueued.ids)
            self._notify({name})
        elif delay > 0:
            self._due_soon(delay)
        return enqueued

    async def _enqueue_plain(
        self, name: str, elements: Sequence[str], delay_ms: int | None
    ) -> Enqueued | None:
        """The common add in one statement (pg_sql.ENQUEUE_PLAIN); None when the queue
        has a max_length (nothing was added: the caller takes the transactional way)."""
        async with self._conn() as conn:
            args = self._p(name=name, delay=delay_ms, payloads=[e.encode() for e in elements])
            cursor = await conn.execute(sql.ENQUEUE_PLAIN, args)
            row = await cursor.fetchone()
        if row is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        bound, delay, ids = row
        if bound:
            return None
        enqueued = Enqueued([int(i) for i in ids], False)
        if enqueued.ids and delay == 0:
            self._hints[name] = self._hints.get(name, 0) + len(enqueued.ids)
            self._notify({name})
        elif enqueued.ids:
            self._due_soon(int(delay))
        return enqueued

    async def _replayed(self, conn: Conn, key: IdempotencyKey) -> Enqueued | None:
        await conn.execute(sql.LOCK_IDEMPOTENCY_KEY, (key.user, key.request_id))
        cursor = await conn.execute(sql.IDEMPOTENCY_KEY, (key.user, key.request_id))
        row = await cursor.fetchone()
        if row is None:
            return None
        fingerprint, ids, created_at = row
        if int(created_at) <= await self._now_ms(conn) - self._window_ms:
            return None  # expired: a new request, which replaces the row
        if bytes(fingerprint) != key.fingerprint:
            raise errors.InvalidArgument(
                f"request_id {key.request_id!r} was used for a different request "
                "(another queue or other elements) within the idempotency window"
            )
        return Enqueued([int(i) for i in ids], True)

    async def _remember(self, conn: Conn, key: IdempotencyKey, ids: list[int]) -> None:
        # The ids themselves: adds on other connections draw from the sequence at the
        # same time, so one add's ids increase but need not be consecutive.
        args = self._p(user=key.user, request=key.request_id, fingerprint=key.fingerprint, ids=ids)
        await conn.execute(sql.PUT_IDEMPOTENCY_KEY, args)
        await conn.execute(
            sql.PRUNE_IDEMPOTENCY_KEYS,
            self._p(window=self._window_ms, limit=IDEMPOTENCY_PRUNE_BATCH),
        )

    async def claim(
        self,
        name: str,
        session_id: int,
        limit: int,
        max_bytes: int,
        lease_ms: int | None = None,
    ) -> list[Delivery]:
        async with self._conn() as conn:
            return await self._claim(conn, name, session_id, limit, max_bytes, lease_ms)

    async def _claim(
        self,
        conn: Conn,
        name: str,
        session_id: int,
        limit: int,
        max_bytes: int,
        lease_ms: int | None,
    ) -> list[Delivery]:
        params = self._p(
            name=name,
            session=session_id,
            node=self._node,
            limit=limit,
            max_bytes=max_bytes,
            lease=lease_ms,
        )
        cursor = await conn.execute(sql.CLAIM, params)
        rows = sorted(await cursor.fetchall())
        if not rows:
            if await self._queue_row(conn, name) is None:
                raise errors.QueueNotFound(f"queue {name!r} does not exist")
            self._hints[name] = 0
            return []
        self._hints.setdefault(name, 1)  # a queue this node serves: the recheck watches it
        deliveries = [
            Delivery(int(i), bytes(p).decode(), int(n), int(e), int(d)) for i, p, n, e, d in rows
        ]
        if deliveries[0].lease_expires_at_ms:
            self._due_soon(lease_ms or 1)
        return deliveries

    async def ack(self, session_id: int, message_ids: Sequence[int], done: bool) -> list[Code]:
        if not done:
            return await self._give_back(
                session_id, message_ids, lifecycle.CAUSE_ACK_ERROR, backoff=True
            )
        async with self._conn() as conn:
            cursor = await conn.execute(
                sql.ACK_DONE, {"ids": list(message_ids), "node": self._node, "session": session_id}
            )
            acked = {int(row[0]) for row in await cursor.fetchall()}
            return await self._codes(conn, session_id, message_ids, acked)

    async def _give_back(
        self, session_id: int, message_ids: Sequence[int], cause: str, backoff: bool
    ) -> list[Code]:
        async def run(conn: Conn) -> tuple[list[Code], set[str]]:
            args = {"ids": list(message_ids), "node": self._node, "session": session_id}
            cursor = await conn.execute(sql.RELEASE_IDS, args)
            rows = await cursor.fetchall()
            ready = await self._released(conn, rows, cause, backoff)
            codes = await self._codes(conn, session_id, message_ids, {int(r[0]) for r in rows})
            return codes, ready

        codes, ready = await self._tx(run)
        self._notify(ready)
        return codes

    async def _codes(
        self, conn: Conn, session_id: int, message_ids: Sequence[int], done: set[int]
    ) -> list[Code]:
        """OK for the ids done; for the others, LEASE_EXPIRED when the calling session held them
        until their lease ran out, else MESSAGE_NOT_FOUND."""
        missing = [m for m in message_ids if m not in done]
        expired: set[int] = set()
        if missing:
            cursor = await conn.execute(
                sql.EXPIRED_BY, {"ids": missing, "node": self._node, "session": session_id}
            )
            expired = {int(row[0]) for row in await cursor.fetchall()}
        return [
            Code.OK if m in done else Code.LEASE_EXPIRED if m in expired else Code.MESSAGE_NOT_FOUND
            for m in message_ids
        ]

    async def extend_leases(
        self, session_id: int, message_ids: Sequence[int], lease_ms: int
    ) -> list[LeaseOutcome]:
        if lease_ms == 0:
            codes = await self._give_back(
                session_id, message_ids, lifecycle.CAUSE_EXTEND_TO_ZERO, backoff=False
            )
            return [LeaseOutcome(code, 0) for code in codes]
        async with self._conn() as conn:
            args = self._p(
                ids=list(message_ids), node=self._node, session=session_id, lease=lease_ms
            )
            cursor = await conn.execute(sql.EXTEND, args)
            extended = {int(i): int(d) for i, d in await cursor.fetchall()}
            codes = await self._codes(conn, session_id, message_ids, set(extended))
        self._due_soon(lease_ms)
        return [
            LeaseOutcome(code, extended.get(m, 0))
            for m, code in zip(message_ids, codes, strict=True)
        ]

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
        found = await self.ack(session_id, message_ids, done) if message_ids else []
        claimed = await self.claim(name, session_id, limit, max_bytes, lease_ms) if limit else []
        return found, claimed

    async def release_session(self, session_id: int) -> None:
        async def run(conn: Conn) -> set[str]:
            args = {"node": self._node, "session": session_id}
            cursor = await conn.execute(sql.RELEASE_SESSION, args)
            rows = await cursor.fetchall()
            await conn.execute(sql.FORGET_EXPIRED_HOLDER, args)
            return await self._released(conn, rows, lifecycle.CAUSE_SESSION_END, backoff=False)

        self._notify(await self._tx(run))

    async def _released(
        self, conn: Conn, rows: Sequence[tuple[Any, ...]], cause: str, backoff: bool
    ) -> set[str]:
        """Rows (id, queue id, delivery count) just made ready in this transaction: those
        past their queue's max_deliveries go to its dead-letter queue (with `cause`), and
        with `backoff`, the others wait out the queue's retry delay. The names of the
        queues that got ready messages."""
        if not rows:
            return set()
        by_queue: dict[int, list[tuple[int, int]]] = {}
        for message_id, queue_id, count in rows:
            by_queue.setdefault(int(queue_id), []).append((int(message_id), int(count)))
        cursor = await conn.execute(sql.QUEUE_NAMES_OF, (list(by_queue),))
        queues = {int(i): (str(n), settings_from_json(t)) for i, n, t in await cursor.fetchall()}
        ready: set[str] = set()
        for queue_id, released in by_queue.items():
            if queue_id not in queues:
                continue
            name, settings = queues[queue_id]
            target = None
            if settings.max_deliveries and settings.dead_letter_queue not in ("", name):
                target = await self._queue_row(conn, settings.dead_letter_queue)
            dead = [m for m, n in released if target and n >= settings.max_deliveries]
            waits = []
            if backoff and settings.retry.initial_delay_ms:
                waits = [
                    (m, w)
                    for m, n in released
                    if m not in dead and (w := settings.retry.delay_ms(n)) > 0
                ]
            if dead and target is not None:
                await self._dead_letter(conn, int(target[0]), name, dead, cause)
                ready.add(settings.dead_letter_queue)
            if waits:
                await conn.execute(
                    sql.TO_WAITING,
                    self._p(ids=[m for m, _ in waits], waits=[w for _, w in waits]),
                )
                self._due_soon(min(w for _, w in waits))
            if len(dead) + len(waits) < len(released):
                ready.add(name)
        return ready

    async def _dead_letter(
        self, conn: Conn, target: int, origin: str, ids: list[int], cause: str
    ) -> None:
        args = self._p(target=target, ids=ids, origin=origin, cause=cause)
        await conn.execute(sql.DEAD_LETTER, args)

    async def run_due(self) -> None:
        ready = await self._tx(self._run_due)
        self._notify(ready)

    async def _run_due(self, conn: Conn) -> set[str]:
        ready: set[str] = set()
        cursor = await conn.execute(sql.NODE_ALIVE, self._p(node=self._node))
        row = await cursor.fetchone()
        alive = row is not None and bool(row[0])
        if row is None:
            log.warning(
                "this node was declared dead (no heartbeat for %d ms): what its sessions "
                "held was released, and their acks of it are refused",
                NODE_TTL_MS,
            )
        await conn.execute(sql.HEARTBEAT, self._p(node=self._node, ttl=NODE_TTL_MS))
        # A node whose own heartbeat had lapsed (the database was out of reach, or this
        # process stalled) sweeps nobody this round: the others were likely cut off too,
        # and get a TTL to renew theirs rather than all releasing each other's messages.
        dead = []
        if alive:
            cursor = await conn.execute(sql.DEAD_NODES, self._p(node=self._node))
            dead = await cursor.fetchall()
        for (node,) in dead:
            cursor = await conn.execute(sql.RELEASE_NODE, {"node": node})
            rows = await cursor.fetchall()
            if rows:
                log.info("node %s stopped: %d messages it held are released", node, len(rows))
            ready |= await self._released(conn, rows, lifecycle.CAUSE_SESSION_END, False)
        while True:
            cursor = await conn.execute(sql.EXPIRE_LEASES, self._p(limit=DUE_CHUNK))
            rows = await cursor.fetchall()
            ready |= await self._released(conn, rows, lifecycle.CAUSE_LEASE_EXPIRY, False)
            if len(rows) < DUE_CHUNK:
                break
        while True:
            cursor = await conn.execute(sql.COME_DUE, self._p(limit=DUE_CHUNK))
            rows = await cursor.fetchall()
            if rows:
                ready |= await self._names_of(conn, {int(r[0]) for r in rows})
            if len(rows) < DUE_CHUNK:
                break
        await self._age_out(conn)
        return ready

    async def _age_out(self, conn: Conn) -> None:
        """Ready messages past their queue's max_age: dead-lettered, or dropped.

        Ids follow first add times (a sequence, and moves keep both), so each queue is
        walked from its smallest ready id and the walk stops at the first young one."""
        now = await self._now_ms(conn)
        cursor = await conn.execute(sql.ALL_QUEUE_SETTINGS)
        for queue_id, name, text in await cursor.fetchall():
            settings = settings_from_json(text)
            if not settings.max_age_ms:
                continue
            cutoff = now - settings.max_age_ms
            old: list[int] = []
            while True:
                cursor = await conn.execute(
                    sql.OLDEST_READY_ROWS + " OFFSET %s FOR UPDATE SKIP LOCKED",
                    (queue_id, DUE_CHUNK, len(old)),
                )
                rows = await cursor.fetchall()
                young = False
                for message_id, enqueued_at in rows:
                    if int(enqueued_at) > cutoff:
                        young = True
                        break
                    old.append(int(message_id))
                if young or len(rows) < DUE_CHUNK:
                    break
            if not old:
                continue
            target = None
            if settings.dead_letter_queue not in ("", name):
                target = await self._queue_row(conn, settings.dead_letter_queue)
            if target is not None:
                await self._dead_letter(conn, int(target[0]), name, old, lifecycle.CAUSE_MAX_AGE)
            else:
                await conn.execute(sql.DELETE_IDS, {"ids": old})

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
        async with self._conn() as conn:
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

    async def messages_held(self, session_ids: Sequence[int]) -> dict[int, int]:
        async with self._conn() as conn:
            args = {"node": self._node, "sessions": list(session_ids)}
            rows = await (await conn.execute(sql.HELD_BY_SESSIONS, args)).fetchall()
            return {int(session): int(held) for session, held in rows}

    async def queue_counts(self, name: str) -> QueueCounts:
        async with self._conn() as conn:
            queue_id, _, _ = await self._queue(conn, name)
            return await self._counts(conn, queue_id)

    def ready_hint(self, name: str) -> int:
        # What this node last saw: 0 after a claim found nothing, until an add or a
        # release here, another node's notification, or the fallback's recheck.
        return self._hints.get(name, 1)

    # Maps -------------------------------------------------------------------------------

    async def map_put(self, name: str, pairs: Sequence[tuple[str, str]], room: Room) -> None:
        async def run(conn: Conn) -> None:
            cursor = await conn.execute(sql.MAP_ID, (name,))
            row = await cursor.fetchone()
            if row is None:
                await conn.execute(sql.LOCK_MAP_SET)
                cursor = await conn.execute(sql.MAP_ID, (name,))
                row = await cursor.fetchone()
            if row is None:
                cursor = await conn.execute(sql.COUNT_MAPS, (room.user,))
                total, owned = _row(await cursor.fetchone())
                room.check(int(total), int(owned) if room.user else 0)
                cursor = await conn.execute(sql.INSERT_MAP, (name, room.user))
                row = await cursor.fetchone()
            map_id = int(_one(row))
            keys = [k.encode() for k, _ in pairs]
            values = [v.encode() for _, v in pairs]
            # A key given twice: the last value wins, as with one put after another.
            last = dict(zip(keys, values, strict=True))
            await conn.execute(sql.PUT_ENTRIES, (map_id, list(last), list(last.values())))

        await self._tx(run)

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

    # Users ------------------------------------------------------------------------------

    async def get_user(self, name: str) -> UserRecord | None:
        async with self._conn() as conn:
            cursor = await conn.execute(sql.GET_USER, (name,))
            row = await cursor.fetchone()
        return UserRecord(str(row[0]), str(row[1]), bool(row[2])) if row else None

    async def list_users(self) -> list[UserRecord]:
        async with self._conn() as conn:
            return await _list_users(conn)

    async def count_users(self) -> int:
        async with self._conn() as conn:
            return await _scalar(conn, sql.COUNT_USERS, ())

    async def create_user(self, record: UserRecord) -> bool:
        async with self._conn() as conn:
            args = (record.name, record.password_hash, record.is_admin)
            cursor = await conn.execute(sql.CREATE_USER, args)
            return cursor.rowcount > 0

    async def set_password(self, name: str, password_hash: str, make_admin: bool = False) -> bool:
        async with self._conn() as conn:
            cursor = await conn.execute(sql.SET_PASSWORD, (password_hash, make_admin, name))
            return cursor.rowcount > 0

    async def delete_user(self, name: str) -> bool:
        async def run(conn: Conn) -> bool:
            await conn.execute(sql.DELETE_USER_GRANTS, (name,))
            cursor = await conn.execute(sql.DELETE_USER, (name,))
            return cursor.rowcount > 0

        return await self._tx(run)

    async def add_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._tx(lambda conn: _change_grants(conn, name, grants, sql.ADD_GRANT))

    async def remove_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._tx(lambda conn: _change_grants(conn, name, grants, sql.REMOVE_GRANT))

    async def load_permissions(self) -> dict[str, Permissions]:
        async def run(conn: Conn) -> dict[str, Permissions]:
            grants: dict[str, list[Grant]] = {}
            cursor = await conn.execute(sql.ALL_GRANTS)
            for username, action, kind, pattern in await cursor.fetchall():
                grants.setdefault(username, []).append(Grant(action, kind, pattern))
            return {
                user.name: Permissions(
                    user.is_admin, tuple(grants.get(user.name, ())), user.password_hash
                )
                for user in await _list_users(conn)
            }

        return await self._tx(run, snapshot=True)

    # What falls due, in the background --------------------------------------------------

    def _due_soon(self, in_ms: int, recheck: bool = False) -> None:
        """Something of this node falls due in about `in_ms`: wake the due loop if it
        sleeps past that. `recheck`: run the fallback's recheck then too."""
        if recheck:
            self._recheck_at = 0.0
        if self._due_task is None:
            return
        if time.monotonic() + in_ms / 1000 < self._wake_at:
            self._sooner.set()

    async def _recheck(self) -> None:
        """The fallback for lost notifications, at most once per DUE_POLL_S: queues this
        node thought empty (where its waiters park) that hold ready messages wake their
        waiters; queues this node served that are gone end their streams. One statement
        over the queues this node knows, whatever the number of waiters."""
        if time.monotonic() < self._recheck_at:
            return
        self._recheck_at = time.monotonic() + DUE_POLL_S
        names = list(self._hints)
        if not names:
            return
        async with self._conn() as conn:
            cursor = await conn.execute(sql.RECHECK_QUEUES, (names,))
            rows = await cursor.fetchall()
        for name, exists, ready in rows:
            if not exists:
                self._gone(str(name))
            elif ready and self._hints.get(str(name)) == 0:
                self._wake({str(name)})

    async def _due_loop(self) -> None:
        while not self._stopping:
            wait = DUE_POLL_S
            try:
                await self.run_due()
                await self._recheck()
                await self._prune_challenges()
                async with self._conn() as conn:
                    cursor = await conn.execute(sql.NEXT_DUE, self._p())
                    row = await cursor.fetchone()
                if row is not None and row[0] is not None:
                    # A millisecond late rather than early: run_due then finds it due.
                    wait = min(wait, max(0.0, (int(row[0]) + 1) / 1000))
            except errors.Unavailable:
                pass
            except Exception:
                log.exception("running what fell due failed")
            self._wake_at = time.monotonic() + wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sooner.wait(), wait)
            self._sooner.clear()

    # Helpers ----------------------------------------------------------------------------

    def _p(self, **params: Any) -> dict[str, Any]:
        """Statement parameters with `now`: None (the database's clock) or the test's."""
        params["now"] = None if self._clock is None else int(self._clock() * 1000)
        return params

    async def _now_ms(self, conn: Conn) -> int:
        return await _scalar(conn, f"SELECT {sql.NOW}", self._p())

    def _notify(self, names: set[str]) -> None:
        """Messages became ready here (the write committed): wake this node's waiters
        and tell the other nodes."""
        self._wake(names)
        if self._signals is not None:
            self._signals.announce(READY, names)

    def _wake(self, names: set[str]) -> None:
        for name in names:
            self._hints[name] = max(1, self._hints.get(name, 0))
            if self._ready_listener is not None:
                self._ready_listener(name)

    def _gone(self, name: str) -> None:
        """Another node destroyed the queue: end this node's waits and streams on it."""
        self._hints.pop(name, None)
        if self._gone_listener is not None:
            self._gone_listener(name)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection; a database out of reach is errors.Unavailable, and the
        store reports itself unhealthy until a call works again."""
        if self._closed:
            raise errors.Unavailable("the store is closed")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.errors.TransactionRollback:
            raise  # the database is fine; _tx runs it again
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            self._set_healthy(False, f"PostgreSQL: {exc}")
            raise errors.Unavailable(f"the database is unavailable: {exc}") from exc
        self._set_healthy(True, "")

    async def _tx(self, run: Callable[[Conn], Awaitable[T]], snapshot: bool = False) -> T:
        """`run` in one transaction (a read-only snapshot if `snapshot`); run again, in a
        new one, when the database rolled it back for a deadlock (rare: claims and
        sweeps skip locked rows, but two nodes' releases may meet)."""
        for attempt in range(TX_ATTEMPTS):
            try:
                async with self._conn() as conn:
                    if snapshot:
                        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        try:
                            return await run(conn)
                        finally:
                            await conn.execute("ROLLBACK")
                    async with conn.transaction():
                        return await run(conn)
            except psycopg.errors.TransactionRollback:
                if attempt == TX_ATTEMPTS - 1:
                    raise
                log.info("transaction rolled back by the database (deadlock); run again")
        raise AssertionError("unreachable")

    def _set_healthy(self, healthy: bool, reason: str) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        self._reason = reason
        if self._health_listener is not None:
            self._health_listener(healthy)

    async def _queue_row(self, conn: Conn, name: str) -> tuple[Any, ...] | None:
        cursor = await conn.execute(sql.QUEUE, (name,))
        return await cursor.fetchone()

    async def _queue(self, conn: Conn, name: str, lock: bool = False) -> tuple[int, Any, Any]:
        cursor = await conn.execute(sql.QUEUE_FOR_UPDATE if lock else sql.QUEUE, (name,))
        row = await cursor.fetchone()
        if row is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return int(row[0]), row[1], row[2]

    async def _names_of(self, conn: Conn, queue_ids: set[int]) -> set[str]:
        cursor = await conn.execute(sql.QUEUE_NAMES_OF, (list(queue_ids),))
        return {str(row[1]) for row in await cursor.fetchall()}

    async def _counts(self, conn: Conn, queue_id: int) -> QueueCounts:
        cursor = await conn.execute(sql.COUNTS, (queue_id,))
        ready, in_flight, delayed = _row(await cursor.fetchone())
        return QueueCounts(int(ready), int(in_flight), int(delayed))

    async def _map(self, conn: Conn, name: str) -> int:
        cursor = await conn.execute(sql.MAP_ID, (name,))
        row = await cursor.fetchone()
        if row is None:
            raise errors.MapNotFound(f"map {name!r} does not exist")
        return int(row[0])


def _row(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


def _one(row: tuple[Any, ...] | None) -> Any:
    return _row(row)[0]


async def _scalar(conn: Conn, statement: str, params: Any) -> int:
    cursor = await conn.execute(statement, params)
    return int(_one(await cursor.fetchone()) or 0)


async def _list_users(conn: Conn) -> list[UserRecord]:
    cursor = await conn.execute(sql.LIST_USERS)
    return [UserRecord(str(n), str(h), bool(a)) for n, h, a in await cursor.fetchall()]


async def _change_grants(
    conn: Conn, name: str, grants: Sequence[Grant], statement: str
) -> list[bool] | None:
    cursor = await conn.execute(sql.USER_EXISTS, (name,))
    if await cursor.fetchone() is None:
        return None
    changed = []
    for grant in grants:
        cursor = await conn.execute(statement, (name, grant.action, grant.kind, grant.pattern))
        changed.append(cursor.rowcount > 0)
    return changed
