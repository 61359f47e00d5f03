"""Engine rules against a fake clock: expiry, throttling and delivery without the network."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from user_directory import as_user_command

from conftest import FAST_AUTH, encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.auth import KeyPair, LoginThrottle, PasswordHasher
from qm_server.engine import Engine
from qm_server.permissions import Grant, Permissions
from qm_server.sessions import Session
from qm_server.store.base import Delivery, UserDirectory, UserRecord
from qm_server.store.sqlite import SqliteStore
from qm_server.subscription import Subscription

T = TypeVar("T")
KEY = KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


EngineTest = Callable[[Engine, FakeClock], Awaitable[None]]


def run(tmp_path: Path, test: EngineTest, session_ttl_s: float = 10.0) -> None:
    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        hashed = PasswordHasher.from_settings(FAST_AUTH).hash("pw")
        await store.create_user(UserRecord("admin", hashed, is_admin=True))
        clock = FakeClock()
        engine = Engine(store, KEY, session_ttl_s=session_ttl_s, auth=FAST_AUTH, clock=clock)
        try:
            await test(engine, clock)
        finally:
            await engine.stop()
            await store.close()

    asyncio.run(main())


async def log_in(
    engine: Engine, password: str = "pw", username: str = "admin", peer: str = "peer"
) -> str:
    challenge = engine.get_challenge()
    reply = pb.GetChallengeResponse(
        public_key_pem=challenge.public_key_pem, challenge=challenge.challenge
    )
    token, _ = await engine.login(username, encrypt_password(reply, password), peer)
    return token


async def with_queue_q(engine: Engine) -> str:
    """Admin's token, queue q created."""
    token = await log_in(engine)
    await engine.new_queue(token, "q")
    return token


@contextlib.asynccontextmanager
async def stream(engine: Engine, token: str, window: int = 10) -> AsyncIterator[Subscription]:
    """A Subscribe stream on q, closed (releasing what it holds) however the test ends."""
    subscription = await engine.subscribe(token, "q", window)
    try:
        yield subscription
    finally:
        await subscription.close()


async def held_by_another(engine: Engine) -> tuple[str, str]:
    """Admin's token and a second session's, which holds q's one message "a"."""
    token, holder = await with_queue_q(engine), await log_in(engine)
    await engine.add(token, "q", ["a"])
    assert len(await engine.take(holder, "q", 1, 0)) == 1
    return token, holder


