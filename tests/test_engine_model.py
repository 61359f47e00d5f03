"""The engine on the real SQLite store, driven by Hypothesis against a plain in-memory model.

Example tests check the rules one at a time; the interesting failures of a queue server
come from interleavings nobody writes by hand: a nack after a forced destroy, an expiry
noticed lazily while messages are in flight, a restart between a pull and its ack. The
model below is the contract in its simplest form (dicts and lists), so any difference
between it and the engine after any sequence of calls is a bug in one of the two.

The lifecycle is in the model too, on one fake clock that the engine (monotonic seconds)
and the store (Unix seconds) both read: queues made with settings (ack deadline,
max_deliveries into a dead-letter queue, retry backoff, a default delay), adds with a
delay, claims with a lease of their own, ExtendLease (0 gives back), Purge, and the
store's one timer, which the machine records instead of arming (ModelStore) and fires as
a rule (`timer_fires`): lease expiries, late acks answered LEASE_EXPIRED, backoffs and
delays coming due, dead letters with their history and cause. The model predicts every
answer exactly: ids, delivery counts, first add times, lease ends, counts, dead letters.

Most rules make one call and wait for its answer; `concurrently` runs several sessions'
calls at once (producers, consumers with long polls, Subscribe streams), cancels claims
midway and crashes the store mid-round, and checks that the answers fit some order of
the calls (see its docstring).

One asyncio loop lives as long as one run of the machine, because the store's writer
thread resolves its futures on the loop that opened it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hypothesis
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import FAST_AUTH, encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors, lifecycle
from qm_server.auth import KeyPair, PasswordHasher
from qm_server.engine import Engine
from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, RetryPolicy, SettingsChange
from qm_server.store.base import DeadLetter, Delivery, LeaseOutcome, UserRecord
from qm_server.store.sqlite import SqliteStore

T = TypeVar("T")

# Generated once: a fresh RSA key per example would dominate the run time.
KEY = KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
PASSWORD = "pw"
PASSWORD_HASH = PasswordHasher.from_settings(FAST_AUTH).hash(PASSWORD)
TTL_S = 10.0

# Few names, so that creates collide, destroys hit live queues, and a map shares a name
# with a queue (separate namespaces).
QUEUES = ("q1", "q2", "jobs.x")
MAPS = ("m1", "m2", "q1")
QUEUE_NAMES = st.sampled_from(QUEUES)
MAP_NAMES = st.sampled_from(MAPS)
# Small alphabets make keys collide; non-ASCII (2-, 3- and 4-byte UTF-8, U+FFFF before an
# astral character) and NUL test that byte order and storage survive every encoding.
# "B" sorts before "a" in bytes but not case-blind.
KEYS = st.text(alphabet=st.sampled_from(["a", "B", "é", "😀", "\x00", "\uffff"]), max_size=2)
TEXTS = st.text(alphabet=st.sampled_from(["x", "y", "ü", "中", "😀", "\x00"]), max_size=3)
VALUES = st.text(max_size=4)
# Which session a rule acts as: mostly a live one, sometimes any (logged out, expired or
# from before a restart), so that Unauthenticated is exercised too.
# Hypothesis shrinks toward 0, which is the first live session: a minimal failing
# sequence then mentions as few sessions as it can.
WHO = st.integers(min_value=0, max_value=9)
FIRST_LIVE_PICKS = 6
LIVE_PICKS = 8
# Binary-exact steps, so that "idle exactly the ttl" (not yet expired) is reachable and
# float rounding cannot make the model and the engine disagree at the boundary.
CLOCK_STEPS = st.sampled_from([0.5, 2.5, 5.0, 10.0, 12.0, 30.0])
# The store's clock is Unix time: the fake clock's seconds plus this. Every time below is
# a multiple of half a second, so that seconds and milliseconds convert exactly.
EPOCH_S = 1_700_000_000.0
# Where the queues with max_deliveries put their dead letters: one of the queues, which
# itself has none (so dead letters do not travel on), and which may be missing (then a
# message past max_deliveries stays where it is).
DEAD_LETTER_QUEUE = "jobs.x"
LEASES = st.sampled_from([None, None, 1000, 2500])  # a claim's own ack deadline
EXTENSIONS = st.sampled_from([0, 1000, 5000])
DELAYS = st.sampled_from([None, None, 0, 1000, 2500])  # an add's delay_ms
RETRIES = st.builds(
    RetryPolicy,
    initial_delay_ms=st.sampled_from([1000, 2500]),
    multiplier=st.sampled_from([1.0, 2.0]),
    max_delay_ms=st.sampled_from([0, 10_000]),  # 0: the initial delay
)


def settings_strategy(name: str) -> st.SearchStrategy[SettingsChange | None]:
    """A queue's settings: mostly none (the seed's queue), else some of each kind. Drawn
    the same whatever the machine holds, so that no draw depends on a concurrent round."""
    dead_letters = name != DEAD_LETTER_QUEUE
    return st.one_of(
        st.none(),
        st.builds(
            SettingsChange,
            ack_deadline_ms=st.sampled_from([None, 1000, 2500, 5000]),
            max_deliveries=st.sampled_from([None, 1, 2, 3]) if dead_letters else st.none(),
            retry=st.none() | RETRIES,
            delay_ms=st.sampled_from([None, None, 2500]),
        ).map(
            lambda c: (
                dataclasses.replace(c, dead_letter_queue=DEAD_LETTER_QUEUE)
                if c.max_deliveries
                else c
            )
        ),
    )


def event(name: str) -> None:
    """Count what a run reached (shown by --hypothesis-show-statistics); nothing in the
    fixed sequences below, which run outside Hypothesis."""
    if currently_in_test_context():
        hypothesis.event(name)


def backoff_ms(retry: RetryPolicy, delivery_count: int) -> int:
    """The wait after an error ack on the delivery_count-th delivery (the proto's rule)."""
    if not retry.initial_delay_ms:
        return 0
    cap = retry.max_delay_ms or retry.initial_delay_ms
    return int(min(retry.initial_delay_ms * retry.multiplier ** (delivery_count - 1), cap))


# A memory-backed directory when there is one: every commit fsyncs, and on a shared disk
# the fsyncs, not the engine, would set the pace; durability is tested elsewhere.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def unix(self) -> float:
        """The same instant as the store reads it."""
        return EPOCH_S + self.now

    def ms(self) -> int:
        return int(self.unix() * 1000)


class ModelStore(SqliteStore):
    """The store, with its one timer recorded instead of armed: on a fake clock a real
    timer would fire at a real moment, in the middle of any rule. The machine fires it
    as a rule of its own (`timer_fires`), at the fake time it was armed for."""

    armed_ms = 0

    def _arm(self, due_ms: int) -> None:
        self.armed_ms = due_ms


@dataclass(eq=False)
class ModelSession:
    token: str
    last_active: float
    number: int
    # The invariant checks act as an observer session, which never holds messages, so
    # that checking does not change what the rules' sessions hold or when they expire.
    observer: bool = False
    # Removed from the engine's registry (logout, expiry noticed, restart).
    ended: bool = False

    def __repr__(self) -> str:
        return f"<session {self.number}{' observer' if self.observer else ''}>"


@dataclass(eq=False)
class ModelMessage:
    id: int
    element: str
    delivery_count: int = 0
    holder: ModelSession | None = None
    # A claim cancelled while it committed gives its messages back with their count
    # raised; which messages it took nobody saw, so the next delivery may count more.
    count_raised_maybe: bool = False
    enqueued_at: int = 0  # the store's clock, ms
    lease: int = 0  # when its holder's lease ends (ms); 0: none
    ready_at: int = 0  # delayed or backing off until then (ms); 0: not waiting
    # As a dead letter: (original queue, delivery count then, when, cause).
    dead: tuple[str, int, int, str] | None = None


def expect_error(outcome: object, expected: type[errors.QmError]) -> None:
    assert type(outcome) is expected, f"expected {expected.__name__}, got {outcome!r}"


def expect_ok(outcome: T | errors.QmError) -> T:
    assert not isinstance(outcome, errors.QmError), f"unexpected {outcome!r}"
    return outcome


def utf8_order(pairs: dict[str, str]) -> list[tuple[str, str]]:
    return sorted(pairs.items(), key=lambda kv: kv[0].encode())


async def open_engine(data_dir: Path, clock: FakeClock) -> tuple[ModelStore, Engine]:
    store = ModelStore(data_dir, clock=clock.unix)
    await store.open()
    if await store.get_user("admin") is None:
        await store.create_user(UserRecord("admin", PASSWORD_HASH, is_admin=True))
    engine = Engine(
        store, KEY, session_ttl_s=TTL_S, auth=FAST_AUTH, clock=clock, wall_clock=clock.unix
    )
    return store, engine


async def close_engine(store: SqliteStore, engine: Engine) -> None:
    await engine.stop()
    await store.close()


async def settle() -> None:
    """Wait for the tasks a call left behind (a lazily noticed expiry releases its
    messages in a task), so that each step's effects are complete when it is judged."""
    current = asyncio.current_task()
    while others := [t for t in asyncio.all_tasks() if t is not current]:
        await asyncio.gather(*others)


CRASH_AT = st.one_of(st.none(), st.none(), st.none(), st.integers(min_value=0, max_value=15))


@dataclass(eq=False)
class Script:
    """One client's part of a concurrent round."""

    kind: str  # "produce", "consume" or "subscribe"
    session: ModelSession
    queue: str
    elements: list[str] = field(default_factory=list)  # produce
    number: int = 1  # consume: how many; subscribe: the window
    long_poll: bool = False  # consume: wait for a message
    fates: list[str] = field(default_factory=list)  # per delivery, cycled: done, nack, keep
    # Its claim is cancelled this many callbacks of the loop after it starts: mostly while
    # the store commits it (a client's deadline passing mid-call).
    cancel_after: int | None = None


def script_strategy(names: list[str], sessions: list[ModelSession]) -> st.SearchStrategy[Script]:
    common = {
        "session": st.sampled_from(sessions),
        "queue": st.sampled_from(names),
        "fates": st.lists(st.sampled_from(["done", "nack", "keep"]), min_size=1, max_size=3),
        "cancel_after": st.none() | st.integers(min_value=0, max_value=12),
    }
    return st.one_of(
        st.builds(
            Script,
            kind=st.just("produce"),
            elements=st.lists(TEXTS, min_size=1, max_size=3),
            **{k: common[k] for k in ("session", "queue")},
        ),
        st.builds(
            Script,
            kind=st.just("consume"),
            number=st.integers(min_value=1, max_value=3),
            long_poll=st.booleans(),
            **common,
        ),
        st.builds(
            Script,
            kind=st.just("subscribe"),
            number=st.integers(min_value=1, max_value=3),
            **common,
        ),
    )


@dataclass(eq=False)
class Event:
    """One answer a concurrent round got, numbered in the order the answers came."""

    order: int
    kind: str  # add, deliver, ack, release (a stream closed), cancelled (a claim)
    session: ModelSession
    owner: object = None  # the script: two scripts of one session hold apart
    queue: str = ""
    ids: list[int] = field(default_factory=list)
    elements: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    done: bool = False
    results: list[errors.Code] = field(default_factory=list)


class ConcurrentRun:
    """Runs scripts as concurrent tasks on the machine's loop and records their answers."""

    MAX_TURNS = 200  # of a millisecond each; then waiting long polls are given up
    QUIET_TURNS = 8

    def __init__(self, engine: Engine, scripts: list[Script]) -> None:
        self.engine = engine
        self.scripts = scripts
        self.events: list[Event] = []
        self.claims: list[tuple[asyncio.Task[Any], Script]] = []
        self.known: int | None = None  # with a crash: the events answered before it
        self.copy: Path | None = None
        self.pending_adds: dict[int, Event] = {}  # sent, not answered
        self.pending_done_acks: dict[int, list[int]] = {}

    def record(self, kind: str, script: Script, **fields: Any) -> Event:
        event = Event(len(self.events), kind, script.session, script, **fields)
        self.events.append(event)
        return event

    async def go(self, crash_at: int | None, snapshot: Callable[[], Path] | None) -> None:
        tasks = [asyncio.create_task(self.play(script)) for script in self.scripts]
        answers, quiet = 0, 0
        for turn in range(self.MAX_TURNS):
            # Nothing answered for a while: what still waits is a long poll or a stream
            # with nothing to take (the machine's clock stands still), given up below.
            answers, quiet = len(self.events), quiet + 1 if len(self.events) == answers else 0
            if quiet > self.QUIET_TURNS:
                break
            if turn == crash_at and snapshot is not None:
                self.known, self.copy = len(self.events), snapshot()
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.001)
        for claim, _ in self.claims:
            claim.cancel()  # a long poll or stream still waiting: its client gives up
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if snapshot is not None and self.copy is None:
            self.known, self.copy = len(self.events), snapshot()
        await settle()

    async def play(self, script: Script) -> None:
        if script.kind == "produce":
            await self.produce(script)
        elif script.kind == "consume":
            await self.consume(script)
        else:
            await self.subscribe(script)

    async def produce(self, script: Script) -> None:
        # Unique elements, so that what a crash kept tells which add it came from.
        elements = [f"{e}#{id(script)}.{n}" for n, e in enumerate(script.elements)]
        self.pending_adds[id(script)] = Event(
            -1, "add", script.session, script, queue=script.queue, elements=elements
        )
        ids = await self.engine.add(script.session.token, script.queue, elements)
        del self.pending_adds[id(script)]
        self.record("add", script, queue=script.queue, ids=ids, elements=elements)

    async def claimed(self, script: Script, claim: Coroutine[Any, Any, T]) -> T | None:
        """Await a claim that may be cancelled on its own; None if it was."""
        task = asyncio.create_task(claim)
        self.claims.append((task, script))
        if script.cancel_after is not None:
            loop = asyncio.get_running_loop()

            def countdown(left: int) -> None:
                if left:
                    loop.call_soon(countdown, left - 1)
                else:
                    task.cancel()

            countdown(script.cancel_after)
        try:
            return await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the script itself is cancelled: not ours to swallow
            self.record("cancelled", script, queue=script.queue)
            return None

    async def ack(self, script: Script, ids: list[int], done: bool) -> None:
        if not ids:
            return
        key = id(ids)
        if done:
            self.pending_done_acks[key] = ids
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        results = await self.engine.ack(script.session.token, ids, ack_type)
        self.pending_done_acks.pop(key, None)
        self.record("ack", script, ids=ids, done=done, results=results)

    def fated(self, script: Script, deliveries: list[Delivery], fate: str) -> list[int]:
        fates = script.fates
        return [d.message_id for n, d in enumerate(deliveries) if fates[n % len(fates)] == fate]

    async def consume(self, script: Script) -> None:
        wait_ms = 60_000 if script.long_poll else 0  # the machine's clock does not move
        try:
            got = await self.claimed(
                script, self.engine.take(script.session.token, script.queue, script.number, wait_ms)
            )
        except errors.QueueEmpty:
            return
        if not got:
            return
        self.record("deliver", script, queue=script.queue, deliveries=got)
        await self.ack(script, self.fated(script, got, "done"), done=True)
        await self.ack(script, self.fated(script, got, "nack"), done=False)

    async def subscribe(self, script: Script) -> None:
        session = script.session
        stream = await self.engine.subscribe(session.token, script.queue, script.number)
        try:
            got = await self.claimed(script, stream.next_batch())
            if not got:
                return
            self.record("deliver", script, queue=script.queue, deliveries=got)
            done = self.fated(script, got, "done")
            if done:
                results, more = await stream.ack(done, pb.ACK_TYPE_DONE)
                self.record("ack", script, ids=done, done=True, results=results)
                if more:
                    self.record("deliver", script, queue=script.queue, deliveries=more)
        finally:
            held = sorted(stream._held)  # what closing gives back
            await stream.close()
            self.record("release", script, queue=script.queue, ids=held)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.data_dir = Path(tempfile.mkdtemp(prefix="qm-model-", dir=SCRATCH))
        self.clock = FakeClock()
        self.store: ModelStore | None = None
        self.engine_: Engine | None = None
        self.store, self.engine_ = self.loop.run_until_complete(
            open_engine(self.data_dir, self.clock)
        )
        self.sessions: list[ModelSession] = []
        self.observer: ModelSession | None = None
        self.queues: dict[str, dict[int, ModelMessage]] = {}
        self.settings: dict[str, QueueSettings] = {}
        # message id -> (session, queue) whose lease on it ran out: that session's late
        # ack or extension is told LEASE_EXPIRED, until the message is deleted, the
        # session ends, or another lease on it runs out.
        self.expired: dict[int, tuple[ModelSession, str]] = {}
        self.maps: dict[str, dict[str, str]] = {}
        self.issued: list[int] = []  # every message id ever returned, in order
        self.crashed_dirs: list[Path] = []  # data directories left behind by a crash
        self.new_session(observer=False)

    @property
    def engine(self) -> Engine:
        assert self.engine_ is not None
        return self.engine_

    def teardown(self) -> None:
        try:
            if self.store is not None and self.engine_ is not None:
                self.loop.run_until_complete(close_engine(self.store, self.engine_))
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            for directory in [self.data_dir, *self.crashed_dirs]:
                shutil.rmtree(directory, ignore_errors=True)

    # Talking to the engine ----------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T]) -> T | errors.QmError:
        """Run one engine call to completion; a domain error is a result to compare."""

        async def main() -> T | errors.QmError:
            try:
                return await coro
            except errors.QmError as exc:
                return exc
            finally:
                await settle()

        return self.loop.run_until_complete(main())

    def new_session(self, observer: bool) -> ModelSession:
        async def log_in() -> str:
            challenge = self.engine.get_challenge()
            reply = pb.GetChallengeResponse(
                public_key_pem=challenge.public_key_pem, challenge=challenge.challenge
            )
            ciphertext = encrypt_password(reply, PASSWORD)
            token, ttl_ms = await self.engine.login("admin", ciphertext, "peer")
            assert ttl_ms == TTL_S * 1000
            return token

        token = expect_ok(self.call(log_in()))
        session = ModelSession(token, self.clock.now, len(self.sessions), observer)
        self.sessions.append(session)
        return session

    def pick(self, who: int) -> ModelSession:
        """Mostly the same live session, so that what it pulls it also acks; a client that
        finds itself logged out logs in again."""
        live = [s for s in self.sessions if not s.ended and not s.observer]
        if who < LIVE_PICKS and not live:
            return self.new_session(observer=False)
        if who < FIRST_LIVE_PICKS:
            return live[0]
        if who < LIVE_PICKS:
            return live[who % len(live)]
        anyone = [s for s in self.sessions if not s.observer]
        return anyone[who % len(anyone)]

    # The model's rules ------------------------------------------------------------------

    def idle(self, session: ModelSession) -> bool:
        return self.clock.now - session.last_active > TTL_S

    def end(self, session: ModelSession) -> None:
        """The session ends (logout, expiry): what it held is released, and who it was
        is forgotten by the expired leases."""
        session.ended = True
        for name, message in self.held(lambda m: m.holder is session):
            self.release(name, message, lifecycle.CAUSE_SESSION_END, backoff=False)
        self.expired = {i: e for i, e in self.expired.items() if e[0] is not session}

    def held(self, which: Callable[[ModelMessage], bool]) -> list[tuple[str, ModelMessage]]:
        """(queue, message) of the messages that match, in id order (a list: releasing
        them moves some to the dead-letter queue)."""
        found = [(n, m) for n, q in self.queues.items() for m in q.values() if which(m)]
        return sorted(found, key=lambda pair: pair[1].id)

    def release(self, name: str, message: ModelMessage, cause: str, backoff: bool) -> None:
        """A message no longer in flight and not done: moved to the dead-letter queue
        with its history past max_deliveries (if that queue exists), else waiting out
        the retry backoff after an error ack, else ready again at its place."""
        settings = self.settings[name]
        message.holder, message.lease = None, 0
        target = settings.dead_letter_queue
        count = message.delivery_count
        if settings.max_deliveries and target in self.queues and count >= settings.max_deliveries:
            del self.queues[name][message.id]
            self.queues[target][message.id] = message
            message.dead = (name, count, self.clock.ms(), cause)
            event(f"dead-lettered: {cause}")
        elif backoff and (wait := backoff_ms(settings.retry, count)):
            message.ready_at = self.clock.ms() + wait
            event("backed off")

    def due(self) -> None:
        """What the store's run_due does at the clock's time: leases that ran out (their
        holders remembered), then delayed and backed-off messages whose time came."""
        now = self.clock.ms()
        expired = self.held(lambda m: m.holder is not None and 0 < m.lease <= now)
        for name, message in sorted(expired, key=lambda pair: pair[1].lease):
            assert message.holder is not None
            self.expired[message.id] = (message.holder, name)
            event("lease expired")
            self.release(name, message, lifecycle.CAUSE_LEASE_EXPIRY, backoff=False)
        for _, message in self.held(lambda m: 0 < m.ready_at <= now):
            message.ready_at = 0
            event("came due")

    def next_due(self) -> int:
        """When the store's timer should fire next (ms); 0 for never."""
        times = [m.lease for q in self.queues.values() for m in q.values() if m.lease]
        times += [m.ready_at for q in self.queues.values() for m in q.values() if m.ready_at]
        return min(times, default=0)

    def delete(self, name: str, message_id: int) -> None:
        del self.queues[name][message_id]
        self.expired.pop(message_id, None)

    def touch(self, session: ModelSession) -> bool:
        """Whether the engine accepts the token now; using it counts as activity, and an
        idle session found by use ends there (the engine's lazy expiry)."""
        if session.ended:
            return False
        if self.idle(session):
            self.end(session)
            return False
        session.last_active = self.clock.now
        return True

    def refused(self, session: ModelSession, outcome: object) -> bool:
        if self.touch(session):
            return False
        expect_error(outcome, errors.Unauthenticated)
        return True

    def find(self, message_id: int) -> tuple[dict[int, ModelMessage], ModelMessage] | None:
        for queue in self.queues.values():
            if message_id in queue:
                return queue, queue[message_id]
        return None

    def ready(self, name: str) -> list[ModelMessage]:
        return sorted(
            (m for m in self.queues[name].values() if m.holder is None and not m.ready_at),
            key=lambda m: m.id,
        )

    def is_default(self, name: str) -> bool:
        return self.settings[name].is_default

    # Sessions and time --------------------------------------------------------------------

    @rule()
    def login(self) -> None:
        self.new_session(observer=False)

    @rule(who=WHO)
    def heartbeat(self, who: int) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.heartbeat(session.token))
        if not self.refused(session, outcome):
            expect_ok(outcome)

    @rule(who=WHO)
    def logout(self, who: int) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.logout(session.token))
        if not self.refused(session, outcome):
            expect_ok(outcome)
            self.end(session)

    @rule(seconds=CLOCK_STEPS, sweep=st.booleans(), due=st.booleans())
    def advance_clock(self, seconds: float, sweep: bool, due: bool = False) -> None:
        """Without the sweep, idle sessions linger until used: the lazy path. Without
        `due`, the store's timer has not fired yet: a lease past its end still holds (an
        ack in time for the store is in time)."""
        self.clock.now += seconds
        if due:
            self.run_due()
        if sweep:
            expect_ok(self.call(self.engine.expire_idle_sessions()))
            for session in self.sessions:
                if not session.ended and self.idle(session):
                    self.end(session)

    def run_due(self) -> None:
        assert self.store is not None
        expect_ok(self.call(self.store.run_due()))
        self.due()

    @rule()
    def timer_fires(self) -> None:
        """The store's timer fires: it was armed no later than the first thing due, and
        for something (never for nothing while something waits); the clock moves to it."""
        assert self.store is not None
        armed, expected = self.store.armed_ms, self.next_due()
        if expected:
            assert 0 < armed <= expected, (armed, expected)
        if not armed:
            return
        self.clock.now = max(self.clock.now, armed / 1000 - EPOCH_S)
        self.run_due()

    @rule()
    def restart(self) -> None:
        """A new process on the same file: sessions die, in-flight messages are ready."""
        assert self.store is not None
        store, self.store = self.store, None
        self.loop.run_until_complete(close_engine(store, self.engine))
        self.engine_ = None
        self.store, self.engine_ = self.loop.run_until_complete(
            open_engine(self.data_dir, self.clock)
        )
        self.restarted(lambda name: True)

    def restarted(self, released: Callable[[str], bool]) -> None:
        """A new process: sessions died, and what they held in the `released` queues is
        ready again (counted). Nothing is dead-lettered at the start: being in flight is
        not on disk, so the store cannot tell what the restart released from what was
        ready already (a redriven message, say); a message in flight at its last allowed
        delivery gets one more, and is dead-lettered when that one is released."""
        for session in self.sessions:
            session.ended = True
        self.expired = {}
        for name, message in self.held(lambda m: m.holder is not None):
            if released(name):
                message.holder, message.lease = None, 0

    # Queues -------------------------------------------------------------------------------

    @initialize(
        names=st.sets(QUEUE_NAMES, min_size=2),
        elements=st.lists(TEXTS, max_size=6),
        data=st.data(),
    )
    def fill_queues(self, names: set[str], elements: list[str], data: st.DataObject) -> None:
        """Start with queues and messages: with some twenty rules to choose from, most
        sequences would otherwise never get a message delivered twice. The dead-letter
        queue comes first, so that the others may name it."""
        for name in sorted(names, key=lambda n: (n != DEAD_LETTER_QUEUE, n)):
            self.new_queue(0, name, data.draw(settings_strategy(name), label=name))
        if elements:
            self.enqueue(0, data.draw(st.sampled_from(sorted(names)), label="fill"), elements)

    @rule(who=WHO, name=QUEUE_NAMES, data=st.data())
    def new_queue_with_settings(self, who: int, name: str, data: st.DataObject) -> None:
        self.new_queue(who, name, data.draw(settings_strategy(name), label="settings"))

    @rule(who=WHO, name=QUEUE_NAMES)
    def new_queue(self, who: int, name: str, change: SettingsChange | None = None) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.new_queue(session.token, name, change))
        if self.refused(session, outcome):
            return
        if name in self.queues:
            expect_error(outcome, errors.QueueAlreadyExists)
            return
        settings = (change or SettingsChange()).applied_to(DEFAULT_SETTINGS)
        if settings.dead_letter_queue and settings.dead_letter_queue not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        expect_ok(outcome)
        self.queues[name] = {}
        self.settings[name] = settings

    @rule(who=WHO, name=QUEUE_NAMES, force=st.booleans())
    def destroy_queue(self, who: int, name: str, force: bool) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.destroy_queue(session.token, name, force))
        if self.refused(session, outcome):
            return
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        if self.queues[name] and not force:
            expect_error(outcome, errors.QueueNotEmpty)
            return
        expect_ok(outcome)
        del self.queues[name]
        self.expired = {i: e for i, e in self.expired.items() if e[1] != name}

    @rule(who=WHO, name=QUEUE_NAMES)
    def purge(self, who: int, name: str) -> None:
        """Ready and delayed messages go, in one step; those in flight stay held."""
        session = self.pick(who)
        outcome = self.call(self.engine.admin.purge(session.token, name))
        if self.refused(session, outcome):
            return
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        queue = self.queues[name]
        gone = [i for i, m in queue.items() if m.holder is None]
        assert expect_ok(outcome) == len(gone), name
        event(f"purged {'some' if gone else 'none'}")
        for message_id in gone:
            del queue[message_id]
        # The store forgets the expired leases taken from this queue but on what it holds.
        self.expired = {i: e for i, e in self.expired.items() if e[1] != name or i in queue}

    def enqueue(
        self, who: int, name: str, elements: list[str], delay_ms: int | None = None
    ) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.enqueue(session.token, name, elements, delay_ms))
        if self.refused(session, outcome):
            return
        if not elements:
            expect_error(outcome, errors.InvalidArgument)
            return
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        enqueued = expect_ok(outcome)
        ids = enqueued.ids
        assert not enqueued.replayed
        assert len(ids) == len(elements)
        # Unique across queues and never reused, even after a restart: each new id is
        # larger than every id handed out before.
        floor = self.issued[-1] if self.issued else 0
        assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] > floor, ids
        self.issued.extend(ids)
        now = self.clock.ms()
        delay = self.settings[name].delay_ms if delay_ms is None else delay_ms
        for message_id, element in zip(ids, elements, strict=True):
            message = ModelMessage(message_id, element, enqueued_at=now)
            message.ready_at = now + delay if delay else 0
            self.queues[name][message_id] = message

    @rule(who=WHO, name=QUEUE_NAMES, element=TEXTS, delay=DELAYS)
    def add(self, who: int, name: str, element: str, delay: int | None = None) -> None:
        self.enqueue(who, name, [element], delay)

    @rule(who=WHO, name=QUEUE_NAMES, elements=st.lists(TEXTS, max_size=4), delay=DELAYS)
    def add_all(self, who: int, name: str, elements: list[str], delay: int | None = None) -> None:
        self.enqueue(who, name, elements, delay)

    def take(
        self, session: ModelSession, name: str, number: int, lease_ms: int | None = None
    ) -> list[int]:
        """The ids delivered, so that a worker can ack exactly what it got."""
        outcome = self.call(self.engine.take(session.token, name, number, 0, lease_ms))
        if self.refused(session, outcome):
            return []
        if number < 1:
            expect_error(outcome, errors.InvalidArgument)
            return []
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return []
        taken = self.ready(name)[:number]
        if not taken:
            expect_error(outcome, errors.QueueEmpty)
            return []
        got = expect_ok(outcome)
        assert [d.message_id for d in got] == [m.id for m in taken], (got, taken)
        lease = self.settings[name].ack_deadline_ms if lease_ms is None else lease_ms
        for message, delivery in zip(taken, got, strict=True):
            if message.count_raised_maybe and delivery.delivery_count > message.delivery_count:
                message.delivery_count = delivery.delivery_count - 1
            message.count_raised_maybe = False
            message.delivery_count += 1
            message.holder = session
            message.lease = self.clock.ms() + lease if lease else 0
        expected = [
            Delivery(m.id, m.element, m.delivery_count, m.enqueued_at, m.lease) for m in taken
        ]
        assert got == expected
        return [m.id for m in taken]

    @rule(who=WHO, name=QUEUE_NAMES, lease=LEASES)
    def poll(self, who: int, name: str, lease: int | None = None) -> None:
        self.take(self.pick(who), name, 1, lease)

    @rule(who=WHO, name=QUEUE_NAMES, number=st.integers(min_value=0, max_value=4), lease=LEASES)
    def pull(self, who: int, name: str, number: int, lease: int | None = None) -> None:
        self.take(self.pick(who), name, number, lease)

    @rule(
        who=WHO,
        name=QUEUE_NAMES,
        number=st.integers(min_value=1, max_value=4),
        data=st.data(),
        lease=LEASES,
    )
    def work(
        self, who: int, name: str, number: int, data: st.DataObject, lease: int | None = None
    ) -> None:
        """A worker's cycle: pull, then ack some done, nack some, keep the rest.

        Separate pull and ack rules rarely meet (another session, a restart or an expiry
        comes between, or swarm testing disabled one of them), so redelivery would be rare.
        """
        session = self.pick(who)
        ids = self.take(session, name, number, lease)
        # As many fates as the most a pull may bring, whatever it brought: how many came
        # back depends on the concurrent rounds before, and a draw shaped by it would make
        # Hypothesis see the same choices lead to different draws (FlakyStrategyDefinition).
        fates = data.draw(
            st.lists(st.sampled_from(["done", "nack", "keep"]), min_size=4, max_size=4),
            label="fates",
        )[: len(ids)]
        for fate, done in (("done", True), ("nack", False)):
            chosen = [i for i, f in zip(ids, fates, strict=True) if f == fate]
            if chosen:
                self.acknowledge(session, chosen, done)

    @rule(
        who=WHO,
        name=QUEUE_NAMES,
        number=st.integers(min_value=1, max_value=3),
        lease=LEASES,
        done=st.booleans(),
    )
    def slow_work(self, who: int, name: str, number: int, lease: int | None, done: bool) -> None:
        """A worker that takes longer than its lease: the timer fires (its lease, or
        whatever falls due first, runs out) before it acks, late or not."""
        session = self.pick(who)
        ids = self.take(session, name, number, lease)
        self.timer_fires()
        if ids:
            self.acknowledge(session, ids, done)

    @rule(who=WHO, name=QUEUE_NAMES)
    def poison(self, who: int, name: str) -> None:
        """A message that always fails: taken and error-acked again and again, the timer
        firing between (its backoff), until it is dead-lettered or the queue is empty."""
        session = self.pick(who)
        for _ in range(4):
            ids = self.take(session, name, 1)
            if ids:
                self.acknowledge(session, ids, done=False)
            self.timer_fires()

    @rule(who=WHO, name=QUEUE_NAMES, number=st.integers(min_value=1, max_value=3))
    def drain(self, who: int, name: str, number: int) -> None:
        """Pull and ack done until the queue answers empty, as a batch job's consumer does.

        It leaves the newest ids acked away, the state in which a restart could be
        tempted to hand an old id out again.
        """
        session = self.pick(who)
        while ids := self.take(session, name, number):
            self.acknowledge(session, ids, done=True)

    def acknowledge(self, session: ModelSession, ids: list[int], done: bool) -> None:
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        outcome = self.call(self.engine.ack(session.token, ids, ack_type))
        if self.refused(session, outcome):
            return
        expected: list[errors.Code] = []
        for message_id in ids:
            name, message = self.holding(session, message_id)
            expected.append(self.code(session, message_id, message))
            if message is not None:
                if done:
                    self.delete(name, message_id)
                else:
                    self.release(name, message, lifecycle.CAUSE_ACK_ERROR, backoff=True)
        assert expect_ok(outcome) == expected, ids

    def holding(self, session: ModelSession, message_id: int) -> tuple[str, ModelMessage | None]:
        """The message's queue and the message, if the session holds it."""
        for name, queue in self.queues.items():
            message = queue.get(message_id)
            if message is not None and message.holder is session:
                return name, message
        return "", None

    def code(
        self, session: ModelSession, message_id: int, held: ModelMessage | None
    ) -> errors.Code:
        """An ack's or an extension's answer for one id."""
        if held is not None:
            return errors.Code.OK
        expired = self.expired.get(message_id)
        if expired is not None and expired[0] is session:
            event("answered LEASE_EXPIRED")
            return errors.Code.LEASE_EXPIRED
        return errors.Code.MESSAGE_NOT_FOUND

    @rule(who=WHO, data=st.data(), lease_ms=EXTENSIONS)
    def extend_lease(self, who: int, data: st.DataObject, lease_ms: int) -> None:
        """ExtendLease: a new lease end for what the session holds; 0 gives it back (as
        a lease expiry does: no backoff, dead-lettered past max_deliveries)."""
        session = self.pick(who)
        count = data.draw(st.integers(min_value=1, max_value=3), label="count")
        ids = list(dict.fromkeys(self.draw_ack_id(data, session) for _ in range(count)))
        self.extend(session, ids, lease_ms)

    def extend(self, session: ModelSession, ids: list[int], lease_ms: int) -> None:
        outcome = self.call(self.engine.extend_lease(session.token, ids, lease_ms))
        if self.refused(session, outcome):
            return
        expected: list[LeaseOutcome] = []
        for message_id in ids:
            name, message = self.holding(session, message_id)
            code = self.code(session, message_id, message)
            end = self.clock.ms() + lease_ms if message is not None and lease_ms else 0
            expected.append(LeaseOutcome(code, end))
            if message is not None and lease_ms:
                message.lease = end
            elif message is not None:
                self.release(name, message, lifecycle.CAUSE_EXTEND_TO_ZERO, backoff=False)
        assert expect_ok(outcome) == expected, ids

    def draw_ack_id(self, data: st.DataObject, session: ModelSession) -> int:
        """An id worth acking: the session's own half the time, else anyone's (in flight
        elsewhere, ready, acked or destroyed), ids never handed out, and int64's ends.

        Drawn as a choice and an index of fixed range, then mapped onto the ids: which ids
        a session holds depends on how the concurrent rounds interleaved, and draws shaped
        by it would make Hypothesis see the same choices lead to different draws."""
        held = sorted(m.id for q in self.queues.values() for m in q.values() if m.holder is session)
        unknown = [0, -1, (self.issued[-1] if self.issued else 0) + 1, 2**63 - 1, -(2**63)]
        own = data.draw(st.booleans(), label="own")
        pool = held if own and held else self.issued[-8:] + unknown
        return pool[data.draw(st.integers(min_value=0, max_value=255), label="id") % len(pool)]

    @rule(who=WHO, data=st.data(), done=st.booleans())
    def ack(self, who: int, data: st.DataObject, done: bool) -> None:
        """Ack sends one id; its one flag is what the servicer turns into MESSAGE_NOT_FOUND."""
        session = self.pick(who)
        message_id = self.draw_ack_id(data, session)
        self.acknowledge(session, [message_id], done)

    @rule(who=WHO, data=st.data(), done=st.booleans(), repeat=st.booleans())
    def batch_ack(self, who: int, data: st.DataObject, done: bool, repeat: bool) -> None:
        """A repeated id is refused whole: acking one message twice in one call is a
        client bug, and half-applying the batch would hide it."""
        session = self.pick(who)
        count = data.draw(st.integers(min_value=1, max_value=5), label="count")
        ids = list(dict.fromkeys(self.draw_ack_id(data, session) for _ in range(count)))
        if not repeat:
            self.acknowledge(session, ids, done)
            return
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        outcome = self.call(self.engine.ack(session.token, [*ids, ids[0]], ack_type))
        if not self.refused(session, outcome):
            expect_error(outcome, errors.InvalidArgument)

    def check_counts(self, name: str, outcome: tuple[int, int] | errors.QmError) -> None:
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        in_flight = sum(m.holder is not None for m in self.queues[name].values())
        assert expect_ok(outcome) == (len(self.ready(name)), in_flight), name

    def check_info(self, name: str) -> None:
        """GetQueueInfo and ListDeadLetters: settings, every count, and each dead letter
        with its history."""
        token = self.observer_token()
        outcome = self.call(self.engine.admin.queue_info(token, name))
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        info = expect_ok(outcome).info
        queue = self.queues[name].values()
        ready = self.ready(name)
        assert info.settings == self.settings[name], name
        assert (info.counts.ready, info.counts.in_flight, info.counts.delayed) == (
            len(ready),
            sum(m.holder is not None for m in queue),
            sum(m.ready_at > 0 for m in queue),
        ), name
        dead = [m for q in self.queues.values() for m in q.values() if m.dead]
        assert info.dead_lettered == sum(m.dead[0] == name for m in dead if m.dead), name
        assert info.dead_letters_held == sum(m.dead is not None for m in queue), name
        assert info.holding_sessions == len({m.holder for m in queue if m.holder}), name
        oldest = min((m.enqueued_at for m in ready), default=0)
        assert info.oldest_ready_enqueued_at_ms == oldest, name
        letters, _ = expect_ok(self.call(self.engine.admin.dead_letters(token, name, 0, 100)))
        assert letters == [
            DeadLetter(m.id, *m.dead[:2], m.enqueued_at, *m.dead[2:], m.element)
            for m in sorted(queue, key=lambda m: m.id)
            if m.dead
        ], name

    # Concurrent calls -------------------------------------------------------------------

    @rule(data=st.data())
    def concurrently(self, data: st.DataObject) -> None:
        """Several sessions' calls at once on one loop: producers, consumers (long polls
        among them) that ack what they get, and Subscribe streams that take a push, ack
        part of it and close; some claims are cancelled midway (a client's deadline), and
        sometimes the server crashes midway (see `crash_midway`).

        The rules above run one completed call after another; here the engine and the
        store's group commit see the interleavings. What the calls answered must fit some
        order of them: fresh increasing ids, each delivery count one above the last (more
        only after a cancelled claim), a message delivered again only after its holder
        gave it back, never after a done-ack, every ack of what a session holds found.
        """
        # Queues with the seed's settings only: their messages never move on their own
        # (dead letters, backoff), so the order of the answers alone tells the outcome.
        # Those with settings are the sequential rules' (and are released by a crash).
        names = sorted(n for n in self.queues if self.is_default(n))
        if not names:
            return
        live = [s for s in self.sessions if not (s.ended or s.observer or self.idle(s))]
        while len(live) < 3:
            live.append(self.new_session(observer=False))
        scripts = data.draw(st.lists(script_strategy(names, live), min_size=2, max_size=5))
        # A crash in one round of four, at a turn of the loop (mostly while calls run).
        crash_at = data.draw(CRASH_AT, label="crash")
        for script in scripts:
            script.session.last_active = self.clock.now  # each script calls at least once
        run = ConcurrentRun(self.engine, scripts)
        self.loop.run_until_complete(
            run.go(crash_at, self.snapshot if crash_at is not None else None)
        )
        if run.known is None:
            self.apply_concurrent(run.events, run)
        else:
            self.apply_concurrent(run.events[: run.known], run)
            self.recover_from_crash(run)

    def snapshot(self) -> Path:
        """The data directory as a crash at this instant leaves it: every commit so far.

        The store's writer is held inside its next batch (so nothing commits meanwhile)
        while the database and its WAL are copied; what that batch held was not committed,
        as a crash would leave it.
        """
        assert self.store is not None
        inside, resume = threading.Event(), threading.Event()

        def hold() -> None:
            inside.set()
            resume.wait(timeout=30)

        held = self.store._submit(hold)  # the store's own queue: no other way to pause it
        assert inside.wait(timeout=30)
        copy = Path(tempfile.mkdtemp(prefix="qm-model-crash-", dir=SCRATCH))
        for name in ("qm.db", "qm.db-wal"):
            if (self.data_dir / name).exists():
                shutil.copyfile(self.data_dir / name, copy / name)
        resume.set()
        del held  # resolved by the writer; nobody awaits it
        return copy

    def apply_concurrent(self, events: list[Event], run: ConcurrentRun) -> None:
        floor = self.issued[-1] if self.issued else 0
        added: list[int] = []
        for e in events:
            if e.kind == "add":
                assert e.ids == sorted(e.ids) and e.ids[0] > floor, (floor, e.ids)
                added += e.ids
                for message_id, element in zip(e.ids, e.elements, strict=True):
                    message = ModelMessage(message_id, element, enqueued_at=self.clock.ms())
                    self.queues[e.queue][message_id] = message
        assert len(set(added)) == len(added), added
        self.issued.extend(sorted(added))
        cancelled = {e.queue for e in events if e.kind == "cancelled"}
        by_id: dict[int, list[Event]] = {}
        for e in events:
            if e.kind == "deliver":
                ids = [d.message_id for d in e.deliveries]
                assert ids == sorted(ids), ids  # oldest first
                for d in e.deliveries:
                    by_id.setdefault(d.message_id, []).append(e)
            if e.kind == "ack":
                assert e.results == [errors.Code.OK] * len(e.ids), (e.session, e.ids, e.results)
        for message_id, delivered in by_id.items():
            queue = self.queues[delivered[0].queue]
            message = queue[message_id]
            counts = [
                next(d.delivery_count for d in e.deliveries if d.message_id == message_id)
                for e in delivered
            ]
            assert all(
                d.element == message.element
                for e in delivered
                for d in e.deliveries
                if d.message_id == message_id
            )
            ordered = sorted(zip(counts, delivered, strict=True), key=lambda pair: pair[0])
            loose = message.count_raised_maybe or delivered[0].queue in cancelled
            previous = message.delivery_count
            # Who holds it: a session from before the round, or a script of the round.
            holder: object = message.holder
            for count, e in ordered:
                step = count - previous
                assert step == 1 or (loose and step > 1), (message_id, previous, counts)
                if holder is not None:
                    # Delivered again: its holder gave it back (a nack or a closed stream),
                    # and never acked it done. (Answers of one commit come in any order,
                    # so the give-back's answer may come after the redelivery's.)
                    assert self.gave_back(events, holder, message_id), (
                        f"id {message_id} delivered to {e.session} while {holder} held it"
                    )
                previous, holder = count, e.owner
            message.delivery_count, message.count_raised_maybe = previous, False
            assert holder is not None
            if self.acked(events, holder, message_id, done=True):
                self.delete(delivered[0].queue, message_id)
            elif self.gave_back(events, holder, message_id):
                message.holder = None
            else:
                assert isinstance(holder, Script)
                message.holder = holder.session
        for name in cancelled:
            for message in self.queues.get(name, {}).values():
                if message.holder is None:
                    message.count_raised_maybe = True

    @staticmethod
    def acked(events: list[Event], owner: object, message_id: int, done: bool) -> bool:
        return any(
            e.kind == "ack" and e.owner is owner and e.done is done and message_id in e.ids
            for e in events
        )

    @staticmethod
    def gave_back(events: list[Event], owner: object, message_id: int) -> bool:
        """Whether the owner nacked the id or closed the stream holding it, and did not
        ack it done."""
        if EngineMachine.acked(events, owner, message_id, done=True):
            return False
        return any(
            e.owner is owner
            and message_id in e.ids
            and (e.kind == "release" or (e.kind == "ack" and not e.done))
            for e in events
        )

    def recover_from_crash(self, run: ConcurrentRun) -> None:
        """Open the crash's copy in a new engine and compare with what was answered before
        the crash; what was in flight then may have happened or not."""
        assert run.copy is not None and self.store is not None
        self.loop.run_until_complete(close_engine(self.store, self.engine))
        self.crashed_dirs.append(self.data_dir)
        self.data_dir = run.copy
        self.store, self.engine_ = self.loop.run_until_complete(
            open_engine(self.data_dir, self.clock)
        )
        # The queues with settings were not part of the round: the model knows them.
        self.restarted(lambda name: not self.is_default(name))
        self.observer = None
        unknown = run.events[run.known or 0 :]
        maybe_acked = {i for e in unknown if e.kind == "ack" and e.done for i in e.ids}
        maybe_acked |= {i for ids in run.pending_done_acks.values() for i in ids}
        maybe_added = [e for e in unknown if e.kind == "add"] + list(run.pending_adds.values())
        reader = self.new_session(observer=False)
        for name, queue in self.queues.items():
            if not self.is_default(name):
                continue
            outcome = self.call(self.engine.take(reader.token, name, 1000, 0))
            got = [] if isinstance(outcome, errors.QueueEmpty) else expect_ok(outcome)
            if got:
                ids = [d.message_id for d in got]
                assert expect_ok(self.call(self.engine.ack(reader.token, ids, pb.ACK_TYPE_ERROR)))
            assert [d.message_id for d in got] == sorted(d.message_id for d in got)
            present = {d.message_id: d for d in got}
            lost = [
                i
                for i, m in queue.items()
                if i not in present and i not in maybe_acked and not m.ready_at
            ]
            assert not lost, f"{name}: ids {lost} answered and lost in the crash"
            extra = {d.element for i, d in present.items() if i not in queue}
            for add in maybe_added:
                if add.queue == name:
                    there = [e in extra for e in add.elements]
                    assert all(there) or not any(there), f"{name}: an add applied in part"
                    extra -= set(add.elements)
            assert not extra, f"{name}: {extra} were never added"
            kept: dict[int, ModelMessage] = {i: m for i, m in queue.items() if m.ready_at}
            for message_id, delivery in present.items():
                message = queue.get(message_id) or ModelMessage(
                    message_id, delivery.element, enqueued_at=self.clock.ms()
                )
                assert delivery.lease_expires_at_ms == 0
                assert (delivery.element, delivery.enqueued_at_ms) == (
                    message.element,
                    message.enqueued_at,
                )
                assert delivery.delivery_count > message.delivery_count, message_id
                message.delivery_count, message.holder = delivery.delivery_count, None
                message.lease = 0
                message.count_raised_maybe = False
                kept[message_id] = message
            new = sorted(i for i in present if i not in queue)
            self.issued.extend(new)
            self.issued.sort()
            self.queues[name] = kept

    # Maps ---------------------------------------------------------------------------------

    def put(self, who: int, name: str, pairs: list[tuple[str, str]]) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.maps.map_put(session.token, name, pairs))
        if self.refused(session, outcome):
            return
        expect_ok(outcome)
        self.maps.setdefault(name, {}).update(pairs)  # a repeated key: the last pair wins

    @rule(who=WHO, name=MAP_NAMES, key=KEYS, value=VALUES)
    def map_put(self, who: int, name: str, key: str, value: str) -> None:
        self.put(who, name, [(key, value)])

    @rule(
        who=WHO,
        name=MAP_NAMES,
        pairs=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=5),
    )
    def map_batch_put(self, who: int, name: str, pairs: list[tuple[str, str]]) -> None:
        self.put(who, name, pairs)

    def some_key(self, data: st.DataObject, name: str) -> str:
        present = sorted(self.maps.get(name, {}))
        keys = st.one_of(st.sampled_from(present), KEYS) if present else KEYS
        return data.draw(keys, label="key")

    @rule(who=WHO, name=MAP_NAMES, data=st.data())
    def map_remove(self, who: int, name: str, data: st.DataObject) -> None:
        session = self.pick(who)
        key = self.some_key(data, name)
        outcome = self.call(self.engine.maps.map_remove(session.token, name, key))
        if self.refused(session, outcome):
            return
        if name not in self.maps:
            expect_error(outcome, errors.MapNotFound)
        elif key not in self.maps[name]:
            expect_error(outcome, errors.KeyNotFound)
        else:
            expect_ok(outcome)
            del self.maps[name][key]

    @rule(who=WHO, name=MAP_NAMES, data=st.data())
    def map_get(self, who: int, name: str, data: st.DataObject) -> None:
        session = self.pick(who)
        key = self.some_key(data, name)
        outcome = self.call(self.engine.maps.map_get(session.token, name, key))
        if self.refused(session, outcome):
            return
        if name not in self.maps:
            expect_error(outcome, errors.MapNotFound)
        elif key not in self.maps[name]:
            expect_error(outcome, errors.KeyNotFound)
        else:
            assert expect_ok(outcome) == self.maps[name][key]

    @rule(who=WHO, name=MAP_NAMES)
    def map_get_all(self, who: int, name: str) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.maps.map_get_all(session.token, name))
        if not self.refused(session, outcome):
            self.check_map(name, outcome)

    def check_map(self, name: str, outcome: dict[str, str] | errors.QmError) -> None:
        if name not in self.maps:
            expect_error(outcome, errors.MapNotFound)
        else:
            assert expect_ok(outcome) == self.maps[name], name

    @rule(
        who=WHO,
        name=MAP_NAMES,
        offset=st.integers(min_value=0, max_value=6) | st.just(2**31 - 1),
        size=st.integers(min_value=1, max_value=4),
    )
    def map_get_list(self, who: int, name: str, offset: int, size: int) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.maps.map_get_list(session.token, name, offset, size))
        if self.refused(session, outcome):
            return
        if name not in self.maps:
            expect_error(outcome, errors.MapNotFound)
            return
        assert expect_ok(outcome) == utf8_order(self.maps[name])[offset : offset + size]

    @rule(who=WHO, name=MAP_NAMES, size=st.integers(min_value=1, max_value=3))
    def map_page_through(self, who: int, name: str, size: int) -> None:
        """Paging is only usable if pages laid end to end give the whole map once, in one
        stable order (UTF-8 bytes), then an empty page."""
        session = self.pick(who)
        pages: list[list[tuple[str, str]]] = []
        while True:
            offset = size * len(pages)
            outcome = self.call(self.engine.maps.map_get_list(session.token, name, offset, size))
            if not pages and self.refused(session, outcome):
                return
            if name not in self.maps:
                expect_error(outcome, errors.MapNotFound)
                return
            page = expect_ok(outcome)
            assert len(page) <= size
            if not page:
                break
            pages.append(page)
        assert [kv for page in pages for kv in page] == utf8_order(self.maps[name])

    @rule(who=WHO, name=MAP_NAMES)
    def map_destroy(self, who: int, name: str) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.maps.map_destroy(session.token, name))
        if self.refused(session, outcome):
            return
        if name not in self.maps:
            expect_error(outcome, errors.MapNotFound)
            return
        expect_ok(outcome)
        del self.maps[name]

    # Invariants ---------------------------------------------------------------------------

    def observer_token(self) -> str:
        """A live token for checking; a stale observer is left for the sweep to find,
        exactly as an abandoned client's session would be."""
        observer = self.observer
        if observer is None or observer.ended or self.idle(observer):
            observer = self.observer = self.new_session(observer=True)
        assert self.touch(observer)
        return observer.token

    @invariant()
    def engine_matches_model(self) -> None:
        for name in QUEUES:
            self.check_counts(name, self.call(self.engine.counts(self.observer_token(), name)))
            self.check_info(name)
        for name in MAPS:
            self.check_map(
                name, self.call(self.engine.maps.map_get_all(self.observer_token(), name))
            )
            if name in self.maps:
                page = self.call(
                    self.engine.maps.map_get_list(self.observer_token(), name, 0, 1000)
                )
                assert expect_ok(page) == utf8_order(self.maps[name]), name
        registered = sum(not s.ended for s in self.sessions)
        assert self.engine.session_count() == registered


