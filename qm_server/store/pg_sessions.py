"""Sessions in the PostgreSQL database, so that several nodes on one schema act as one.

A row of `sessions` per login: a cluster-wide id (the holder of what it claims), the
SHA-256 of its token (never the token), the user, the credential it logged in with,
the peer, and its creation and last activity in the DATABASE's clock. Any node finds a
session by its token, so a client logged in on one node may call any other.

The hot path costs no round trip: each node caches the sessions it has seen, and a call
with a cached token whose activity this node saw within half the TTL is answered from the
cache. Activity is written in batches, one UPDATE per flush (every FLUSH_S at most, and
more often when the TTL is short), for the sessions used here since the last flush and
for those with a long poll or stream parked here, which stay active however long they
wait. A cached session not used here for half the TTL is read again (it may have been
used on another node, or have ended).

Ending. A logout, an EndSession or the engine's own expiry deletes the row and releases
what the session held in the same transaction; the expiry sweep that every node runs
(`sweep`) deletes every session whose last activity is older than the TTL and releases
their messages likewise. The DELETE decides who releases, so each session's messages
are released exactly once however many nodes sweep. A node that dies stops writing
activity: its sessions expire after the TTL and a surviving node releases what they held.

A node learns that a session it caches ended elsewhere (logout or expiry on another node)
from a notification (pg_notify, at once), and, should that be lost, from the recheck of
its cached ids at each sweep (within SWEEP_S): its streams and waiting polls then end and
its next call is UNAUTHENTICATED. A node paused meanwhile acks nothing that was
redelivered: acks and extensions name the holder session, which no longer holds it.

Claims do not check that their session still exists: that would lock the session's row
on every claim (a write of the row, and multixacts under concurrent claims of one
session). A claim that commits after its session was deleted would leave its messages
held by nobody, so the sweep also releases rows whose holder has no session row (the
orphans): at most SWEEP_S after the race, and never a message of a live session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from qm_server import lifecycle
from qm_server.auth import new_token, token_digest
from qm_server.quotas import Room
from qm_server.sessions import Session, SessionRegistry
from qm_server.store import pg_sql as sql
from qm_server.store.pg_base import _row
from qm_server.store.pg_driver import Conn
from qm_server.store.pg_store import PgStore

log = logging.getLogger(__name__)

# Activity of a session is written at most this often (sooner for a short TTL).
FLUSH_S = 2.0
# Expired sessions one statement of the sweep deletes at most (it loops).
SWEEP_CHUNK = 1000


class PgSessions(SessionRegistry):
    """Sessions of every node on `store`'s schema; `ttl_s` is the session TTL (every node
    must run with the same), `clock` the engine's (activity seen here)."""

    def __init__(
        self, store: PgStore, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._flush_every = min(FLUSH_S, ttl_s / 4)
        self._by_digest: dict[bytes, Session] = {}
        self._digest_by_id: dict[int, bytes] = {}
        self._touched: set[int] = set()
        self._flushed_at = clock()
        self._last_sweep = clock()
        self._ended: Callable[[Session, str], None] = lambda session, why: None
        store.set_session_end_listener(self._ended_elsewhere)

    def set_ended_listener(self, listener: Callable[[Session, str], None]) -> None:
        self._ended = listener

    # Finding ----------------------------------------------------------------------------

    async def create(
        self,
        username: str,
        credential: str,
        now: float,
        room: Room,
        peer: str = "",
        created_at: float = 0.0,
    ) -> tuple[str, Session]:
        token = new_token()
        digest = token_digest(token)

        async def run(conn: Conn) -> tuple[int, int]:
            await conn.execute(sql.LOCK_SESSION_SET)
            cursor = await conn.execute(sql.COUNT_SESSIONS, (username,))
            total, owned = _row(await cursor.fetchone())
            room.check(int(total), int(owned))
            args = self._store._p(digest=digest, user=username, credential=credential, peer=peer)
            cursor = await conn.execute(sql.INSERT_SESSION, args)
            session_id, created_ms = _row(await cursor.fetchone())
            return int(session_id), int(created_ms)

        session_id, created_ms = await self._store._tx(run)
        session = Session(
            session_id, username, now, credential, peer=peer, created_at=created_ms / 1000
        )
        self._remember(digest, session)
        return token, session

    def cached(self, token: str) -> Session | None:
        session = self._by_digest.get(token_digest(token))
        if session is None:
            return None
        if session.waiting or self._clock() - session.last_active <= self._ttl_s / 2:
            return session
        return None  # not seen here lately: `find` reads it again

    async def find(self, token: str) -> Session | None:
        digest = token_digest(token)
        async with self._store._conn(commits=False) as conn:
            cursor = await conn.execute(sql.FIND_SESSION, self._store._p(digest=digest))
            row = await cursor.fetchone()
        known = self._by_digest.get(digest)
        if row is None:
            if known is not None:
                self._ended_elsewhere(known.id, "ended")
            return None
        return self._from_row(digest, row)

    def _from_row(self, digest: bytes | None, row: tuple[Any, ...]) -> Session:
        session_id, username, credential, peer, created_ms, idle_ms = row
        last_active = self._clock() - int(idle_ms) / 1000
        known = self._by_digest.get(digest) if digest is not None else None
        if known is not None:
            known.last_active = max(known.last_active, last_active)
            return known
        session = Session(
            int(session_id),
            str(username),
            last_active,
            str(credential),
            peer=str(peer),
            created_at=int(created_ms) / 1000,
        )
        if digest is not None:
            self._remember(digest, session)
        return session

    def _remember(self, digest: bytes, session: Session) -> None:
        self._by_digest[digest] = session
        self._digest_by_id[session.id] = digest

    def _forget(self, session_id: int) -> Session | None:
        digest = self._digest_by_id.pop(session_id, None)
        self._touched.discard(session_id)
        return None if digest is None else self._by_digest.pop(digest, None)

    def touch(self, session: Session, now: float) -> None:
        session.last_active = now
        self._touched.add(session.id)

    async def get(self, session_id: int) -> Session | None:
        digest = self._digest_by_id.get(session_id)
        async with self._store._conn(commits=False) as conn:
            cursor = await conn.execute(sql.GET_SESSION, self._store._p(id=session_id))
            row = await cursor.fetchone()
        return None if row is None else self._from_row(digest, row)

    async def page(self, start_after: int, limit: int, username: str = "") -> list[Session]:
        args = self._store._p(after=start_after, user=username, limit=limit)
        async with self._store._conn(commits=False) as conn:
            cursor = await conn.execute(sql.PAGE_SESSIONS, args)
            rows = await cursor.fetchall()
        return [self._from_row(self._digest_by_id.get(int(r[0])), r) for r in rows]

    def count(self) -> int:
        return len(self._by_digest)

    def all(self) -> list[Session]:
        return list(self._by_digest.values())

    # Ending -----------------------------------------------------------------------------

    async def end(self, session: Session) -> None:
        self._forget(session.id)

        async def run(conn: Conn) -> set[str]:
            cursor = await conn.execute(sql.DELETE_SESSION, {"id": session.id})
            if await cursor.fetchone() is None:
                return set()  # ended elsewhere, which released what it held
            return await self._store.release_sessions(conn, [session.id])

        self._store._notify(await self._store._tx(run))
        self._store.announce_sessions_ended([session.id])

    def _ended_elsewhere(self, session_id: int, why: str) -> None:
        session = self._forget(session_id)
        if session is not None and not session.ended:
            self._ended(session, why)

    async def sweep(self, cutoff: float) -> list[Session]:
        """Write activity if due, delete the expired sessions of every node and release
        what they (and orphans) held, and recheck the cached ones. Ends nothing itself
        through the engine: every session found ended is reported to the ended listener."""
        now = self._clock()
        if now - self._flushed_at >= self._flush_every:
            await self._flush(now)
        # After a stall of this node (or an outage of the database) longer than half the
        # TTL, the other nodes may not have written their activity either: give them a
        # round to do so before expiring anyone.
        stalled = now - self._last_sweep > self._ttl_s / 2
        self._last_sweep = now
        if not stalled:
            expired, ready = await self._store._tx(self._expire)
            self._store._notify(ready)
            if expired:
                log.info("%d sessions expired; what they held is released", len(expired))
                self._store.announce_sessions_ended(expired)
            for session_id in expired:
                self._ended_elsewhere(session_id, "expired")
        await self._recheck()
        return []

    async def _flush(self, now: float) -> None:
        ids = self._touched | {s.id for s in self._by_digest.values() if s.waiting}
        self._touched = set()
        self._flushed_at = now
        if not ids:
            return
        try:
            async with self._store._conn() as conn:
                cursor = await conn.execute(sql.TOUCH_SESSIONS, self._store._p(ids=sorted(ids)))
                live = {int(r[0]) for r in await cursor.fetchall()}
        except BaseException:
            self._touched |= ids  # written at the next flush that works
            raise
        for session_id in ids - live:
            self._ended_elsewhere(session_id, "ended")

    async def _expire(self, conn: Conn) -> tuple[list[int], set[str]]:
        expired: list[int] = []
        ready: set[str] = set()
        ttl_ms = int(self._ttl_s * 1000)
        while True:
            args = self._store._p(ttl=ttl_ms, limit=SWEEP_CHUNK)
            cursor = await conn.execute(sql.DELETE_EXPIRED_SESSIONS, args)
            ids = [int(r[0]) for r in await cursor.fetchall()]
            if ids:
                ready |= await self._store.release_sessions(conn, ids)
            expired += ids
            if len(ids) < SWEEP_CHUNK:
                break
        cursor = await conn.execute(sql.RELEASE_ORPHANS)
        rows = await cursor.fetchall()
        if rows:
            log.info("%d messages held by no live session are released", len(rows))
            cause = lifecycle.CAUSE_SESSION_END
            ready |= await self._store._released(conn, rows, cause, backoff=False)
        return expired, ready

    async def confirm(self, session: Session) -> bool:
        """One row looked up: a session ended on another node, or by a sweep, while
        notifications were lost (a database restart) is found now rather than at the
        next recheck, and told to the ended listener."""
        if session.ended:
            return False
        async with self._store._conn(commits=False) as conn:
            cursor = await conn.execute(sql.LIVE_SESSIONS, {"ids": [session.id]})
            live = bool(await cursor.fetchall())
        if not live:
            self._ended_elsewhere(session.id, "ended on another node")
        return live

    async def _recheck(self) -> None:
        """Sessions cached here that no longer exist ended elsewhere (a notification lost)."""
        ids = sorted(self._digest_by_id)
        if not ids:
            return
        async with self._store._conn(commits=False) as conn:
            cursor = await conn.execute(sql.LIVE_SESSIONS, {"ids": ids})
            live = {int(r[0]) for r in await cursor.fetchall()}
        for session_id in set(ids) - live:
            self._ended_elsewhere(session_id, "ended on another node")

    async def stop(self) -> None:
        """Write the activity seen here last: the sessions go on without this node."""
        await self._flush(self._clock())
