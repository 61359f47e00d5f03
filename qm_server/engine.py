"""The rules of the service: logins, sessions, delivery, waiting, limits.

Imports no gRPC. All state here is owned by one asyncio event loop: every method runs on
it, so the engine needs no lock; blocking work (RSA, scrypt, SQLite) runs elsewhere
(an executor, the store's writer thread) and is awaited. Long polls wait on futures, not
threads, so a thousand idle consumers cost a thousand small objects.

The lifecycle's rules live beside the calls they change: a call's own ack deadline
(`take`, `subscribe`), delays and request_ids (`enqueue`, idempotency.py), ExtendLease
(`extend_lease`), and settings given to NewQueue. The RPCs that look after queues rather
than deliver (UpdateQueue, GetQueueInfo, Purge, Redrive, ListDeadLetters, ListQueues,
ListMaps) are `admin`'s (queue_admin.py). Leases run out, and delayed messages become
ready, inside the store, which wakes waiters through the ready listener as an add does.
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
from qm_server import errors
from qm_server.answer_size import entries_room
from qm_server.auth import ALGORITHM, ChallengeBook, KeyPair, PasswordHasher
from qm_server.background import Background, outliving_caller
from qm_server.byte_budget import ByteBudget
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
from qm_server.login_guard import LoginGuard
from qm_server.pages import offset_page
from qm_server.permissions import Permissions
from qm_server.queue_admin import QueueAdmin
from qm_server.quotas import Room, Usage
from qm_server.session_admin import SessionAdmin, SessionReport
from qm_server.sessions import MemorySessions, Session, SessionRegistry
from qm_server.store.base import Delivery, Enqueued, LeaseOutcome, Store
from qm_server.subscription import StreamRules, Subscription
from qm_server.validation import (
    check_count,
    check_name,
    check_text_size,
    check_texts_size,
    check_unique,
)
from qm_server.waiting import ReadySignals

log = logging.getLogger(__name__)

T = TypeVar("T")
LOGIN_FAILED = "login failed: unknown user, wrong password, or a bad or used challenge"
SESSION_EXPIRED = "the session expired; log in again"
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
        self._sessions = sessions or MemorySessions()
        # Servers sharing a store pass theirs (challenges.py); one server keeps its own.
        self._challenges = challenges or MemoryChallenges(
            ChallengeBook(self._auth.challenge_ttl_s, self._auth.max_pending_challenges, clock)
        )
        self._hasher = PasswordHasher.from_settings(self._auth)
        self._login_guard = LoginGuard(self._auth, clock)
        # Password hashing and RSA decryption are slow and CPU-bound: a small pool caps
        # how many run at once, so a login flood cannot starve the event loop's callers.
        self._crypto_pool = ThreadPoolExecutor(
            max_workers=self._auth.max_concurrent_hashes, thread_name_prefix="qm-crypto"
        )
        self.signals = ReadySignals(store.ready_hint)
        self._background = Background()
        # The bytes an answer's entries may take: what fits a default client, framed.
        self.answer_room = entries_room(self.limits.max_response_bytes)
        # Claims and waits of long polls and streams alike (delivery.py).
        self.deliverer = Deliverer(store, self.signals, self._background, clock, self.answer_room)
        self._subscriptions: dict[int, set[Subscription]] = {}  # by session id
        self._polls: dict[int, set[asyncio.Future[None]]] = {}  # parked long polls, likewise
        # What each user holds, for the quotas (quotas.py); queues and maps are counted
        # by the store, which records their creators.
        self._session_usage = Usage()
        self._poll_usage = Usage()
        self._subscription_usage = Usage()
        # user name -> grants; reloaded at each login and every sweep, so that grants,
        # revocations and removed users take effect within a second.
        self._permissions: dict[str, Permissions] = {}
        self._sweeper: asyncio.Task[None] | None = None
        store.set_ready_listener(self.signals.wake)
        store.set_queue_gone_listener(self._queue_gone)  # destroyed on another node
        # Map reads in progress hold at most this many bytes of answers (byte_budget.py).
        self._reads = ByteBudget(self.limits.max_reads_in_progress_bytes)
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
        """Every open Subscribe stream, of every session."""
        return [s for subscriptions in self._subscriptions.values() for s in subscriptions]

    async def stop(self) -> None:
        self.begin_drain()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # Releases started in the background still need the store, which closes next.
        await self._background.finish()
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
            self._login_guard.check(username, peer)
            if not ok or record is None:
                self._login_guard.failed(username, peer, _failure(envelope, fresh, record))
                raise errors.Unauthenticated(LOGIN_FAILED)
            self._login_guard.succeeded(username, peer)
        await self.refresh_permissions()
        now = self._permissions.get(record.name)
        if now is None or now.credential != record.password_hash:
            # Removed, or given a new password, after its record was read, during the hash.
            raise errors.Unauthenticated(LOGIN_FAILED)
        room = self._room(
            record.name, "sessions", self.limits.max_sessions, self.limits.max_sessions_per_user
        )
        self._make_room(room, self._sessions.count(), self._session_usage.of(record.name))
        token, session = self._sessions.create(
            record.name, record.password_hash, self._clock(), address or peer, self._wall_clock()
        )
        self._session_usage.add(record.name)
        log.info("user %s logged in from %s (session %x)", record.name, peer, session.id)
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

    def session(self, token: str) -> Session:
        """The caller's live session; any call with a valid token counts as activity."""
        session = self._sessions.find(token) if token else None
        now = self._clock()
        if session is None or session.ended:
            raise errors.Unauthenticated("unknown or expired token; log in again")
        if not session.waiting and now - session.last_active > self.session_ttl_s:
            self.in_background(self._end_session(session, "expired"))
            raise errors.Unauthenticated(SESSION_EXPIRED)
        session.last_active = now
        return session

    def _caller(self, token: str, action: str, kind: str, name: str) -> Session:
        """The prologue of every call about one queue or map: the caller's live session
        (`session`), a valid name, and the grant to do `action` on it (`authorize`)."""
        session = self.session(token)
        check_name(NAME_FIELD[kind], name)
        self.authorize(session, action, kind, name)
        return session

    async def heartbeat(self, token: str) -> SessionReport:
        return await self.session_admin.heartbeat(token)

    async def logout(self, token: str) -> None:
        await self._end_session(self.session(token), "logged out")

    def session_count(self) -> int:
        return self._sessions.count()

    def stats(self) -> EngineStats:
        """Plain counts, each read in one step: safe from a metrics thread."""
        guard = self._login_guard
        return EngineStats(
            sessions=self._sessions.count(),
            subscriptions=self._subscription_usage.total,
            waiting_polls=self._poll_usage.total,
            login_failures=guard.failures,
            login_refusals=guard.refusals,
        )

    async def _end_session(self, session: Session, why: str) -> None:
        if session.ended:
            return
        session.ended = True
        self._sessions.remove(session)
        self._session_usage.remove(session.username)
        log.info("session %x of %s %s", session.id, session.username, why)
        for subscription in self._subscriptions.get(session.id, set()).copy():
            subscription.poke()
        # Its parked long polls answer UNAUTHENTICATED now, not at their deadline.
        for waiter in self._polls.pop(session.id, set()):
            if not waiter.done():
                waiter.set_result(None)
        await self.store.release_session(session.id)

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
                await self._end_session(session, "ended: the user was removed")
            elif user.credential != session.credential:
                await self._end_session(session, "ended: the user's password changed")

    def _room(self, username: str, noun: str, limit: int, per_user: int) -> Room:
        """What the user may hold of a resource: all of `limit` for an admin; for anyone
        else, `per_user` and the limit short of the admins' reserve."""
        permissions = self._permissions.get(username)
        is_admin = permissions is not None and permissions.is_admin
        reserve = self.limits.admin_reserve_percent
        return Room.of(noun, limit, per_user, reserve, username, is_admin)

    @staticmethod
    def _make_room(room: Room, in_all: int, of_user: int) -> None:
        """Room.check, logged when it refuses, so that an operator sees who hits limits."""
        try:
            room.check(in_all, of_user)
        except errors.ResourceExhausted as exc:
            log.warning("refused user %s one more of its %s: %s", room.user, room.noun, exc)
            raise

    def _permissions_of(self, username: str) -> Permissions:
        """The user's grants as last loaded (none for a user no longer known)."""
        return self._permissions.get(username) or Permissions()

    def authorize(self, session: Session, action: str, kind: str, name: str) -> None:
        if not self._permissions_of(session.username).allows(action, kind, name):
            log.warning(
                "permission denied: user %s (session %x) may not %s %s %r",
                session.username,
                session.id,
                action,
                kind,
                name,
            )
            raise errors.PermissionDenied(
                f"user {session.username!r} may not {action} {kind} {name!r}"
            )

    async def expire_idle_sessions(self) -> None:
        for session in self._sessions.idle_since(self._clock() - self.session_ttl_s):
            await self._end_session(session, "expired")

    # Queues -----------------------------------------------------------------------------

    async def new_queue(self, token: str, name: str, change: SettingsChange | None = None) -> None:
        """Create the queue with `change` applied to the defaults (None: the seed's
        queue). Naming a dead_letter_queue needs `write` on it."""
        session = self._caller(token, "manage", "queue", name)
        settings = (change or SettingsChange()).applied_to(DEFAULT_SETTINGS)
        self.admin.check_dead_letter_queue(session, settings.dead_letter_queue, name)
        room = self._room(
            session.username, "queues", self.limits.max_queues, self.limits.max_queues_per_user
        )
        try:
            await self.store.create_queue(name, room, settings)
        except errors.ResourceExhausted as exc:
            log.warning("refused user %s a new queue: %s", session.username, exc)
            raise

    async def destroy_queue(self, token: str, name: str, force: bool) -> None:
        self._caller(token, "manage", "queue", name)
        # The store destroys it even if this call is cancelled meanwhile (a client's
        # deadline): its waiters and streams must hear of it all the same.
        await outliving_caller(
            self.store.destroy_queue(name, force), lambda _: self._queue_gone(name)
        )
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
        session = self._caller(token, "write", "queue", name)
        check_count("elements", len(elements), self.limits.max_batch)
        check_texts_size("element", elements, self.limits.max_element_bytes)
        if delay_ms is not None:
            check_delay_ms("delay_ms", delay_ms)
        key = idempotency_key(session.username, request_id, name, elements)
        return await self.store.enqueue(name, elements, delay_ms, key)

    async def take(
        self, token: str, name: str, number: int, wait_ms: int, lease_ms: int | None = None
    ) -> list[Delivery]:
        """Poll (number 1) and PullElements: the oldest ready messages, waiting if asked;
        `lease_ms` None takes the queue's ack deadline."""
        session = self._caller(token, "read", "queue", name)
        check_count("number", number, self.limits.max_batch)
        if wait_ms < 0:
            raise errors.InvalidArgument("wait_ms must not be negative")
        check_lease(lease_ms)
        deadline = self._clock() + min(wait_ms, self.limits.max_wait_ms) / 1000
        while True:
            deliveries = await self.deliverer.claim(
                session, name, number, lease_ms, ended=SESSION_EXPIRED
            )
            if deliveries:
                return deliveries
            remaining = deadline - self._clock()
            if remaining <= 0:  # a poll with wait_ms 0 too, draining or not: it is true
                raise errors.QueueEmpty(f"queue {name!r} has no ready message")
            if self.draining:
                # The wait is cut short, not over: QUEUE_EMPTY would tell a consumer that
                # the queue ran dry. Nothing was claimed, so polling again is safe.
                raise errors.Unavailable("the server is shutting down; poll again later")
            room = self._room(
                session.username,
                "waiting long polls",
                self.limits.max_waiting_polls,
                self.limits.max_waiting_polls_per_user,
            )
            self._make_room(room, self.signals.waiting(), self._poll_usage.of(session.username))
            await self._wait_for_ready(session, name, remaining)
            try:
                # Grants are reloaded every second: a revocation made while this poll
                # waited must stop it before it claims, not after its wait_ms (20 s).
                session = self._caller(token, "read", "queue", name)
            except (errors.Unauthenticated, errors.PermissionDenied):
                self.deliverer.pass_on(name)
                raise

    async def _wait_for_ready(self, session: Session, name: str, timeout_s: float) -> None:
        """A long poll's wait, counted against its user's quota and answered at once when
        its session ends (`_end_session` resolves the waiters it finds in `_polls`)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if session.ended:
            waiter.set_result(None)  # it ended while we claimed, with nobody to wake
        polls = self._polls.setdefault(session.id, set())
        polls.add(waiter)
        self._poll_usage.add(session.username)
        try:
            await self.deliverer.wait(session, waiter, timeout_s, queue=name)
        finally:
            self._poll_usage.remove(session.username)
            polls.discard(waiter)
            if not polls and self._polls.get(session.id) is polls:
                del self._polls[session.id]

    async def ack(self, token: str, message_ids: Sequence[int], ack_type: int) -> list[errors.Code]:
        session = self.check_ack(token, message_ids, ack_type)
        codes = await self.store.ack(session.id, message_ids, ack_type == pb.ACK_TYPE_DONE)
        self._no_longer_held(session, message_ids, codes)
        return codes

    async def extend_lease(
        self, token: str, message_ids: Sequence[int], lease_ms: int
    ) -> list[LeaseOutcome]:
        """Move the lease of messages the caller's session holds to `lease_ms` from now;
        0 gives them back. Needs no grant: only the holder's session can."""
        session = self.session(token)
        check_count("message_ids", len(message_ids), self.limits.max_batch)
        check_unique("message_ids", message_ids)
        check_ack_deadline_ms("ack_deadline_ms", lease_ms, allow_zero=True)
        outcomes = await self.store.extend_leases(session.id, message_ids, lease_ms)
        codes = [o.code for o in outcomes]
        self._no_longer_held(session, message_ids, codes, finished=lease_ms == 0)
        return outcomes

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

    def check_ack(self, token: str, message_ids: Sequence[int], ack_type: int) -> Session:
        """The rules every ack obeys, unary or on a stream; returns the live session."""
        session = self.session(token)
        if ack_type not in (pb.ACK_TYPE_DONE, pb.ACK_TYPE_ERROR):
            raise errors.InvalidArgument(f"ack_type {ack_type} is not 0 (done) or 1 (error)")
        check_count("message_ids", len(message_ids), self.limits.max_batch)
        check_unique("message_ids", message_ids)
        return session

    async def subscribe(
        self, token: str, name: str, max_unacked: int, lease_ms: int | None = None
    ) -> Subscription:
        """A streaming consumer holding at most max_unacked messages at once, each on a
        lease of `lease_ms` (None: the queue's ack deadline)."""
        session = self._caller(token, "read", "queue", name)
        check_count("max_unacked", max_unacked, self.limits.max_batch)
        check_lease(lease_ms)
        await self.store.queue_counts(name)  # QueueNotFound now rather than on first push
        if self.draining:
            raise errors.Unavailable("the server is shutting down")
        usage = self._subscription_usage
        room = self._room(
            session.username,
            "subscriptions",
            self.limits.max_subscriptions,
            self.limits.max_subscriptions_per_user,
        )
        self._make_room(room, usage.total, usage.of(session.username))
        rules = StreamRules(
            check_ack=lambda ids, ack_type: self.check_ack(token, ids, ack_type),
            check_grant=lambda: self.authorize(session, "read", "queue", name),
            closed=self._forget,
        )
        subscription = Subscription(self.deliverer, rules, session, name, max_unacked, lease_ms)
        self._subscriptions.setdefault(session.id, set()).add(subscription)
        usage.add(session.username)
        return subscription

    def _forget(self, subscription: Subscription) -> None:
        """A closed stream no longer counts, nor is poked."""
        subscriptions = self._subscriptions.get(subscription.session.id)
        if subscriptions is not None and subscription in subscriptions:
            subscriptions.remove(subscription)
            self._subscription_usage.remove(subscription.session.username)
            if not subscriptions:
                del self._subscriptions[subscription.session.id]

    def _subscriptions_on(self, name: str) -> int:
        """Subscribe streams open on the queue."""
        return sum(1 for s in self._streams() if s.queue == name)

    async def counts(self, token: str, name: str) -> tuple[int, int]:
        """(ready, in flight) for Size, IsEmpty and GetUncheckNum."""
        self._caller(token, "read", "queue", name)
        counts = await self.store.queue_counts(name)
        return counts.ready, counts.in_flight

    # Maps -------------------------------------------------------------------------------

    async def map_put(self, token: str, name: str, pairs: Sequence[tuple[str, str]]) -> None:
        session = self._caller(token, "write", "map", name)
        check_count("list", len(pairs), self.limits.max_batch)
        for key, value in pairs:
            check_text_size("key", key, self.limits.max_element_bytes)
            check_text_size("value", value, self.limits.max_element_bytes)
        room = self._room(
            session.username, "maps", self.limits.max_maps, self.limits.max_maps_per_user
        )
        try:
            await self.store.map_put(name, pairs, room)
        except errors.ResourceExhausted as exc:
            log.warning("refused user %s a new map: %s", session.username, exc)
            raise

    async def map_remove(self, token: str, name: str, key: str) -> None:
        self._caller(token, "write", "map", name)
        await self.store.map_remove(name, key)

    async def map_get(self, token: str, name: str, key: str) -> str:
        self._caller(token, "read", "map", name)
        async with self._reads.hold(self.limits.max_element_bytes):
            return await self.store.map_get(name, key)

    async def map_get_all(self, token: str, name: str) -> dict[str, str]:
        self._caller(token, "read", "map", name)
        async with self._reads.hold(self.limits.max_response_bytes):
            return await self.store.map_get_all(name, self.answer_room)

    async def map_get_list(
        self, token: str, name: str, offset: int, size: int
    ) -> list[tuple[str, str]]:
        """One page by offset (the seed's paging)."""
        self._caller(token, "read", "map", name)
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
        self._caller(token, "read", "map", name)
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
        self._caller(token, "manage", "map", name)
        await self.store.map_destroy(name)


def check_lease(lease_ms: int | None) -> None:
    """A call's own ack deadline (Poll, PullElements, Subscribe): unset or in bounds."""
    if lease_ms is not None:
        check_ack_deadline_ms("ack_deadline_ms", lease_ms, allow_zero=False)


def _failure(envelope: pb.PasswordEnvelope | None, fresh: bool, record: object) -> str:
    """Why a login failed, for the log only: the caller always gets LOGIN_FAILED."""
    if envelope is None:
        return "the password does not decrypt (garbage, or another server's key)"
    if not fresh:
        return "unknown, expired or used challenge"
    if record is None:
        return "no such user"
    return "wrong password"