def test_engine_matches_model() -> None:
    run_state_machine_as_test(
        EngineMachine,
        settings=settings(
            max_examples=70,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# Sequences the random search reaches only now and then, replayed on every run. -----------

Step = Callable[[EngineMachine], None]


def replay(*steps: Step) -> None:
    """Run fixed steps through the machine, judging every one as the search does."""
    machine = EngineMachine()
    try:
        machine.engine_matches_model()
        for step in steps:
            step(machine)
            machine.engine_matches_model()
    finally:
        machine.teardown()


def test_restart_after_the_newest_messages_were_acked_hands_out_new_ids() -> None:
    replay(
        lambda m: m.new_queue(0, "q1"),
        lambda m: m.add_all(0, "q1", ["x", "y"]),
        lambda m: m.drain(0, "q1", 1),
        lambda m: m.restart(),
        lambda m: m.add(0, "q1", "z"),
    )


def test_restart_after_a_forced_destroy_hands_out_new_ids() -> None:
    replay(
        lambda m: m.new_queue(0, "q1"),
        lambda m: m.new_queue(0, "q2"),
        lambda m: m.add(0, "q1", "x"),
        lambda m: m.add(0, "q2", "y"),
        lambda m: m.poll(0, "q2"),
        lambda m: m.destroy_queue(0, "q2", True),
        lambda m: m.restart(),
        lambda m: m.add(0, "q1", "z"),
    )


def test_nacked_message_returns_ahead_of_newer_ones() -> None:
    replay(
        lambda m: m.new_queue(0, "q1"),
        lambda m: m.add_all(0, "q1", ["a", "b", "c"]),
        lambda m: m.pull(0, "q1", 2),
        lambda m: m.acknowledge(m.pick(0), [2, 1], done=False),
        lambda m: m.pull(0, "q1", 4),
    )


def test_restart_makes_in_flight_ready_and_keeps_delivery_counts() -> None:
    replay(
        lambda m: m.new_queue(0, "q1"),
        lambda m: m.add_all(0, "q1", ["a", "b"]),
        lambda m: m.poll(0, "q1"),
        lambda m: m.restart(),
        lambda m: m.login(),
        lambda m: m.pull(0, "q1", 2),
    )


def test_expiry_noticed_on_use_releases_messages() -> None:
    replay(
        lambda m: m.new_queue(0, "q1"),
        lambda m: m.add(0, "q1", "a"),
        lambda m: m.poll(0, "q1"),
        lambda m: m.advance_clock(5.0, sweep=True),
        lambda m: m.advance_clock(5.0, sweep=True),  # idle exactly the ttl: still alive
        lambda m: m.advance_clock(0.5, sweep=False),  # past it, but nobody looked
        lambda m: m.heartbeat(0),
        lambda m: m.poll(0, "q1"),
    )


def test_map_pages_follow_utf8_byte_order() -> None:
    pairs = [("a", "1"), ("B", "2"), ("\uffff", "3"), ("😀", "4"), ("\x00", "5"), ("", "6")]
    replay(
        lambda m: m.map_batch_put(0, "m1", pairs),
        lambda m: m.map_page_through(0, "m1", 2),
        lambda m: m.map_get_list(0, "m1", 3, 4),
        lambda m: m.map_get_list(0, "m1", 2**31 - 1, 1),
    )


def dead_letter_queue_and(**settings: Any) -> list[Step]:
    """Steps that make jobs.x, then q1 with these settings."""
    return [
        lambda m: m.new_queue(0, DEAD_LETTER_QUEUE),
        lambda m: m.new_queue(0, "q1", SettingsChange(**settings)),
    ]


def dead_as(message_id: int, cause: str) -> Step:
    """A step that checks the model (which the engine matched) has the message dead-
    lettered into jobs.x for that cause: the sequence reached what it is named for."""

    def check(m: EngineMachine) -> None:
        message = m.queues[DEAD_LETTER_QUEUE][message_id]
        assert message.dead is not None and message.dead[3] == cause, message

    return check


def test_a_late_ack_is_told_lease_expired_and_the_message_is_delivered_again() -> None:
    replay(
        *dead_letter_queue_and(ack_deadline_ms=2500),
        lambda m: m.add(0, "q1", "a"),
        lambda m: m.poll(0, "q1"),
        lambda m: m.advance_clock(2.5, sweep=False, due=False),  # the timer has not fired
        lambda m: m.extend(m.pick(0), [1], 1000),  # in time for the store: extended
        lambda m: m.timer_fires(),
        lambda m: m.acknowledge(m.pick(0), [1], done=True),  # LEASE_EXPIRED
        lambda m: m.acknowledge(m.pick(0), [1], done=False),  # LEASE_EXPIRED too
        lambda m: m.extend(m.pick(0), [1], 5000),  # LEASE_EXPIRED
        lambda m: m.poll(0, "q1", 1000),  # delivered again, a lease of its own
        lambda m: m.acknowledge(m.pick(0), [1], done=True),
    )


def test_a_poison_message_backs_off_then_is_dead_lettered_with_its_history() -> None:
    retry = RetryPolicy(initial_delay_ms=1000, multiplier=2.0, max_delay_ms=10_000)
    replay(
        *dead_letter_queue_and(max_deliveries=3, dead_letter_queue=DEAD_LETTER_QUEUE, retry=retry),
        lambda m: m.add_all(0, "q1", ["poison", "fine"]),
        lambda m: m.poison(0, "q1"),
        dead_as(1, lifecycle.CAUSE_ACK_ERROR),
        lambda m: m.poll(0, DEAD_LETTER_QUEUE),
        lambda m: m.acknowledge(m.pick(0), [1], done=False),  # in jobs.x: no backoff
        lambda m: m.purge(0, DEAD_LETTER_QUEUE),
    )


def test_extend_to_zero_and_session_end_dead_letter_and_a_restart_gives_one_more_try() -> None:
    replay(
        *dead_letter_queue_and(max_deliveries=1, dead_letter_queue=DEAD_LETTER_QUEUE),
        lambda m: m.add_all(0, "q1", ["a", "b", "c"]),
        lambda m: m.pull(0, "q1", 3),
        lambda m: m.extend(m.pick(0), [1], 0),  # extend to 0
        lambda m: m.logout(0),  # session end: 2 and 3
        dead_as(1, lifecycle.CAUSE_EXTEND_TO_ZERO),
        dead_as(3, lifecycle.CAUSE_SESSION_END),
        lambda m: m.destroy_queue(0, DEAD_LETTER_QUEUE, True),
        lambda m: m.add(0, "q1", "d"),
        lambda m: m.poll(0, "q1"),
        lambda m: m.acknowledge(m.pick(0), [4], done=False),  # no dead-letter queue: stays
        lambda m: m.new_queue(0, DEAD_LETTER_QUEUE),
        lambda m: m.poll(0, "q1"),
        lambda m: m.restart(),  # in flight at the stop: ready again, not dead-lettered
        lambda m: m.poll(0, "q1"),  # one delivery more...
        lambda m: m.acknowledge(m.pick(0), [4], done=False),  # ...and now it goes
        dead_as(4, lifecycle.CAUSE_ACK_ERROR),
    )


def test_delays_come_due_in_order_and_purge_takes_ready_and_delayed() -> None:
    replay(
        *dead_letter_queue_and(delay_ms=2500),
        lambda m: m.add(0, "q1", "late"),
        lambda m: m.add(0, "q1", "now", 0),
        lambda m: m.add(0, "q1", "soon", 1000),
        lambda m: m.pull(0, "q1", 3),  # only "now"
        lambda m: m.timer_fires(),  # "soon"
        lambda m: m.timer_fires(),  # "late"
        lambda m: m.add(0, "q1", "later", 2500),
        lambda m: m.purge(0, "q1"),  # 2 ready + 1 delayed; "now" stays held
    )


def test_a_redriven_message_is_not_dead_lettered_again_by_a_restart() -> None:
    """A dead letter redriven to its queue is ready there, delivered no more times than
    when it was dead-lettered, and was in flight for nobody: a restart releases nothing
    of it, so it must stay in its queue. (Dead-lettering is for a message "delivered that
    many times and released again"; issue 13.)"""
    machine = EngineMachine()
    try:
        machine.new_queue(0, DEAD_LETTER_QUEUE)
        change = SettingsChange(max_deliveries=1, dead_letter_queue=DEAD_LETTER_QUEUE)
        machine.new_queue(0, "q1", change)
        machine.add(0, "q1", "a")
        machine.poll(0, "q1")
        machine.acknowledge(machine.pick(0), [1], done=False)  # dead-lettered: ack error
        token = machine.pick(0).token
        assert machine.call(machine.engine.admin.redrive(token, DEAD_LETTER_QUEUE, [])) == (1, [])
        assert machine.call(machine.engine.counts(token, "q1")) == (1, 0)
        machine.restart()
        token = machine.new_session(observer=False).token
        assert machine.call(machine.engine.counts(token, DEAD_LETTER_QUEUE)) == (0, 0)
        assert machine.call(machine.engine.counts(token, "q1")) == (1, 0)
    finally:
        machine.teardown()
