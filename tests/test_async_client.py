"""The asyncio client against a real server: every method through real ``grpc.aio``
channels, sessions, leases, subscriptions and cancellation.

Each test is a coroutine run by ``asyncio.run`` (bounded by ``BOUND``): no plugin, and
a hang fails the test instead of stalling the run. Waits are on events (a long poll
parked in the server, a renewal, a loss), each bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from client_fixtures import (
    ADMIN,
    LossRecorder,
    ScriptedServicer,
    add_user,
    raw_stub,
    scripted_server,
    server_fingerprint,
)
from test_client_unavailable import Outage, parked
from test_permissions import user_command

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import (
    AddedIds,
    AsyncMessage,
    AsyncQueueManagerClient,
    ClientClosed,
    FingerprintMismatch,
    InvalidArgument,
    KeyNotFound,
    LeaseLost,
    MapNotFound,
    MessageNotFound,
    MessageReleased,
    PermissionDenied,
    QMError,
    QueueAlreadyExists,
    QueueNotEmpty,
    QueueNotFound,
    QueueSettings,
    QueueSummary,
    SessionLoss,
    SessionNotFound,
    SessionStatus,
    SessionSummary,
    Unauthenticated,
    Unavailable,
)
from qm_server.config import TlsSettings

BOUND = 60.0  # seconds a whole test may take before it fails
WAIT = 15.0  # seconds one awaited event may take


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND):
            await body()

    asyncio.run(bounded())


def aconnect(server: ServerHandle, **kwargs: Any) -> AsyncQueueManagerClient:
    """A client of ``server``'s admin; logs in on ``async with``."""
    return AsyncQueueManagerClient(server.target, ADMIN, server.admin_password, **kwargs)


async def waited(event: Any) -> bool:
    """Wait for a ``threading.Event`` set by the server or a callback, off the loop."""
    return bool(await asyncio.to_thread(event.wait, WAIT))


def task_names() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if not t.done())


# -- login and lifecycle -------------------------------------------------------------------


def test_login_gives_a_session_the_server_accepts_and_close_logs_out(
    server: ServerHandle,
) -> None:
    async def body() -> None:
        qm = aconnect(server)
        with pytest.raises(ClientClosed):
            await qm.size("jobs")  # not logged in yet
        async with qm:
            token = qm.token
            with raw_stub(server) as stub:
                assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
            assert f"qm-heartbeat-{ADMIN}@{server.target}" in task_names()
        assert not [n for n in task_names() if n.startswith("qm-")]
        await qm.close()  # a second close is a no-op
        with raw_stub(server) as stub:
            assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_UNAUTHENTICATED
        with pytest.raises(ClientClosed):
            await qm.size("jobs")
        with pytest.raises(ClientClosed):
            await qm.login()

    run(body)


def test_wrong_password_and_wrong_pin_fail_the_login(server: ServerHandle) -> None:
    async def body() -> None:
        with pytest.raises(Unauthenticated) as caught:
            await AsyncQueueManagerClient.connect(server.target, ADMIN, "wrong")
        assert caught.value.code == pb.CODE_UNAUTHENTICATED
        with pytest.raises(FingerprintMismatch):
            async with aconnect(server, pin_fingerprint="00" * 32):
                pass
        pin = server_fingerprint(server).upper()
        async with aconnect(server, pin_fingerprint=pin) as qm:
            with pytest.raises(QueueNotFound):  # logged in: the server answers
                await qm.is_empty("nope")
        assert not [n for n in task_names() if n.startswith("qm-")]

    run(body)


def test_close_releases_held_messages_and_without_logout_keeps_the_session(
    server: ServerHandle,
) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
            await qm.add_all("jobs", ["a", "b"])
            async with aconnect(server) as holder:
                held = await holder.pull("jobs", 2)
                assert [m.element for m in held] == ["a", "b"]
                assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 2)
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (2, 0)
            kept = await AsyncQueueManagerClient.connect(
                server.target, ADMIN, server.admin_password
            )
            token = kept.token
            await kept.close(logout=False)
            with raw_stub(server) as stub:
                assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
                assert stub.Logout(pb.LogoutRequest(token=token)).code == pb.CODE_OK

    run(body)


