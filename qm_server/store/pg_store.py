"""The PostgreSQL store: queues, maps and users in a database that several nodes share.

Statements are pg_sql's, the schema is migrated by pg_migrate (once, however many nodes
start at once). Every operation runs on a connection of a pool (psycopg_pool) and commits
before it returns; the database does the group commit (synchronous_commit as the database
is configured: on by default, so an answered write survives a crash of the database).

Being in flight is three columns of the message's row: the owner session, the lease
deadline, the delivery count. A claim is ONE statement (pg_sql.CLAIM: the oldest
ready rows of the queue, `FOR UPDATE SKIP LOCKED`, cut to the answer's byte budget, put
in flight); an ack or an extension names the holder in its WHERE clause, so a node whose
session lost a message (its lease expired, its session ended) changes nothing.

Time is the database's (`now()`, pg_sql.NOW), never a node's: leases, delays and ages
mean the same on every node. A test passes `clock` to use a fake one instead.

Sessions and restarts. Sessions live in the database (pg_sessions.py, table `sessions`),
with ids unique across the cluster, so a message in flight is owned by its session alone
(`owner_session`): any node serving that session may ack it, and the fencing of acks and
extensions is by that id. Nodes need no identity, no heartbeat and no table of their own:
a node that dies stops refreshing its sessions' last activity, they expire after the
session TTL, and whichever node's sweep deletes an expired session releases its messages
in the same transaction, exactly once (the DELETE decides who). Unlike the embedded
store, opening this one releases nothing, and neither does a clean close: the sessions
outlive the node (their clients may go on through another node), and end by logout,
EndSession or expiry like any other.

What falls due (leases, delays and backoff, max_age) is applied by `run_due` (pg_due.py),
which every node runs in one background task (no timer per message): at the earliest due
time this node knows of, and at least every DUE_POLL_S, since other nodes add deadlines
too. The row updates make each expiry happen once, whichever node runs it.

Parts. This module opens and closes the store and holds the messages' hot paths (adds,
claims, acks, extensions), users and the background loop; the rest are mixins on
pg_base.py's connections and helpers (its docstring says why mixins): pg_queues.py
(queues as a whole, listings, dead letters), pg_maps.py, pg_due.py (releases and what
falls due).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from qm_server import errors, lifecycle
from qm_server.config import AuthSettings
from qm_server.errors import Code
from qm_server.fsutil import SchemaTooNew
from qm_server.login_failures import LoginFailures
from qm_server.permissions import Grant, Permissions
from qm_server.store import pg_claims, pg_outcome
from qm_server.store import pg_sql as sql
from qm_server.store.base import (
    Delivery,
    Enqueued,
    HealthListener,
    IdempotencyKey,
    LeaseOutcome,
    QueueCounts,
    UserRecord,
)
from qm_server.store.pg_base import _scalar
from qm_server.store.pg_depths import DepthCache
from qm_server.store.pg_driver import Conn, psycopg, psycopg_pool
from qm_server.store.pg_due import DUE_CHUNK, PgDue
from qm_server.store.pg_login_failures import PgLoginFailures
from qm_server.store.pg_maps import PgMaps
from qm_server.store.pg_migrate import current_version, migrate, too_new
from qm_server.store.pg_notify import ENDED, ClusterSignals
from qm_server.store.pg_queues import PgQueues
from qm_server.store.pg_vacuum import Vacuumer
from qm_server.store.settings_json import settings_from_json

log = logging.getLogger(__name__)

DEFAULT_IDEMPOTENCY_WINDOW_S = 600.0
IDEMPOTENCY_PRUNE_BATCH = 8
# run_due runs at least this often (other nodes' deadlines are not announced yet).
DUE_POLL_S = 1.0
CONNECT_TIMEOUT_S = 10.0


class PgStore(PgQueues, PgMaps, PgDue):
    """Queues, maps and users in PostgreSQL (`url`, tables in `schema`)."""

    releases_in_flight_at_open = False
    """Neither opening nor a clean close releases what is in flight: sessions live in the
    database and outlive nodes (the module says how what they held comes back)."""

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
                secrets.randbits(62),  # tells this node's notifications from the others'
                on_ready=lambda name: self._wake({name}),
                on_gone=self._gone,
                on_gap=lambda: self._due_soon(0, recheck=True),
                on_ended=lambda name: self._session_ended(int(name), "ended on another node"),
            )
            if notify
            else None
        )
        self._session_ended: Callable[[int, str], None] = lambda session_id, why: None
        self._recheck_at = 0.0  # monotonic time of the next fallback recheck
        self._depths = DepthCache()
        self._vacuum = Vacuumer()
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
        older is refused, as the embedded store refuses a missing database), nothing in
        the background."""
        await self._open_pool()
        async with self._conn(commits=False) as conn:
            version = await current_version(conn, self.schema)
        if version != len(sql.MIGRATIONS):
            await self._pool.close()
            self._closed = True
            if version > len(sql.MIGRATIONS):
                raise SchemaTooNew(too_new(self.schema, version))
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
        await self._vacuum.stop()
        if self._signals is not None:
            await self._signals.stop()
        self._closed = True
        await self._pool.close()

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

    def login_failures(self, settings: AuthSettings) -> LoginFailures | None:
        return PgLoginFailures(settings, self._conn, self._p)  # every node counts here

    def set_queue_gone_listener(self, listener: Callable[[str], None]) -> None:
        self._gone_listener = listener

    def set_session_end_listener(self, listener: Callable[[int, str], None]) -> None:
        """Told of sessions that other nodes ended (pg_sessions)."""
        self._session_ended = listener

    def announce_sessions_ended(self, session_ids: list[int]) -> None:
        if self._signals is not None:
            self._signals.announce(ENDED, {str(i) for i in session_ids})

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
        params = self._claim_params(name, session_id, limit, max_bytes, lease_ms)
        cursor = await conn.execute(sql.CLAIM, params)
        deliveries = pg_claims.deliveries(await cursor.fetchall())
        if not deliveries and await self._queue_row(conn, name) is None:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return self._claimed(name, deliveries, lease_ms)

    def _claim_params(
        self, name: str, session: int, limit: int, max_bytes: int, lease: int | None, **more: Any
    ) -> dict[str, Any]:
        return self._p(
            name=name,
            session=session,
            limit=limit,
            max_bytes=max_bytes,
            lease=lease,
            **more,
        )

    def _claimed(
        self, name: str, deliveries: list[Delivery], lease_ms: int | None
    ) -> list[Delivery]:
        if not deliveries:
            self._hints[name] = 0
            return []
        self._hints.setdefault(name, 1)  # a queue this node serves: the recheck watches it
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
                sql.ACK_DONE, {"ids": list(message_ids), "session": session_id}
            )
            acked = {int(row[0]) for row in await cursor.fetchall()}
            return await self._codes(conn, session_id, message_ids, acked)

    async def _give_back(
        self, session_id: int, message_ids: Sequence[int], cause: str, backoff: bool
    ) -> list[Code]:
        async def run(conn: Conn) -> tuple[list[Code], set[str]]:
            args = {"ids": list(message_ids), "session": session_id}
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
            cursor = await conn.execute(sql.EXPIRED_BY, {"ids": missing, "session": session_id})
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
            args = self._p(ids=list(message_ids), session=session_id, lease=lease_ms)
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
        if not (done and message_ids and limit):
            found = await self.ack(session_id, message_ids, done) if message_ids else []
            if not limit:
                return found, []
            with pg_outcome.after_commit(Code.OK in found, "the acks"):  # two commits here
                return found, await self.claim(name, session_id, limit, max_bytes, lease_ms)
        ids = list(message_ids)
        params = self._claim_params(name, session_id, limit, max_bytes, lease_ms, ids=ids)
        async with self._conn() as conn:  # one statement, one round trip, one commit
            cursor = await conn.execute(sql.ACK_AND_CLAIM, params)
            outcome = pg_claims.split(await cursor.fetchall())
            codes = await self._codes(conn, session_id, ids, outcome.acked)
        if not outcome.queue_exists:
            raise errors.QueueNotFound(f"queue {name!r} does not exist")
        return codes, self._claimed(name, outcome.claimed, lease_ms)

    async def messages_held(self, session_ids: Sequence[int]) -> dict[int, int]:
        async with self._conn(commits=False) as conn:
            args = {"sessions": list(session_ids)}
            rows = await (await conn.execute(sql.HELD_BY_SESSIONS, args)).fetchall()
            return {int(session): int(held) for session, held in rows}

    async def queue_counts(self, name: str) -> QueueCounts:
        async with self._conn(commits=False) as conn:
            queue_id, _, _ = await self._queue(conn, name)
            return await self._counts(conn, queue_id)

    async def check_queue(self, name: str) -> None:
        async with self._conn(commits=False) as conn:
            await self._queue(conn, name)

    def published_counts(self) -> dict[str, QueueCounts] | None:
        return self._depths.published()  # read in the background, bounded (pg_depths)

    def ready_hint(self, name: str) -> int:
        # What this node last saw: 0 after a claim found nothing, until an add or a
        # release here, another node's notification, or the fallback's recheck.
        return self._hints.get(name, 1)

    # Users ------------------------------------------------------------------------------

    async def get_user(self, name: str) -> UserRecord | None:
        async with self._conn(commits=False) as conn:
            cursor = await conn.execute(sql.GET_USER, (name,))
            row = await cursor.fetchone()
        return UserRecord(str(row[0]), str(row[1]), bool(row[2])) if row else None

    async def list_users(self) -> list[UserRecord]:
        async with self._conn(commits=False) as conn:
            return await _list_users(conn)

    async def count_users(self) -> int:
        async with self._conn(commits=False) as conn:
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
        async with self._conn(commits=False) as conn:
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
                await self._depths.refresh(self._conn)
                self._vacuum.poke(self._conn)
                async with self._conn(commits=False) as conn:
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