def test_session_expires_after_ttl_of_inactivity(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await log_in(engine)
        clock.now += 9
        await engine.heartbeat(token)  # activity resets the ttl
        clock.now += 9
        await engine.new_queue(token, "q")
        clock.now += 10.5
        with pytest.raises(errors.Unauthenticated):
            await engine.heartbeat(token)

    run(tmp_path, scenario)


def test_expiry_releases_in_flight_messages(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        producer = await log_in(engine)
        consumer = await log_in(engine)
        await engine.new_queue(producer, "q")
        await engine.add(producer, "q", ["a", "b"])
        taken = await engine.take(consumer, "q", 2, 0)
        assert [d.delivery_count for d in taken] == [1, 1]
        clock.now += 6
        await engine.heartbeat(producer)
        clock.now += 6  # the consumer is now idle for 12 s > 10 s, the producer for 6 s
        await engine.expire_idle_sessions()
        assert await engine.counts(producer, "q") == (2, 0)
        again = await engine.take(producer, "q", 2, 0)
        assert [(d.element, d.delivery_count) for d in again] == [("a", 2), ("b", 2)]

    run(tmp_path, scenario)


def test_throttle_backs_off_and_recovers(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        for _ in range(FAST_AUTH.failures_before_backoff):
            with pytest.raises(errors.Unauthenticated):
                await log_in(engine, "wrong")
        with pytest.raises(errors.ResourceExhausted):
            await log_in(engine, "pw")
        clock.now += 1.01  # first backoff is one second
        assert await log_in(engine, "pw")

    run(tmp_path, scenario)


def test_waiter_wakes_when_message_is_nacked(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        (message_id,) = await engine.add(token, "q", ["x"])
        await engine.take(token, "q", 1, 0)
        waiting = asyncio.ensure_future(engine.take(token, "q", 1, 5000))
        await until(engine, lambda: engine.signals.waiting() == 1)
        assert not waiting.done()
        assert await engine.ack(token, [message_id], pb.ACK_TYPE_ERROR) == [errors.Code.OK]
        (delivery,) = await asyncio.wait_for(waiting, 5)
        assert (delivery.message_id, delivery.delivery_count) == (message_id, 2)

    run(tmp_path, scenario)


def test_a_drain_cuts_long_polls_short_with_unavailable_not_queue_empty(tmp_path: Path) -> None:
    """A long poll cut short by the drain answered QUEUE_EMPTY, so a consumer loop that
    stops at an empty queue stopped whenever the server restarted. It answers UNAVAILABLE,
    having claimed nothing; a poll that did not ask to wait is answered as always."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        waiting = asyncio.ensure_future(engine.take(token, "q", 1, 20_000))
        await until(engine, lambda: engine.signals.waiting() == 1)
        engine.begin_drain()
        with pytest.raises(errors.Unavailable):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(errors.Unavailable):  # nor does a new one start to wait
            await asyncio.wait_for(engine.take(token, "q", 5, 20_000), 5)
        with pytest.raises(errors.QueueEmpty):
            await engine.take(token, "q", 1, 0)
        assert await engine.counts(token, "q") == (0, 0)  # nothing was claimed
        await engine.add(token, "q", ["a"])
        (delivery,) = await asyncio.wait_for(engine.take(token, "q", 1, 20_000), 5)
        assert (delivery.element, delivery.delivery_count) == ("a", 1)

    run(tmp_path, scenario)


def before_parking(
    engine: Engine, meanwhile: Callable[[str, list[Delivery]], Awaitable[object]]
) -> None:
    """Let the store's next claim run, then `meanwhile(queue, what it found)` before its
    caller can park: the window between a claim that found nothing and the park that
    follows it, in which a wake-up finds nobody parked yet."""
    store = engine.store
    claim = store.claim

    async def claim_then(
        name: str, session_id: int, limit: int, max_bytes: int, lease_ms: int | None = None
    ) -> list[Delivery]:
        store.claim = claim  # type: ignore[method-assign]  # once
        found = await claim(name, session_id, limit, max_bytes, lease_ms)
        await meanwhile(name, found)
        return found

    store.claim = claim_then  # type: ignore[method-assign]


def release_before_parking(engine: Engine, holder: str) -> None:
    """The holder's messages become ready, and their wake-up fires, in that window."""

    async def release(name: str, found: list[Delivery]) -> None:
        assert found == []
        await engine.store.release_session((await engine.session(holder)).id)  # wakes nobody yet

    before_parking(engine, release)


def test_a_long_poll_sees_messages_made_ready_while_it_claimed(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token, holder = await held_by_another(engine)
        release_before_parking(engine, holder)
        (delivery,) = await asyncio.wait_for(engine.take(token, "q", 1, 30_000), 5)
        assert (delivery.element, delivery.delivery_count) == ("a", 2)

    run(tmp_path, scenario)


def test_a_subscription_sees_messages_made_ready_while_it_claimed(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token, holder = await held_by_another(engine)
        async with stream(engine, token) as subscription:
            release_before_parking(engine, holder)
            (delivery,) = await asyncio.wait_for(subscription.next_batch(), 5)
            assert (delivery.element, delivery.delivery_count) == ("a", 2)

    run(tmp_path, scenario)


def test_a_subscription_whose_session_ends_while_it_claims_ends_at_once(
    tmp_path: Path,
) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        async with stream(engine, token) as subscription:
            # Its poke finds nobody waiting yet.
            before_parking(engine, lambda name, found: engine.logout(token))
            with pytest.raises(errors.Unauthenticated):
                await asyncio.wait_for(subscription.next_batch(), 5)

    run(tmp_path, scenario)


def test_stop_waits_for_background_work_started_while_it_waits(tmp_path: Path) -> None:
    """The end of a cancelled call can start a release while stop() already waits for
    the others; the store closes after stop(), so that release must be waited for too."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        finished: list[str] = []

        async def started_later() -> None:
            await asyncio.sleep(0.05)  # a release's round trip through the store, say
            finished.append("started later")

        async def first() -> None:  # runs once stop() waits for it
            engine.in_background(started_later())
            finished.append("first")

        engine.in_background(first())
        await engine.stop()
        assert finished == ["first", "started later"]

    run(tmp_path, scenario)


_STARTED_WAITING: weakref.WeakKeyDictionary[Engine, asyncio.Event] = weakref.WeakKeyDictionary()


def started_waiting(engine: Engine) -> asyncio.Event:
    """An event set each time a call of the engine parks on a queue or starts a wait
    (`signals.park`, `busy`): the only moments at which what `until` waits for changes."""
    event = _STARTED_WAITING.get(engine)
    if event is not None:
        return event
    event = _STARTED_WAITING[engine] = asyncio.Event()
    park, busy = engine.signals.park, engine.deliverer.busy

    def park_and_tell(name: str, waiter: asyncio.Future[None]) -> None:
        park(name, waiter)
        event.set()

    @contextlib.contextmanager
    def busy_and_tell(session: Session) -> Iterator[None]:
        with busy(session):
            event.set()
            yield

    engine.signals.park = park_and_tell  # type: ignore[method-assign]
    engine.deliverer.busy = busy_and_tell  # type: ignore[method-assign]
    return event


async def until(engine: Engine, condition: Callable[[], bool]) -> None:
    """Wait until condition (about parked or waiting calls) holds, re-checking it each
    time a call starts to wait: an awaited event, not a count of loop passes, which a
    claim running on the store's writer thread could outlast."""
    changed = started_waiting(engine)
    async with asyncio.timeout(5):
        while not condition():
            changed.clear()
            await changed.wait()


def test_a_subscription_that_ends_after_its_wake_up_passes_it_on(tmp_path: Path) -> None:
    """A subscription woken for a ready message whose session ends before it runs leaves
    without claiming; the long poll parked behind it must get the wake-up instead."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token, subscriber, poller = await log_in(engine), await log_in(engine), await log_in(engine)
        await engine.new_queue(token, "q")
        subscription = await engine.subscribe(subscriber, "q", 10)
        pushing = asyncio.ensure_future(subscription.next_batch())
        await until(engine, lambda: engine.signals.waiting() == 1)
        polling = asyncio.ensure_future(engine.take(poller, "q", 1, 30_000))
        await until(engine, lambda: engine.signals.waiting() == 2)

        # The add's answer runs before the subscription it woke: the session ends in
        # between, so the subscription wakes into an ended session.
        await engine.add(token, "q", ["m"])
        await engine.logout(subscriber)
        with pytest.raises(errors.Unauthenticated):
            await asyncio.wait_for(pushing, 5)
        await subscription.close()
        (delivery,) = await asyncio.wait_for(polling, 5)
        assert delivery.element == "m"

    run(tmp_path, scenario)


def test_a_long_poll_whose_session_ends_answers_at_once(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        polling = asyncio.ensure_future(engine.take(token, "q", 1, 30_000))
        await until(engine, lambda: engine.signals.waiting() == 1)
        await engine.logout(token)
        with pytest.raises(errors.Unauthenticated):
            await asyncio.wait_for(polling, 5)

    run(tmp_path, scenario)


def test_a_long_poll_whose_session_ends_while_it_claims_answers_at_once(
    tmp_path: Path,
) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        before_parking(engine, lambda name, found: engine.logout(token))
        with pytest.raises(errors.Unauthenticated):
            await asyncio.wait_for(engine.take(token, "q", 1, 30_000), 5)

    run(tmp_path, scenario)


def destroy_before_parking(engine: Engine, token: str) -> None:
    """The queue is destroyed in that window: the destroy's wake-up finds nobody parked."""
    before_parking(engine, lambda name, found: engine.destroy_queue(token, name, force=True))


def test_a_long_poll_whose_queue_is_destroyed_while_it_claims_answers_at_once(
    tmp_path: Path,
) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        destroy_before_parking(engine, token)
        with pytest.raises(errors.QueueNotFound):
            await asyncio.wait_for(engine.take(token, "q", 1, 30_000), 5)

    run(tmp_path, scenario)


def test_a_subscription_whose_queue_is_destroyed_while_it_claims_ends(tmp_path: Path) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        async with stream(engine, token) as subscription:
            destroy_before_parking(engine, token)
            with pytest.raises(errors.QueueNotFound):
                await asyncio.wait_for(subscription.next_batch(), 5)

    run(tmp_path, scenario)


def test_failed_background_work_is_logged_not_left_unretrieved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        async def fails() -> None:
            raise errors.Unavailable("the store is closed")

        engine.in_background(fails())
        await engine.stop()
        assert "background work failed: the store is closed" in caplog.text

    run(tmp_path, scenario)


def test_a_failed_ack_on_a_stream_leaves_its_messages_for_the_close_to_release(
    tmp_path: Path,
) -> None:
    async def scenario(engine: Engine, clock: FakeClock) -> None:
        token = await with_queue_q(engine)
        await engine.add(token, "q", ["a", "b"])
        subscription = await engine.subscribe(token, "q", 10)
        ids = [d.message_id for d in await subscription.next_batch()]
        store = engine.store
        ack_and_claim = store.ack_and_claim

        async def fails_once(*args: Any, **kwargs: Any) -> Any:
            store.ack_and_claim = ack_and_claim  # type: ignore[method-assign]
            raise errors.Unavailable("the store could not commit")

        store.ack_and_claim = fails_once  # type: ignore[method-assign]
        with pytest.raises(errors.Unavailable):
            await subscription.ack(ids, pb.ACK_TYPE_DONE)
        await subscription.close()  # the transaction was lost: both are still held
        counts = await store.queue_counts("q")
        assert (counts.ready, counts.in_flight) == (2, 0)

    run(tmp_path, scenario)


def test_a_throttle_past_a_thousand_failures_still_backs_off() -> None:
    """The backoff doubled with no bound on its exponent: past about 1030 failures
    2.0 ** n overflowed, the failed login answered CODE_INTERNAL and the key's count was
    lost, so its next logins were free again."""
    clock = FakeClock()
    throttle = LoginThrottle(5, 60.0, clock)
    for _ in range(1100):
        clock.now += 61  # each try waits out the backoff, as a patient guesser does
        throttle.failed("user:admin")
    assert throttle.retry_after("user:admin") == pytest.approx(60.0)


def test_a_burst_of_concurrent_logins_gets_no_more_answers_than_the_throttle_allows(
    tmp_path: Path,
) -> None:
    """Every login of a burst passed the throttle before any of them failed, so twenty
    parallel guesses all got their answer where one at a time allows five."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        results = await asyncio.gather(
            *(log_in(engine, f"guess-{i}") for i in range(20)), return_exceptions=True
        )
        answered = [r for r in results if isinstance(r, errors.Unauthenticated)]
        refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
        assert (len(answered), len(refused)) == (FAST_AUTH.failures_before_backoff, 15)

    run(tmp_path, scenario)


def user_bob(password: str) -> UserRecord:
    return UserRecord("bob", PasswordHasher.from_settings(FAST_AUTH).hash(password), False)


def bob_password_set_to(password: str) -> Callable[[UserDirectory], Awaitable[bool]]:
    """What `user passwd bob` does."""
    return lambda users: users.set_password("bob", user_bob(password).password_hash)


READ_Q = Grant("read", "queue", "q")


def bob_reads_q(tmp_path: Path, password: str) -> None:
    """User bob, who may read queue q, as `user add` and `user grant` make him."""
    as_user_command(tmp_path, lambda users: users.create_user(user_bob(password)))
    as_user_command(tmp_path, lambda users: users.add_grants("bob", [READ_Q]))


async def revoked_after_parking(
    engine: Engine, tmp_path: Path, wait: Callable[[str], Awaitable[T]]
) -> asyncio.Future[T]:
    """User bob with the read grant on queue q starts `wait(his token)`; once it parked,
    the grant is revoked as `qm-server user revoke` does and the sweep reloads grants."""
    bob_reads_q(tmp_path, "bob-pw")
    waiting = asyncio.ensure_future(wait(await log_in(engine, "bob-pw", "bob")))
    await until(engine, lambda: engine.signals.waiting() == 1)
    as_user_command(tmp_path, lambda users: users.remove_grants("bob", [READ_Q]))
    await engine.refresh_permissions()  # the sweep's reload
    return waiting


def test_a_long_poll_parked_before_a_revocation_takes_nothing_after_it(tmp_path: Path) -> None:
    """Revocations reach a running server within about a second; a long poll that had
    parked with the grant went on to claim messages for up to its wait_ms (20 s)."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        admin = await with_queue_q(engine)
        polling = await revoked_after_parking(
            engine, tmp_path, lambda bob: engine.take(bob, "q", 1, 20_000)
        )
        await engine.add(admin, "q", ["secret"])
        with pytest.raises(errors.PermissionDenied):
            await asyncio.wait_for(polling, 5)
        assert await engine.counts(admin, "q") == (1, 0)

    run(tmp_path, scenario)


def test_a_user_removed_while_logging_in_gets_no_session(tmp_path: Path) -> None:
    """The user record was read before the slow password hash; a `user remove` committed
    during the hash still got an OK login and a token."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        hasher = engine._hasher

        class RemoveDuringHash:
            def verify(self, password: str, stored: str | None) -> bool:
                ok = hasher.verify(password, stored)
                as_user_command(tmp_path, lambda users: users.delete_user("admin"))
                return ok

        engine._hasher = RemoveDuringHash()  # type: ignore[assignment]
        with pytest.raises(errors.Unauthenticated):
            await log_in(engine)
        assert engine.session_count() == 0

    run(tmp_path, scenario)


def test_a_password_change_ends_the_user_s_sessions(tmp_path: Path) -> None:
    """`user passwd` left every session opened with the old password working, so changing
    a password that had leaked did not shut out whoever had used it."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        admin = await with_queue_q(engine)
        await engine.add(admin, "q", ["held"])
        bob_reads_q(tmp_path, "old-pw")
        bob = await log_in(engine, "old-pw", "bob")
        assert len(await engine.take(bob, "q", 1, 0)) == 1
        as_user_command(tmp_path, bob_password_set_to("new-pw"))
        await engine.refresh_permissions()  # the sweep's reload
        with pytest.raises(errors.Unauthenticated):
            await engine.heartbeat(bob)
        assert await engine.counts(admin, "q") == (1, 0)  # what bob held is ready again
        await engine.heartbeat(admin)  # other users' sessions go on
        with pytest.raises(errors.Unauthenticated):
            await log_in(engine, "old-pw", "bob")
        await engine.heartbeat(await log_in(engine, "new-pw", "bob"))

    run(tmp_path, scenario)


def test_a_user_removed_and_added_again_between_reloads_loses_its_sessions(
    tmp_path: Path,
) -> None:
    """Removed and added again (same name, same password) within one reload, the user
    kept the sessions of the removed account: the reload only looked for missing names."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        as_user_command(tmp_path, lambda users: users.create_user(user_bob("pw")))
        bob = await log_in(engine, "pw", "bob")

        async def remove_and_add_again(users: UserDirectory) -> None:
            await users.delete_user("bob")
            await users.create_user(user_bob("pw"))

        as_user_command(tmp_path, remove_and_add_again)
        await engine.refresh_permissions()
        with pytest.raises(errors.Unauthenticated):
            await engine.heartbeat(bob)
        await engine.heartbeat(await log_in(engine, "pw", "bob"))

    run(tmp_path, scenario)


def test_a_password_changed_while_logging_in_gets_no_session(tmp_path: Path) -> None:
    """The old password was checked against the record read before the hash; a `user
    passwd` committed meanwhile must not let that login through."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        as_user_command(tmp_path, lambda users: users.create_user(user_bob("old-pw")))
        hasher = engine._hasher

        class ChangeDuringHash:
            def verify(self, password: str, stored: str | None) -> bool:
                ok = hasher.verify(password, stored)
                as_user_command(tmp_path, bob_password_set_to("new-pw"))
                return ok

        engine._hasher = ChangeDuringHash()  # type: ignore[assignment]
        with pytest.raises(errors.Unauthenticated):
            await log_in(engine, "old-pw", "bob")
        assert engine.session_count() == 0

    run(tmp_path, scenario)


@contextlib.asynccontextmanager
async def full_stream_on_q(engine: Engine) -> AsyncIterator[tuple[str, Subscription, list[int]]]:
    """Admin's token and stream on q, whose window of 2 holds q's two messages (ids)."""
    admin = await with_queue_q(engine)
    await engine.add(admin, "q", ["a", "b"])
    async with stream(engine, admin, window=2) as subscription:
        held = [d.message_id for d in await subscription.next_batch()]
        yield admin, subscription, held


async def waiting_for_room(
    engine: Engine, subscription: Subscription
) -> asyncio.Future[list[Delivery]]:
    """Its next batch, once it waits for acks to free room."""
    waiting = asyncio.ensure_future(subscription.next_batch())
    await until(engine, lambda: subscription.session.waiting == 1)
    return waiting


def test_a_full_subscription_ends_when_its_queue_is_destroyed(tmp_path: Path) -> None:
    """A stream with a full window waited only for acks, so destroying its queue left it
    open, holding ids that no longer existed, until the client acked something; it now
    ends with QUEUE_NOT_FOUND at the destruction."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        async with full_stream_on_q(engine) as (admin, subscription, held):
            assert len(held) == 2  # the window is full
            waiting = await waiting_for_room(engine, subscription)
            await engine.destroy_queue(admin, "q", force=True)
            with pytest.raises(errors.QueueNotFound):
                await asyncio.wait_for(waiting, 5)

    run(tmp_path, scenario)


def test_a_destroy_whose_caller_gives_up_still_ends_the_queues_streams(tmp_path: Path) -> None:
    """The store destroys a queue even when the DestroyQueue call is cancelled (a client
    deadline) while it commits; the engine then skipped waking and ending the queue's
    streams, so one with a full window stayed open on a queue that no longer existed."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        async with full_stream_on_q(engine) as (admin, subscription, held):
            assert len(held) == 2  # the window is full
            waiting = await waiting_for_room(engine, subscription)
            destroying = asyncio.Event()
            destroy_queue = engine.store.destroy_queue

            async def destroy_and_tell(name: str, force: bool) -> None:
                destroying.set()
                await destroy_queue(name, force)

            engine.store.destroy_queue = destroy_and_tell  # type: ignore[method-assign]
            destroy = asyncio.ensure_future(engine.destroy_queue(admin, "q", force=True))
            await destroying.wait()  # the store has it; now its caller leaves
            destroy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await destroy
            # A writer operation queued after the destruction: it is committed once this is.
            await engine.store.release_session(0)
            with pytest.raises(errors.QueueNotFound):
                await engine.counts(admin, "q")  # it was destroyed all the same
            with pytest.raises(errors.QueueNotFound):
                await asyncio.wait_for(waiting, 5)

    run(tmp_path, scenario)


def test_an_ack_on_a_destroyed_queues_stream_claims_nothing_from_its_successor(
    tmp_path: Path,
) -> None:
    """A stream whose queue was destroyed still refilled its window when the client acked
    before the stream ended: from a queue created again under the same name, handing out
    (and then, at the stream's end, giving back) messages of a queue it never opened."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        async with full_stream_on_q(engine) as (admin, subscription, held):
            await engine.destroy_queue(admin, "q", force=True)
            await engine.new_queue(admin, "q")
            await engine.add(admin, "q", ["c"])
            found, refill = await subscription.ack(held[:1], pb.ACK_TYPE_DONE)
            assert (found, refill) == ([errors.Code.MESSAGE_NOT_FOUND], [])
            assert await engine.counts(admin, "q") == (1, 0)
        poll = await engine.take(admin, "q", 1, 0)
        assert [(d.element, d.delivery_count) for d in poll] == [("c", 1)]

    run(tmp_path, scenario)


def test_a_reload_cut_short_while_ending_a_session_still_stops_revoked_streams(
    tmp_path: Path,
) -> None:
    """A reload woke the streams only after ending the sessions it had to end; cancelled
    meanwhile (a login's reload whose caller gave up), it woke none, and the next reload
    saw no change: a stream whose grant was revoked stayed open until something else
    woke it."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        await with_queue_q(engine)
        bob_reads_q(tmp_path, "pw")
        bob = await log_in(engine, "pw", "bob")
        ending = asyncio.Event()
        original = engine._end_session

        async def hangs(session: Session, why: str) -> None:
            ending.set()
            await asyncio.Event().wait()  # a release that never finishes

        async with stream(engine, bob) as subscription:
            pushing = asyncio.ensure_future(subscription.next_batch())
            await until(engine, lambda: engine.signals.waiting() == 1)
            as_user_command(tmp_path, lambda users: users.remove_grants("bob", [READ_Q]))
            as_user_command(tmp_path, lambda users: users.delete_user("admin"))
            engine._end_session = hangs  # type: ignore[method-assign]
            try:
                reload = asyncio.ensure_future(engine.refresh_permissions())
                await ending.wait()  # it is ending admin's session
                reload.cancel()
                with pytest.raises(errors.PermissionDenied):
                    await asyncio.wait_for(pushing, 5)
            finally:
                engine._end_session = original  # type: ignore[method-assign]

    run(tmp_path, scenario)


def test_a_subscription_stops_at_a_revocation(tmp_path: Path) -> None:
    """A stream opened with the read grant went on delivering for as long as it stayed
    open after the grant was revoked; it now ends with PERMISSION_DENIED at the reload."""

    async def scenario(engine: Engine, clock: FakeClock) -> None:
        admin = await with_queue_q(engine)
        subscriptions: list[Subscription] = []

        async def push(bob: str) -> list[Delivery]:
            subscriptions.append(await engine.subscribe(bob, "q", 10))
            return await subscriptions[0].next_batch()

        pushing = await revoked_after_parking(engine, tmp_path, push)
        try:
            await engine.add(admin, "q", ["secret"])
            with pytest.raises(errors.PermissionDenied):
                await asyncio.wait_for(pushing, 5)
            assert await engine.counts(admin, "q") == (1, 0)
        finally:
            await subscriptions[0].close()

    run(tmp_path, scenario)


def test_no_password_hash_in_the_repr_of_permissions_or_sessions() -> None:
    """Both carry the user's password hash (to end sessions when it changes); a log line
    or a traceback showing either must not show the hash."""
    hashed = PasswordHasher.from_settings(FAST_AUTH).hash("pw")
    assert hashed not in repr(Permissions(credential=hashed))
    assert hashed not in repr(Session(1, "bob", 0.0, hashed))
