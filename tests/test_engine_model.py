"""The engine on the real SQLite store, driven by Hypothesis against a plain in-memory model.

Example tests check the rules one at a time; the interesting failures of a queue server
come from interleavings nobody writes by hand: a nack after a forced destroy, an expiry
noticed lazily while messages are in flight, a restart between a pull and its ack. The
model below is the contract in its simplest form (dicts and lists), so any difference
between it and the engine after any sequence of calls is a bug in one of the two.

Most rules make one call and wait for its answer; `concurrently` runs several sessions'
calls at once (producers, consumers with long polls, Subscribe streams), cancels claims
midway and crashes the store mid-round, and checks that the answers fit some order of
the calls (see its docstring).

One asyncio loop lives as long as one run of the machine, because the store's writer
thread resolves its futures on the loop that opened it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import FAST_AUTH, encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.auth import KeyPair, PasswordHasher
from qm_server.engine import Engine
from qm_server.store.base import Delivery, UserRecord
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


# A memory-backed directory when there is one: every commit fsyncs, and on a shared disk
# the fsyncs, not the engine, would set the pace; durability is tested elsewhere.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def expect_error(outcome: object, expected: type[errors.QmError]) -> None:
    assert type(outcome) is expected, f"expected {expected.__name__}, got {outcome!r}"


def expect_ok(outcome: T | errors.QmError) -> T:
    assert not isinstance(outcome, errors.QmError), f"unexpected {outcome!r}"
    return outcome


def utf8_order(pairs: dict[str, str]) -> list[tuple[str, str]]:
    return sorted(pairs.items(), key=lambda kv: kv[0].encode())


async def open_engine(data_dir: Path, clock: FakeClock) -> tuple[SqliteStore, Engine]:
    store = SqliteStore(data_dir)
    await store.open()
    if await store.get_user("admin") is None:
        await store.create_user(UserRecord("admin", PASSWORD_HASH, is_admin=True))
    engine = Engine(store, KEY, session_ttl_s=TTL_S, auth=FAST_AUTH, clock=clock)
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
        self.store: SqliteStore | None = None
        self.engine_: Engine | None = None
        self.store, self.engine_ = self.loop.run_until_complete(
            open_engine(self.data_dir, self.clock)
        )
        self.sessions: list[ModelSession] = []
        self.observer: ModelSession | None = None
        self.queues: dict[str, dict[int, ModelMessage]] = {}
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
        session.ended = True
        for queue in self.queues.values():
            for message in queue.values():
                if message.holder is session:
                    message.holder = None

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
            (m for m in self.queues[name].values() if m.holder is None), key=lambda m: m.id
        )

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

    @rule(seconds=CLOCK_STEPS, sweep=st.booleans())
    def advance_clock(self, seconds: float, sweep: bool) -> None:
        """Without the sweep, idle sessions linger until used: the lazy path."""
        self.clock.now += seconds
        if sweep:
            expect_ok(self.call(self.engine.expire_idle_sessions()))
            for session in self.sessions:
                if not session.ended and self.idle(session):
                    self.end(session)

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
        for session in self.sessions:
            session.ended = True
        for queue in self.queues.values():
            for message in queue.values():
                message.holder = None

    # Queues -------------------------------------------------------------------------------

    @initialize(names=st.sets(QUEUE_NAMES, min_size=2), elements=st.lists(TEXTS, max_size=6))
    def fill_queues(self, names: set[str], elements: list[str]) -> None:
        """Start with queues and messages: with some twenty rules to choose from, most
        sequences would otherwise never get a message delivered twice."""
        for name in sorted(names):
            self.new_queue(0, name)
        if elements:
            self.enqueue(0, min(names), elements)

    @rule(who=WHO, name=QUEUE_NAMES)
    def new_queue(self, who: int, name: str) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.new_queue(session.token, name))
        if self.refused(session, outcome):
            return
        if name in self.queues:
            expect_error(outcome, errors.QueueAlreadyExists)
            return
        expect_ok(outcome)
        self.queues[name] = {}

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

    def enqueue(self, who: int, name: str, elements: list[str]) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.add(session.token, name, elements))
        if self.refused(session, outcome):
            return
        if not elements:
            expect_error(outcome, errors.InvalidArgument)
            return
        if name not in self.queues:
            expect_error(outcome, errors.QueueNotFound)
            return
        ids = expect_ok(outcome)
        assert len(ids) == len(elements)
        # Unique across queues and never reused, even after a restart: each new id is
        # larger than every id handed out before.
        floor = self.issued[-1] if self.issued else 0
        assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] > floor, ids
        self.issued.extend(ids)
        for message_id, element in zip(ids, elements, strict=True):
            self.queues[name][message_id] = ModelMessage(message_id, element)

    @rule(who=WHO, name=QUEUE_NAMES, element=TEXTS)
    def add(self, who: int, name: str, element: str) -> None:
        self.enqueue(who, name, [element])

    @rule(who=WHO, name=QUEUE_NAMES, elements=st.lists(TEXTS, max_size=4))
    def add_all(self, who: int, name: str, elements: list[str]) -> None:
        self.enqueue(who, name, elements)

    def take(self, session: ModelSession, name: str, number: int) -> list[int]:
        """The ids delivered, so that a worker can ack exactly what it got."""
        outcome = self.call(self.engine.take(session.token, name, number, 0))
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
        for message, delivery in zip(taken, got, strict=True):
            if message.count_raised_maybe and delivery.delivery_count > message.delivery_count:
                message.delivery_count = delivery.delivery_count - 1
            message.count_raised_maybe = False
            message.delivery_count += 1
            message.holder = session
        expected = [Delivery(m.id, m.element, m.delivery_count) for m in taken]
        # The model keeps no clock: first add times and lease ends are the store's tests'.
        assert [d[:3] for d in got] == [d[:3] for d in expected]
        return [m.id for m in taken]

    @rule(who=WHO, name=QUEUE_NAMES)
    def poll(self, who: int, name: str) -> None:
        self.take(self.pick(who), name, 1)

    @rule(who=WHO, name=QUEUE_NAMES, number=st.integers(min_value=0, max_value=4))
    def pull(self, who: int, name: str, number: int) -> None:
        self.take(self.pick(who), name, number)

    @rule(
        who=WHO,
        name=QUEUE_NAMES,
        number=st.integers(min_value=1, max_value=4),
        data=st.data(),
    )
    def work(self, who: int, name: str, number: int, data: st.DataObject) -> None:
        """A worker's cycle: pull, then ack some done, nack some, keep the rest.

        Separate pull and ack rules rarely meet (another session, a restart or an expiry
        comes between, or swarm testing disabled one of them), so redelivery would be rare.
        """
        session = self.pick(who)
        ids = self.take(session, name, number)
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
            found = self.find(message_id)
            mine = found is not None and found[1].holder is session
            expected.append(errors.Code.OK if mine else errors.Code.MESSAGE_NOT_FOUND)
            if found is not None and mine:
                queue, message = found
                if done:
                    del queue[message_id]
                else:
                    message.holder = None
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
        ready = len(self.ready(name))
        assert expect_ok(outcome) == (ready, len(self.queues[name]) - ready), name

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
        names = sorted(self.queues)
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
                    self.queues[e.queue][message_id] = ModelMessage(message_id, element)
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
                del queue[message_id]
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
        for session in self.sessions:
            session.ended = True
        self.observer = None
        unknown = run.events[run.known or 0 :]
        maybe_acked = {i for e in unknown if e.kind == "ack" and e.done for i in e.ids}
        maybe_acked |= {i for ids in run.pending_done_acks.values() for i in ids}
        maybe_added = [e for e in unknown if e.kind == "add"] + list(run.pending_adds.values())
        reader = self.new_session(observer=False)
        for name, queue in self.queues.items():
            outcome = self.call(self.engine.take(reader.token, name, 1000, 0))
            got = [] if isinstance(outcome, errors.QueueEmpty) else expect_ok(outcome)
            if got:
                ids = [d.message_id for d in got]
                assert expect_ok(self.call(self.engine.ack(reader.token, ids, pb.ACK_TYPE_ERROR)))
            assert [d.message_id for d in got] == sorted(d.message_id for d in got)
            present = {d.message_id: d for d in got}
            lost = [i for i in queue if i not in present and i not in maybe_acked]
            assert not lost, f"{name}: ids {lost} answered and lost in the crash"
            extra = {d.element for i, d in present.items() if i not in queue}
            for add in maybe_added:
                if add.queue == name:
                    there = [e in extra for e in add.elements]
                    assert all(there) or not any(there), f"{name}: an add applied in part"
                    extra -= set(add.elements)
            assert not extra, f"{name}: {extra} were never added"
            for message_id, delivery in present.items():
                if message_id in queue:
                    message = queue[message_id]
                    assert delivery.element == message.element
                    assert delivery.delivery_count > message.delivery_count, message_id
            new = sorted(i for i in present if i not in queue)
            self.issued.extend(new)
            self.issued.sort()
            self.queues[name] = {
                d.message_id: ModelMessage(d.message_id, d.element, d.delivery_count) for d in got
            }

    # Maps ---------------------------------------------------------------------------------

    def put(self, who: int, name: str, pairs: list[tuple[str, str]]) -> None:
        session = self.pick(who)
        outcome = self.call(self.engine.map_put(session.token, name, pairs))
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
        outcome = self.call(self.engine.map_remove(session.token, name, key))
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
        outcome = self.call(self.engine.map_get(session.token, name, key))
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
        outcome = self.call(self.engine.map_get_all(session.token, name))
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
        outcome = self.call(self.engine.map_get_list(session.token, name, offset, size))
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
            outcome = self.call(self.engine.map_get_list(session.token, name, offset, size))
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
        outcome = self.call(self.engine.map_destroy(session.token, name))
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
        for name in MAPS:
            self.check_map(name, self.call(self.engine.map_get_all(self.observer_token(), name)))
            if name in self.maps:
                page = self.call(self.engine.map_get_list(self.observer_token(), name, 0, 1000))
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