def test_mutual_tls_with_the_given_roots_and_client_certificate(
    make_server: Callable[..., ServerHandle], pki: dict[str, Path]
) -> None:
    server = make_server(
        tls=TlsSettings(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    )
    target = f"localhost:{server.port}"
    ca = pki["ca"].read_bytes()
    chain, key = pki["client_cert"].read_bytes(), pki["client_key"].read_bytes()

    async def body() -> None:
        with pytest.raises(Unavailable):  # no client certificate: refused
            await AsyncQueueManagerClient.connect(
                target, ADMIN, server.admin_password, root_certificates=ca, timeout=5
            )
        with pytest.raises(Unavailable):  # plaintext to a TLS server
            await AsyncQueueManagerClient.connect(target, ADMIN, server.admin_password, timeout=5)
        async with AsyncQueueManagerClient(
            target,
            ADMIN,
            server.admin_password,
            root_certificates=ca,
            certificate_chain=chain,
            private_key=key,
        ) as qm:
            await qm.map("m").put("k", "v")
            assert await qm.map("m").get("k") == "v"

    run(body)


# -- sessions: heartbeat, expiry, re-login ---------------------------------------------------


def test_heartbeat_task_keeps_an_idle_session_alive_beyond_its_ttl(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server(session_ttl_s=2.0)
    lost = LossRecorder()

    async def body() -> None:
        async with aconnect(server, on_session_lost=lost) as holder, aconnect(server) as other:
            await holder.new_queue("jobs")
            await holder.add("jobs", "x")
            message = await holder.poll("jobs")
            assert message is not None
            token = holder.token
            # `other` waits 2.5 ttls: it would get the message once the session expired.
            assert await other.poll("jobs", wait=5.0) is None
            await message.ack()
            assert holder.token == token
            assert lost.losses == []
            assert (await other.size("jobs"), await other.unacked("jobs")) == (0, 0)

    run(body)


def test_relogin_after_expiry_reports_the_released_messages(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server(session_ttl_s=1.0)
    lost = LossRecorder()

    async def body() -> None:
        async with (
            aconnect(server, heartbeat=False, on_session_lost=lost) as idle,
            aconnect(server) as other,
        ):
            await idle.new_queue("jobs")
            await idle.add("jobs", "x")
            held = await idle.poll("jobs")
            assert held is not None
            old_token = idle.token
            redelivered = await other.poll("jobs", wait=10)
            assert redelivered is not None
            assert (redelivered.message_id, redelivered.delivery_count) == (held.message_id, 2)
            assert await idle.size("jobs") == 0  # logs in again by itself
            assert idle.token != old_token
            assert [loss.released for loss in lost.losses] == [(held,)]
            assert lost.losses[0].generation == 2
            with pytest.raises(MessageReleased):
                await held.ack()
            assert await other.unacked("jobs") == 1
            await redelivered.ack()
            assert await other.unacked("jobs") == 0

    run(body)


def test_heartbeat_notices_a_lost_session_and_an_ack_of_it_is_refused(
    server: ServerHandle,
) -> None:
    lost = LossRecorder()

    async def body() -> None:
        async with aconnect(server, on_session_lost=lost) as qm:
            await qm.new_queue("jobs")
            await qm.add("jobs", "x")
            held = await qm.poll("jobs")
            assert held is not None
            old_token = qm.token
            with raw_stub(server) as stub:
                assert stub.Logout(pb.LogoutRequest(token=old_token)).code == pb.CODE_OK
            assert await waited(lost.called)  # no call from the test: the heartbeat's
            assert lost.losses[0].released == (held,)
            assert qm.token != old_token
            with pytest.raises(MessageReleased):
                await held.nack()
            again = await qm.poll("jobs")
            assert again is not None
            assert (again.message_id, again.delivery_count) == (held.message_id, 2)
            await again.ack()

    run(body)


def test_on_session_lost_may_close_the_client(server: ServerHandle) -> None:
    """The callback runs in the heartbeat task; a close it starts must not wait for that
    task to end while the task waits for the callback."""

    async def body() -> None:
        closed = asyncio.Event()
        closing: list[asyncio.Task[None]] = []
        qm: AsyncQueueManagerClient | None = None

        def give_up(loss: SessionLoss) -> None:
            assert qm is not None
            task = asyncio.get_running_loop().create_task(qm.close())
            task.add_done_callback(lambda _: closed.set())
            closing.append(task)

        qm = aconnect(server, on_session_lost=give_up)
        await qm.login()
        with raw_stub(server) as stub:
            assert stub.Logout(pb.LogoutRequest(token=qm.token)).code == pb.CODE_OK
        async with asyncio.timeout(WAIT):  # the heartbeat notices within a third of the ttl
            await closed.wait()
        await closing[0]
        assert not [n for n in task_names() if n.startswith("qm-")]
        with pytest.raises(ClientClosed):
            await qm.size("jobs")

    run(body)


def test_heartbeat_status_list_sessions_and_end_session(server: ServerHandle) -> None:
    add_user(server, "bob", "bob-pw")
    user_command(server.data_dir, "grant", "bob", "read", "queue", "*")
    lost = LossRecorder()

    async def body() -> None:
        async with (
            aconnect(server) as qm,
            AsyncQueueManagerClient(
                server.target, "bob", "bob-pw", heartbeat=False, on_session_lost=lost
            ) as consumer,
        ):
            await qm.new_queue("jobs")
            await qm.add_all("jobs", ["a", "b", "c"])
            assert qm.server_limits.max_batch > 0
            status = await consumer.heartbeat()
            assert status == SessionStatus(
                session_id=status.session_id,
                expires_in_ms=round(consumer.session_ttl * 1000),
                messages_held=0,
                subscriptions=0,
            )
            [held] = await consumer.pull("jobs", 1)
            assert (await consumer.heartbeat()).messages_held == 1
            everyone = [s async for s in qm.list_sessions(page_size=1)]
            mine = (await qm.heartbeat()).session_id
            assert sorted(s.session_id for s in everyone) == sorted([mine, status.session_id])
            [summary] = [s async for s in qm.list_sessions(username="bob")]
            assert isinstance(summary, SessionSummary)
            assert (summary.session_id, summary.messages_held) == (status.session_id, 1)
            with pytest.raises(PermissionDenied):
                [s async for s in consumer.list_sessions()]
            with pytest.raises(PermissionDenied):
                await consumer.end_session(mine)
            await qm.end_session(status.session_id)
            assert await qm.size("jobs") == 3  # its message is ready again
            with pytest.raises(SessionNotFound):
                await qm.end_session(status.session_id)
            assert (await consumer.heartbeat()).session_id != status.session_id
            assert lost.losses[0].released == (held,)

    run(body)


# -- queues ----------------------------------------------------------------------------------


def test_queue_admin_round_trip(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs.dead")
            settings = QueueSettings(max_deliveries=1, dead_letter_queue="jobs.dead")
            await qm.new_queue("jobs", settings)
            await qm.new_queue("jobs", exist_ok=True)
            with pytest.raises(QueueAlreadyExists) as exists:
                await qm.new_queue("jobs")
            assert exists.value.code == pb.CODE_QUEUE_ALREADY_EXISTS
            updated = await qm.update_queue("jobs", QueueSettings(max_length=10))
            assert (updated.max_deliveries, updated.max_length) == (1, 10)
            info = await qm.queue_info("jobs")
            assert (info.settings.max_length, info.ready, info.in_flight) == (10, 0, 0)

            ids = await qm.add_all("jobs", ["x", "y", "z"])
            for message in await qm.pull("jobs", 3):
                await message.nack()  # dead-lettered at the first nack
            letters = [d async for d in qm.dead_letters("jobs.dead", page_size=2)]
            assert [(d.message_id, d.element, d.original_queue) for d in letters] == [
                (ids[0], "x", "jobs"),
                (ids[1], "y", "jobs"),
                (ids[2], "z", "jobs"),
            ]
            result = await qm.redrive("jobs.dead", [ids[1], 999_999])
            assert result.moved == 1
            assert isinstance(result.failed[999_999], MessageNotFound)
            assert (await qm.redrive("jobs.dead")).moved == 2
            assert [d async for d in qm.dead_letters("jobs.dead")] == []
            await qm.add("jobs", "later", delay=3600)
            assert await qm.purge("jobs") == 4
            listed = [q async for q in qm.list_queues(page_size=1)]
            assert listed == [
                QueueSummary(name="jobs", ready=0, in_flight=0, delayed=0),
                QueueSummary(name="jobs.dead", ready=0, in_flight=0, delayed=0),
            ]
            await qm.add("jobs", "a")
            with pytest.raises(QueueNotEmpty):
                await qm.destroy_queue("jobs")
            await qm.destroy_queue("jobs", force=True)
            with pytest.raises(QueueNotFound):
                await qm.size("jobs")

    run(body)


def test_adds_polls_acks_and_nacks(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
            first = await qm.add("jobs", "a")
            batch = await qm.add_all("jobs", ["b", "c"])
            assert list(batch) == [first + 1, first + 2]
            assert (await qm.size("jobs"), await qm.is_empty("jobs")) == (3, False)
            message = await qm.poll("jobs")
            assert isinstance(message, AsyncMessage)
            assert (message.element, message.message_id, message.delivery_count) == ("a", first, 1)
            await message.nack()  # back at its original place
            again = await qm.poll("jobs")
            assert again is not None and (again.message_id, again.delivery_count) == (first, 2)
            await qm.ack(again)
            with pytest.raises(MessageNotFound):
                await again.ack()
            pulled = await qm.pull("jobs", 5)
            assert [m.element for m in pulled] == ["b", "c"]
            await pulled[0].ack()
            assert await qm.ack_many(pulled) == [pulled[0]]
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 0)
            assert await qm.poll("jobs") is None
            assert await qm.pull("jobs", 2) == []
            await qm.add_all("jobs", ["d", "e"])
            assert await qm.ack_many(await qm.pull("jobs", 2), nack=True) == []
            assert [m.delivery_count for m in await qm.pull("jobs", 2)] == [2, 2]

    run(body)


def test_request_ids_replay_and_idempotent_adds(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
            first = await qm.add_all("jobs", ["a", "b"], request_id="batch-1")
            assert isinstance(first, AddedIds)
            assert (first.replayed, first.request_id) == (False, "batch-1")
            again = await qm.add_all("jobs", ["a", "b"], request_id="batch-1")
            assert (list(again), again.replayed) == (list(first), True)
            one = await qm.add("jobs", "c", request_id="one-1")
            assert await qm.add("jobs", "c", request_id="one-1") == one
            made_up = await qm.add_all("jobs", ["d"], idempotent=True)
            assert made_up.request_id and not made_up.replayed
            assert await qm.size("jobs") == 4
            with pytest.raises(InvalidArgument):
                await qm.add_all("jobs", ["other"], request_id="batch-1")

    run(body)


def test_answers_unavailable_are_repeated_by_the_same_rules(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server, heartbeat=False) as qm:
            await qm.new_queue("q")
            outage = Outage(server)
            outage.recover_at("enqueue", 3)
            with pytest.raises(Unavailable) as caught:
                await qm.add("q", "a")  # no request id: not repeated
            assert caught.value.code == pb.CODE_UNAVAILABLE
            assert outage.attempts["enqueue"] == 1
            first = await qm.add("q", "a", request_id="add-1")
            assert outage.attempts["enqueue"] == 3
            assert await qm.add("q", "a", request_id="add-1") == first
            assert await qm.size("q") == 1
            outage.recover_at("map_put", 2)
            await qm.map("m").put("k", "v")
            assert outage.attempts["map_put"] == 2

    run(body)


def test_an_add_with_a_request_id_is_repeated_after_an_unavailable_status() -> None:
    servicer = ScriptedServicer()  # type: ignore[abstract]

    async def body(target: str) -> None:
        async with AsyncQueueManagerClient(target, "u", "p") as client:
            servicer.failures["Add"] = 2
            assert await client.add("jobs", "a", request_id="r") == 1
            assert servicer.attempts["Add"] == 3
            servicer.failures["Add"] = 1
            with pytest.raises(Unavailable):
                await client.add("jobs", "a")
            assert servicer.attempts["Add"] == 4

    with scripted_server(servicer) as target:
        run(lambda: body(target))


def test_a_user_without_grants_is_permission_denied(server: ServerHandle) -> None:
    add_user(server, "bob", "bob-secret")

    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
        async with AsyncQueueManagerClient(server.target, "bob", "bob-secret") as bob:
            with pytest.raises(PermissionDenied) as caught:
                await bob.add("jobs", "x")
            assert caught.value.code == pb.CODE_PERMISSION_DENIED

    run(body)


# -- cancellation ------------------------------------------------------------------------------


def test_cancelling_a_waiting_poll_leaves_nothing_stuck(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
            waiting = parked(server)
            poll = asyncio.create_task(qm.poll("jobs", wait=20))
            assert await waited(waiting)  # the long poll waits in the server
            poll.cancel()
            with pytest.raises(asyncio.CancelledError):
                await poll
            # The cancelled poll took nothing: the next message goes to the next poll, as
            # its first delivery, and nothing else is in flight.
            added = await qm.add("jobs", "x")
            message = await qm.poll("jobs", wait=5)
            assert message is not None
            assert (message.message_id, message.delivery_count) == (added, 1)
            assert await qm.unacked("jobs") == 1
            await message.ack()
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 0)

    run(body)


def test_a_long_poll_cut_short_by_the_drain_raises_unavailable(server: ServerHandle) -> None:
    """A worker loop that stops when poll returns None must not stop because the server
    restarts: poll raises Unavailable instead."""

    async def body() -> None:
        async with aconnect(server, heartbeat=False) as qm:
            await qm.new_queue("jobs")
            waiting = parked(server)
            poll = asyncio.create_task(qm.poll("jobs", wait=20))
            assert await waited(waiting)
            await asyncio.to_thread(server.stop)
            with pytest.raises(Unavailable):
                await poll

    run(body)


# -- leases ------------------------------------------------------------------------------------


def test_extend_lease_answers_a_result_per_message(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
            await qm.add_all("jobs", ["a", "b"])
            first, second = await qm.pull("jobs", 2, ack_deadline=2)
            results = await qm.extend_lease([first, second.message_id, 999_999], 60)
            assert [r.message_id for r in results] == [
                first.message_id,
                second.message_id,
                999_999,
            ]
            assert results[0].ok and results[1].ok
            soon = datetime.now(UTC) + timedelta(seconds=60)
            for result in results[:2]:
                assert result.lease_expires_at is not None
                assert abs(result.lease_expires_at - soon) < timedelta(seconds=10)
            assert isinstance(results[2].error, MessageNotFound)
            (given_back,) = await qm.extend_lease([second], 0)
            assert given_back.ok and given_back.lease_expires_at is None
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (1, 1)
            await first.ack()

    run(body)


def test_the_lease_keeper_extends_while_a_handler_awaits(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm, aconnect(server) as other:
            await qm.new_queue("jobs")
            await qm.add("jobs", "work")
            message = await qm.poll("jobs", ack_deadline=1)
            assert message is not None and message.lease_expires_at is not None

            async def handler(m: AsyncMessage) -> str:
                async with qm.keep_lease(m) as guard:
                    # Three renewals of a 1 s lease: well past the first deadline.
                    assert await guard.wait_renewed(3, WAIT)
                    assert guard.expires_at is not None
                    assert guard.expires_at > message.lease_expires_at  # type: ignore[operator]
                # Another consumer waits 2 leases meanwhile and gets nothing.
                assert await other.poll("jobs", wait=2.0) is None
                return m.element

            assert await qm.handle(message, handler) == "work"
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 0)

    run(body)


def test_a_handler_past_max_lease_loses_its_lease(server: ServerHandle) -> None:
    lost: list[tuple[AsyncMessage, QMError | None]] = []

    async def body() -> None:
        async with (
            aconnect(server, on_lease_lost=lambda m, e: lost.append((m, e))) as qm,
            aconnect(server) as other,
        ):
            await qm.new_queue("jobs")
            await qm.add("jobs", "slow")
            message = await qm.poll("jobs", ack_deadline=1)
            assert message is not None

            async def hung(m: AsyncMessage) -> None:
                again = await other.poll("jobs", wait=WAIT)  # released to another
                assert again is not None and again.delivery_count == 2
                await again.ack()

            with pytest.raises(LeaseLost):
                await qm.handle(message, hung, max_lease=1.5)
            assert lost == [(message, None)]
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 0)

    run(body)


# -- subscriptions -----------------------------------------------------------------------------


def test_subscribe_is_an_async_iterator_with_acks_on_the_stream(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            await qm.new_queue("jobs")
            ids = await qm.add_all("jobs", ["a", "b", "c"])
            seen: list[tuple[str, int]] = []
            async with qm.subscribe("jobs", max_unacked=2) as subscription:
                async for message in subscription:
                    seen.append((message.element, message.delivery_count))
                    if (message.element, message.delivery_count) == ("b", 1):
                        await message.nack()
                    else:
                        await message.ack()
                    if len(seen) == 4:
                        break
            assert seen == [("a", 1), ("b", 1), ("c", 1), ("b", 2)]
            assert subscription.failed_acks == []
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 0)
            assert len(ids) == 3

    run(body)


def test_closing_the_client_ends_an_open_subscription(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as other:
            await other.new_queue("jobs")
            qm = await AsyncQueueManagerClient.connect(server.target, ADMIN, server.admin_password)
            await qm.add("jobs", "held")
            received: list[str] = []
            first = asyncio.Event()

            async def consume() -> None:
                async for message in qm.subscribe("jobs", max_unacked=4):
                    received.append(message.element)  # held, never acked
                    first.set()

            consumer = asyncio.create_task(consume())
            async with asyncio.timeout(WAIT):
                await first.wait()
            await qm.close()
            async with asyncio.timeout(WAIT):
                await consumer  # the async for ends; no error
            assert received == ["held"]
            # The held message went back at once with the stream and the session.
            assert (await other.size("jobs"), await other.unacked("jobs")) == (1, 0)
            with pytest.raises(ClientClosed):
                qm.subscribe("jobs")

    run(body)


def test_a_subscription_resumes_after_its_session_ends(server: ServerHandle) -> None:
    lost = LossRecorder()

    async def body() -> None:
        async with aconnect(server, heartbeat=False, on_session_lost=lost) as qm:
            await qm.new_queue("jobs")
            await qm.add("jobs", "a")
            async with qm.subscribe("jobs") as subscription:
                iterator = aiter(subscription)
                first = await anext(iterator)
                with raw_stub(server) as stub:
                    assert stub.Logout(pb.LogoutRequest(token=qm.token)).code == pb.CODE_OK
                again = await anext(iterator)  # released, delivered again on a new stream
                assert (again.message_id, again.delivery_count) == (first.message_id, 2)
                assert [loss.released for loss in lost.losses] == [(first,)]
                with pytest.raises(MessageReleased):
                    await first.ack()
                await again.ack()
            assert (await qm.size("jobs"), await qm.unacked("jobs")) == (0, 0)

    run(body)


# -- maps --------------------------------------------------------------------------------------


def test_maps(server: ServerHandle) -> None:
    async def body() -> None:
        async with aconnect(server) as qm:
            m = qm.map("config", page_size=2)
            assert repr(m) == "AsyncQMap('config')"
            assert await m.exists() is False
            with pytest.raises(MapNotFound):
                await m.get_all()
            await m.put("b", "2")
            await m.put("a", "1")
            assert await m.exists() is True
            assert await m.get("a") == "1"
            assert await m.get("zzz", None) is None
            with pytest.raises(KeyNotFound) as caught:
                await m.get("zzz")
            assert caught.value.code == pb.CODE_KEY_NOT_FOUND
            assert (await m.contains("a"), await m.contains("zzz")) == (True, False)
            await m.put_all({f"k{i}": str(i) for i in range(3)})
            await m.put_all({})  # nothing to set: no call
            assert [k async for k in m] == ["a", "b", "k0", "k1", "k2"]
            assert await m.size() == 5
            assert await m.get_all() == {"a": "1", "b": "2", "k0": "0", "k1": "1", "k2": "2"}
            assert await m.page(1, 2) == [("b", "2"), ("k0", "0")]
            assert await m.page(5) == []
            assert await m.page_after(None, 2) == ([("a", "1"), ("b", "2")], "b")
            assert await m.page_after("k1") == ([("k2", "2")], None)
            assert [kv async for kv in m.items()][:1] == [("a", "1")]
            await m.remove("a")
            with pytest.raises(KeyNotFound):
                await m.remove("a")
            assert [name async for name in qm.list_maps()] == ["config"]
            await m.clear()
            assert (await m.size(), await m.exists()) == (0, True)
            await m.destroy()
            assert await m.exists() is False
            with pytest.raises(MapNotFound):
                await m.destroy()

    run(body)
