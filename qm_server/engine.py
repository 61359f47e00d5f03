"""The rules of the service: logins, sessions, delivery, waiting, limits.

Imports no gRPC. All state here is owned by one asyncio event loop: every method runs on
it, so the engine needs no lock; blocking work (RSA, scrypt, SQLite) runs elsewhere
(an executor, the store's writer thread) and is awaited. Long polls wait on futures, not
threads, so a thousand idle consumers cost a thousand small objects.

The lifecycle's rules live beside the calls they change: a call's own ack deadline
(`take`, `subscribe`), delays and request_ids (`enqueue`, idempotency.py), ExtendLease
(`extend_lease`), and settings given to NewQueue. The RPCs that look after queues rather
than deliver (UpdateQueue, GetQueueInfo, Purge, Redrive, ListDeadLetters, ListQueues,
ListMaps) are `admin`'s (queue_admin.py); the map RPCs are `maps`' (map_calls.py); a long
poll's claims and waits are `polls`' (long_polls.py), the opening of Subscribe streams
`subscribers`' (subscribers.py). Leases run out, and delayed messages become ready,
inside the store, which wakes waiters through the ready listener as an add does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from qm.v1 import queue_manager_pb2 as pb
from qm_server import audit, errors
from qm_server.answer_size import entries_room
from qm_server.auth import ALGORITHM, ChallengeBook, KeyPair, PasswordHasher
from qm_server.background import Background, outliving_caller
from qm_server.challenges import Challenges, MemoryChallenges
from qm_server.config import AuthSettings, Limits
from qm_server.delivery import Deliverer
from qm_server.idempotency import idempotency_key
from qm_server.lifecycle import (
    DEFAULT_SETTINGS,
    SettingsChange,
    check_ack_deadline_ms,
    check_delay_ms,
)
from qm_server.live_sessions import SESSION_EXPIRED, LiveSessions
from qm_server.login_guard import LoginGuard
from qm_server.long_polls import LongPolls
from qm_server.map_calls import MapCalls
from qm_server.permissions import Permissions
from qm_server.queue_admin import QueueAdmin
from qm_server.quotas import Room, Usage
from qm_server.session_admin import SessionAdmin, SessionReport
from qm_server.sessions import MemorySessions, Session, SessionRegistry
from qm_server.store.base import Delivery, Enqueued, LeaseOutcome, Store
from qm_server.subscribers import Subscribers
from qm_server.subscription import Subscription
from qm_server.validation import (
    check_count,
    check_name,
    check_texts_size,
    check_unique,
)
from qm_server.waiting import ReadySignals

log = logging.getLogger(__name__)

T = TypeVar("T")
LOGIN_FAILED = "login failed: unknown user, wrong password, or a bad or used challenge"
CHANGED_MEANWHILE = "the user was removed or given a new password during the login"
# The argument that names what a permission is about, by kind, for check_name's message.
NAME_FIELD = {"queue": "queue_name", "map": "map"}


@dataclass(frozen=True)
class EngineStats:
    """What the engine holds and has refused, read for metrics at scrape time."""

    sessions: int
    subscriptions: int
    waiting_polls: int
    login_failures: int
    login_refusals: int


@dataclass(frozen=True)
class Challenge:
    public_key_pem: str
    fingerprint: str
    algorithm: str
    challenge: bytes
    ttl_ms: int


class Engine:
    """One per server process; shares nothing with other processes but the store."""

    def __init__(
        self,
        store: Store,
        keys: KeyPair,
        *,
        session_ttl_s: float = 30.0,
        limits: Limits | None = None,
        auth: AuthSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sessions: SessionRegistry | None = None,
        wall_clock: Callable[[], float] = time.time,
        challenges: Challenges | None = None,
    ) -> None:
        """`clock` times sessions and waits; `wall_clock` (Unix time, as the store's)
        gives the age of a queue's oldest message."""
        self.store = store
        self.keys = keys
        self.session_ttl_s = session_ttl_s
        self.limits = limits or Limits()
        self._auth = auth or AuthSettings()
        self._clock = clock
        self._wall_clock = wall_clock
        self._sessions = sessions or MemorySessions(store.release_session)
        # Servers sharing a store pass theirs (challenges.py); one server keeps its own.
        self._challenges = challenges or MemoryChallenges(
            ChallengeBook(self._auth.challenge_ttl_s, self._auth.max_pending_challenges, clock)
        )
        self._hasher = PasswordHasher.from_settings(self._auth)
        # Failed logins are counted where the store says: shared, when servers share it.
        self._login_guard = LoginGuard(self._auth, clock, store.login_failures(self._auth))
        # Password hashing and RSA decryption are slow and CPU-bound: a small pool caps
        # how many run at once, so a login flood cannot starve the event loop's callers.
        self._crypto_pool = ThreadPoolExecutor(
            max_workers=self._auth.max_concurrent_hashes, thread_name_prefix="qm-crypto"
        )
        self.signals = ReadySignals(store.ready_hint)
        self._background = Background()
        # Who calls, and what ends with a session on this node (live_sessions.py).
        self.sessions = LiveSessions(self._sessions, session_ttl_s, clock, self._background)
        # The bytes an answer's entries may take: what fits a default client, framed.
        self.answer_room = entries_room(self.limits.max_response_bytes)
        # Claims and waits of long polls and streams alike (delivery.py).
        self.deliverer = Deliverer(store, self.signals, self._background, clock, self.answer_room)
        self._subscriptions = self.sessions.subscriptions
        self._polls = self.sessions.polls
        # What each user holds, for the quotas (quotas.py); sessions are counted by their
        # registry, queues and maps by the store, which records their creators.
        self._poll_usage = Usage()
        self._subscription_usage = Usage()
        # user name -> grants; reloaded at each login and every sweep, so that grants,
        # revocations and removed users take effect within a second.
        self._permissions: dict[str, Permissions] = {}
        self._sweeper: asyncio.Task[None] | None = None
        store.set_ready_listener(self.signals.wake)
        store.set_queue_gone_listener(self._queue_gone)  # destroyed on another node
        # UpdateQueue, GetQueueInfo, Purge, Redrive and the listings (queue_admin.py).
        self.admin = QueueAdmin(
            store,
            self.limits,
            self.answer_room,
            caller=self._caller,
            session=self.session,
            authorize=self.authorize,
            permissions=self._permissions_of,
            subscriptions_on=self._subscriptions_on,
            wall_clock=wall_clock,
        )
        # Poll and PullElements: their claims, and their waits for a ready message.
        self.polls = LongPolls(
            self.limits,
            self.deliverer,
            self.signals,
            self._polls,
            self._poll_usage,
            caller=self._caller,
            room=self._room,
            make_room=self._make_room,
            clock=clock,
        )
        # Subscribe streams: opened under their quotas, forgotten once closed.
        self.subscribers = Subscribers(
            store,
            self.limits,
            self.deliverer,
            self._subscriptions,
            self._subscription_usage,
            caller=self._caller,
            room=self._room,
            make_room=self._make_room,
            check_ack=self.check_ack,
            authorize=self.authorize,
        )
        # The map RPCs, and the byte budget of their reads (map_calls.py).
        self.maps = MapCalls(
            store, self.limits, self.answer_room, caller=self._caller, room=self._room
        )
        # HeartBeat's status, ListSessions and EndSession (session_admin.py).
        self.session_admin = SessionAdmin(
            store,
            self._sessions,
            self.limits.max_page,
            session=self.session,
            is_admin=lambda username: self._permissions_of(username).is_admin,
            end=self._end_session,
            subscriptions_of=lambda session_id: len(self._subscriptions.get(session_id, ())),
            clock=clock,
            wall_clock=wall_clock,
        )

    # Life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load permissions, then expire idle sessions in the background."""
        await self.refresh_permissions()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def begin_drain(self) -> None:
        """Answer waiting long polls now (UNAVAILABLE, never QUEUE_EMPTY: a consumer that
        stops at an empty queue must not stop because the server restarts), end the
        Subscribe streams likewise, and refuse to start new waits."""
        self.deliverer.begin_drain()
        for subscription in self._streams():
            subscription.poke()

    @property
    def draining(self) -> bool:
        return self.deliverer.draining

    def _streams(self) -> list[Subscription]:
        return self.sessions.streams()

    async def stop(self) -> None:
        self.begin_drain()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # Releases started in the background still need the store, which closes next.
        await self._background.finish()
        with contextlib.suppress(errors.QmError):
            await self._sessions.stop()  # activity seen here last (a shared registry)
        self._crypto_pool.shutdown(wait=True, cancel_futures=True)

    def in_background(self, work: Coroutine[None, None, None]) -> None:
        """Run work without awaiting it; `stop` waits for it (background.py)."""
        self._background.start(work)

    # Login and sessions -----------------------------------------------------------------

    def get_challenge(self) -> Challenge:
        return Challenge(
            public_key_pem=self.keys.public_key_pem,
            fingerprint=self.keys.fingerprint,
            algorithm=ALGORITHM,
            challenge=self._challenges.issue(),
            ttl_ms=int(self._auth.challenge_ttl_s * 1000),
        )

    async def login(
        self, username: str, ciphertext: bytes, peer: str, address: str = ""
    ) -> tuple[str, int]:
        """Return (token, session ttl in ms). Every failure looks the same to the caller.
        `peer` is the host logins are throttled by, `address` the full one admins see."""
        # Throttled or crowded: refused before any expensive work (login_guard.py).
        async with self._login_guard.admit(username, peer):
            envelope = await self._crypto(self._open_envelope, ciphertext)
            fresh = envelope is not None and await self._challenges.burn(envelope.challenge)
            record = await self.store.get_user(username) if username else None
            stored = record.password_hash if record is not None and fresh else None
            password = envelope.password if envelope is not None else ""
            ok = await self._crypto(self._hasher.verify, password, stored)
            # A login whose (user, host) or host got throttled while it hashed does not
            # reveal its outcome: a burst gets no more answers than the same guesses one
            # at a time. (With one login per host judged at a time this cannot happen;
            # checked again all the same, so that it holds if that ever changes.)
            await self._login_guard.check(username, peer)
            if not ok or record is None:
                await self._login_guard.failed(username, peer, _failure(envelope, fresh, record))
                raise errors.Unauthenticated(LOGIN_FAILED)
            await self._login_guard.succeeded(username, peer)
        await self.refresh_permissions()
        now = self._permissions.get(record.name)
        if now is None or now.credential != record.password_hash:
            # Removed, or given a new password, after its record was read, during the hash.
            audit.record(audit.Event.LOGIN_FAILED, user=record.name, reason=CHANGED_MEANWHILE)
            raise errors.Unauthenticated(LOGIN_FAILED)
        room = self._room(
            record.name, "sessions", self.limits.max_sessions, self.limits.max_sessions_per_user
        )
        try:
            token, session = await self._sessions.create(
                record.name,
                record.password_hash,
                self._clock(),
                room,
                address or peer,
                self._wall_clock(),
            )
        except errors.ResourceExhausted as exc:
            log.warning("refused user %s one more of its sessions: %s", record.name, exc)
            raise
        audit.record(audit.Event.LOGIN_OK, user=record.name, session=f"{session.id:x}")
        return token, int(self.session_ttl_s * 1000)

    async def _crypto(self, work: Callable[..., T], *args: object) -> T:
        """Run work on the crypto pool. A caller cancelled meanwhile (a client's deadline)
        still waits for the work to finish before it ends: the host's turn at logging in
        (login_guard.py) lasts as long as its work does, or calls that give up early,
        never judged and so never throttled, could pile up work in the pool."""
        future = asyncio.get_running_loop().run_in_executor(self._crypto_pool, work, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            raise

    def _open_envelope(self, ciphertext: bytes) -> pb.PasswordEnvelope | None:
        try:
            plain = self.keys.decrypt(ciphertext)
            envelope = pb.PasswordEnvelope()
            envelope.ParseFromString(plain)
        except Exception:  # any garbage: the caller answers the one login failure
            return None
        return envelope

    async def session(self, token: str) -> Session:
        """The caller's live session (live_sessions.py)."""
        return await self.sessions.live(token)

    async def _caller(self, token: str, action: str, kind: str, name: str) -> Session:
        """The prologue of every call about one queue or map: the caller's live session
        (`session`), a valid name, and the grant to do `action` on it (`authorize`)."""
        session = await self.session(token)
        check_name(NAME_FIELD[kind], name)
        self.authorize(session, action, kind, name)
        return session

    async def heartbeat(self, token: str) -> SessionReport:
        return await self.session_admin.heartbeat(token)

    async def logout(self, token: str) -> None:
        await self._end_session(await self.session(token), audit.EndReason.LOGGED_OUT)

    def session_count(self) -> int:
        return self._sessions.count()

    def stats(self) -> EngineStats:
        """Plain counts, each read in one step: safe from a metrics thread."""
        return EngineStats(
            sessions=self._sessions.count(),
            subscriptions=self._subscription_usage.total,
            waiting_polls=self._poll_usage.total,
            login_failures=self._login_guard.failures,
            login_refusals=self._login_guard.refusals,
        )

    async def _end_session(self, session: Session, why: audit.EndReason, by: str = "") -> None:
        await self.sessions.end(session, why, by)

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self.session_ttl_s / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_idle_sessions()
                await self.refresh_permissions()
            except errors.QmError as exc:
                log.warning("could not sweep sessions yet: %s", exc)

    async def refresh_permissions(self) -> None:
        """Reload grants; end the sessions of users that were removed or whose password
        changed (a user removed and added again within a reload has a new password hash)."""
        before, self._permissions = self._permissions, await self.store.load_permissions()
        if self._permissions != before:
            # An open stream checks its read grant at each turn of its loop; a parked one
            # must wake to see a revocation, or it would go on delivering. Woken before
            # the awaits below: a reload cancelled during them would wake none, and the
            # next one would see no change.
            for subscription in self._streams():
                subscription.poke()
        for session in self._sessions.all():
            user = self._permissions.get(session.username)
            if user is None:
                await self._end_session(session, audit.EndReason.USER_REMOVED)
            elif user.credential != session.credential:
                await self._end_session(session, audit.EndReason.PASSWORD_CHANGED)

    def _room(self, username: str, noun: str, limit: int, per_user: int) -> Room:
        """What the user may hold of a resource: all of `limit` for an admin; for anyone
        else, `per_user` and the limit short of the admins' reserve."""
        permissions = self._permissions.get(username)
        is_admin = permissions is not None and permissions.is_admin
        reserve = self.limits.admin_reserve_percent
        return Room.of(noun, limit, per_user, reserve, username, is_admin)

    @staticmethod
    def _make_room(room: Room, in_all: int, of_user: int) -> None:
        """Room.check, logged when it refuses (Room.refusals_logged)."""
        with room.refusals_logged():
            room.check(in_all, of_user)

    def _permissions_of(self, username: str) -> Permissions:
        """The user's grants as last loaded (none for a user no longer known)."""
        return self._permissions.get(username) or Permissions()

    def authorize(self, session: Session, action: str, kind: str, name: str) -> None:
        if not self._permissions_of(session.username).allows(action, kind, name):
            audit.record(
                audit.Event.PERMISSION_DENIED, user=session.username, action=action, **{kind: name}
            )
            raise errors.PermissionDenied(
                f"user {session.username!r} may not {action} {kind} {name!r}"
            )

    async def expire_idle_sessions(self) -> None:
        await self.sessions.expire_idle()

    # Queues -----------------------------------------------------------------------------

    async def new_queue(self, token: str, name: str, change: SettingsChange | None = None) -> None:
        """Create the queue with `change` applied to the defaults (None: the seed's
        queue). Naming a dead_letter_queue needs `write` on it."""
        session = await self._caller(token, "manage", "queue", name)
        settings = (change or SettingsChange()).applied_to(DEFAULT_SETTINGS)
        self.admin.check_dead_letter_queue(session, settings.dead_letter_queue, name)
        room = self._room(
            session.username, "queues", self.limits.max_queues, self.limits.max_queues_per_user
        )
        with room.refusals_logged():
            await self.store.create_queue(name, room, settings)
        audit.record(audit.Event.QUEUE_CREATED, user=session.username, queue=name)

    async def destroy_queue(self, token: str, name: str, force: bool) -> None:
        user = (await self._caller(token, "manage", "queue", name)).username
        # The store destroys it even if this call is cancelled meanwhile (a client's
        # deadline): its waiters and streams must hear of it all the same.
        await outliving_caller(
            self.store.destroy_queue(name, force), lambda _: self._destroyed(user, name)
        )
        self._destroyed(user, name)

    def _destroyed(self, user: str, name: str) -> None:
        audit.record(audit.Event.QUEUE_DESTROYED, user=user, queue=name)
        self._queue_gone(name)

    def _queue_gone(self, name: str) -> None:
        """Wake whoever waits on a destroyed queue, and end its streams."""
        self.signals.wake(name, everyone=True)
        # Streams with a full window wait for acks, not on the queue: end them too.
        for subscription in self._streams():
            if subscription.queue == name:
                subscription.queue_destroyed()

    async def add(self, token: str, name: str, elements: Sequence[str]) -> list[int]:
        """The seed's add: no delay of its own, no request_id; the new ids."""
        return (await self.enqueue(token, name, elements)).ids

    async def enqueue(
        self,
        token: str,
        name: str,
        elements: Sequence[str],
        delay_ms: int | None = None,
        request_id: str = "",
    ) -> Enqueued:
        """Add and AddAll: `delay_ms` None takes the queue's; a `request_id` makes a
        repeat within the store's window answer the first call's ids (replayed)."""
        session = await self._caller(token, "write", "queue", name)
        check_count("elements", len(elements), self.limits.max_batch)
        check_texts_size("element", elements, self.limits.max_element_bytes)
        if delay_ms is not None:
            check_delay_ms("delay_ms", delay_ms)
        key = idempotency_key(session.username, request_id, name, elements)
        return await self.store.enqueue(name, elements, delay_ms, key)

    async def take(
        self, token: str, name: str, number: int, wait_ms: int, lease_ms: int | None = None
    ) -> list[Delivery]:
        """Poll and PullElements (long_polls.py)."""
        return await self.polls.take(token, name, number, wait_ms, lease_ms)

    async def ack(self, token: str, message_ids: Sequence[int], ack_type: int) -> list[errors.Code]:
        session = await self.check_ack(token, message_ids, ack_type)
        codes = await self.store.ack(session.id, message_ids, ack_type == pb.ACK_TYPE_DONE)
        await self._still_live(session, codes)
        self._no_longer_held(session, message_ids, codes)
        return codes

    async def extend_lease(
        self, token: str, message_ids: Sequence[int], lease_ms: int
    ) -> list[LeaseOutcome]:
        """Move the lease of messages the caller's session holds to `lease_ms` from now;
        0 gives them back. Needs no grant: only the holder's session can."""
        session = await self.session(token)
        check_count("message_ids", len(message_ids), self.limits.max_batch)
        check_unique("message_ids", message_ids)
        check_ack_deadline_ms("ack_deadline_ms", lease_ms, allow_zero=True)
        outcomes = await self.store.extend_leases(session.id, message_ids, lease_ms)
        codes = [o.code for o in outcomes]
        await self._still_live(session, codes)
        self._no_longer_held(session, message_ids, codes, finished=lease_ms == 0)
        return outcomes

    async def _still_live(self, session: Session, codes: Sequence[errors.Code]) -> None:
        """A message the session held that is gone may mean the session itself ended
        elsewhere and released it (on a shared store, before this node heard): then the
        caller is told its session ended, as on the node that ended it, rather than that
        its message is unknown."""
        if errors.Code.MESSAGE_NOT_FOUND in codes and not await self._sessions.confirm(session):
            raise errors.Unauthenticated(SESSION_EXPIRED)

    def _no_longer_held(
        self,
        session: Session,
        message_ids: Sequence[int],
        codes: Sequence[errors.Code],
        finished: bool = True,
    ) -> None:
        """Messages that a stream of the session delivered and that a unary call found
        expired, or finished (`finished`: acked, or given back by ExtendLease), leave
        that stream's window, which would otherwise stay full until the stream closes."""
        subscriptions = self._subscriptions.get(session.id)
        if not subscriptions:
            return
        gone = [
            i
            for i, code in zip(message_ids, codes, strict=True)
            if code == errors.Code.LEASE_EXPIRED or (code == errors.Code.OK and finished)
        ]
        for subscription in subscriptions:
            subscription.forget(gone)

    async def check_ack(self, token: str, message_ids: Sequence[int], ack_type: int) -> Session:
        """The rules every ack obeys, unary or on a stream; returns the live session."""
        session = await self.session(token)
        if ack_type not in (pb.ACK_TYPE_DONE, pb.ACK_TYPE_ERROR):
            raise errors.InvalidArgument(f"ack_type {ack_type} is not 0 (done) or 1 (error)")
        check_count("message_ids", len(message_ids), self.limits.max_batch)
        check_unique("message_ids", message_ids)
        return session

    async def subscribe(
        self, token: str, name: str, max_unacked: int, lease_ms: int | None = None
    ) -> Subscription:
        """Open a Subscribe stream (subscribers.py)."""
        return await self.subscribers.open(token, name, max_unacked, lease_ms)

    def _subscriptions_on(self, name: str) -> int:
        """Subscribe streams open on the queue."""
        return sum(1 for s in self._streams() if s.queue == name)

    async def counts(self, token: str, name: str) -> tuple[int, int]:
        """(ready, in flight) for Size, IsEmpty and GetUncheckNum."""
        await self._caller(token, "read", "queue", name)
        counts = await self.store.queue_counts(name)
        return counts.ready, counts.in_flight


def _failure(envelope: pb.PasswordEnvelope | None, fresh: bool, record: object) -> str:
    """Why a login failed, for the log only: the caller always gets LOGIN_FAILED."""
    if envelope is None:
        return "the password does not decrypt (garbage, or another server's key)"
    if not fresh:
        return "unknown, expired or used challenge"
    if record is None:
        return "no such user"
    return "wrong password"
