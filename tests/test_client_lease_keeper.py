"""The lease keeper: it keeps a message's lease alive while its handler runs, and reports a
lost lease (never swallows it), against a real server whose leases really run out.

Leases here are 1 s, the shortest the server allows, so that a test outlives one; what the
tests wait for are events (renewals, a loss, a redelivery by long poll), each bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
from client_fixtures import ScriptedServicer, connect, scripted_server

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import (
    LeaseExpired,
    LeaseLost,
    Message,
    MessageNotFound,
    QMError,
    QueueManagerClient,
    QueueSettings,
)

BOUND = 15.0  # seconds any awaited event may take before the test fails


class LostLeases:
    """An ``on_lease_lost`` callback whose calls a test can wait for."""

    def __init__(self) -> None:
        self.calls: list[tuple[Message, QMError | None]] = []
        self.called = threading.Event()

    def __call__(self, message: Message, cause: QMError | None) -> None:
        self.calls.append((message, cause))
        self.called.set()


@pytest.fixture
def lost() -> LostLeases:
    return LostLeases()


@pytest.fixture
def qm(server: ServerHandle, lost: LostLeases) -> Iterator[QueueManagerClient]:
    with connect(server, on_lease_lost=lost) as client:
        client.new_queue("jobs")
        yield client


@pytest.fixture
def other(server: ServerHandle) -> Iterator[QueueManagerClient]:
    """Another consumer, which would get the message if its lease ran out."""
    with connect(server) as client:
        yield client


def keeper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qm-lease-keeper-")]


def lease_end(message: Message) -> datetime:
    assert message.lease_expires_at is not None
    return message.lease_expires_at


def take(qm: QueueManagerClient, element: str = "work") -> Message:
    qm.add("jobs", element)
    message = qm.poll("jobs", ack_deadline=1)
    assert message is not None and message.lease_expires_at is not None
    return message


def test_a_kept_lease_outlives_its_deadline_while_the_handler_runs(
    qm: QueueManagerClient, other: QueueManagerClient, lost: LostLeases
) -> None:
    message = take(qm)
    with qm.keep_lease(message) as guard:
        # Four renewals at about a third of the 1 s lease each take the handler past the
        # lease it was delivered with.
        assert guard.wait_renewed(4, BOUND)
        assert datetime.now(UTC) > lease_end(message)
        assert guard.expires_at is not None and guard.expires_at > datetime.now(UTC)
        assert other.poll("jobs") is None  # still ours: not delivered again
        assert qm.unacked("jobs") == 1
        message.ack()
    assert not guard.lost and lost.calls == []
    assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


def test_the_keeper_is_one_named_thread_that_stops_on_close(server: ServerHandle) -> None:
    with connect(server) as qm:
        qm.new_queue("jobs")
        assert keeper_threads() == []  # started on first use only
        first, second = take(qm, "a"), take(qm, "b")
        with qm.keep_lease(first) as one, qm.keep_lease(second) as two:
            assert one.wait_renewed(1, BOUND) and two.wait_renewed(1, BOUND)
            (thread,) = keeper_threads()
            assert thread.daemon
            assert thread.name == f"qm-lease-keeper-admin@{server.target}"
    assert keeper_threads() == []


def test_reaching_max_lease_is_reported_and_the_ack_raises_lease_lost(
    qm: QueueManagerClient, other: QueueManagerClient, lost: LostLeases
) -> None:
    message = take(qm)
    with qm.keep_lease(message, max_lease=1.5) as guard:
        assert guard.wait_lost(BOUND)
        assert guard.cause is None  # max_lease, not a refusal
        assert lost.called.is_set()
        assert lost.calls == [(message, None)]
        with pytest.raises(LeaseLost) as caught:
            message.ack()
    assert caught.value.cause is None
    assert isinstance(caught.value, LeaseExpired)
    assert "max_lease" in str(caught.value)
    # Not extended any further: the message goes to another consumer.
    again = other.poll("jobs", wait=BOUND)
    assert again is not None
    assert (again.message_id, again.delivery_count) == (message.message_id, 2)
    again.ack()


def test_a_refused_extension_is_reported_with_its_cause(
    qm: QueueManagerClient, other: QueueManagerClient, lost: LostLeases
) -> None:
    message = take(qm)
    again = other.poll("jobs", wait=BOUND)  # the lease ran out before it was kept
    assert again is not None and again.message_id == message.message_id
    with qm.keep_lease(message) as guard:
        assert guard.wait_lost(BOUND)
    assert isinstance(guard.cause, MessageNotFound)  # LEASE_EXPIRED, or not found at all
    assert lost.calls == [(message, guard.cause)]
    with pytest.raises(LeaseLost) as caught:
        message.nack()
    assert caught.value.cause is guard.cause


def test_without_a_callback_a_lost_lease_is_logged(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(server) as qm:
        qm.new_queue("jobs")
        message = take(qm)
        with qm.keep_lease(message, max_lease=1.0) as guard:
            assert guard.wait_lost(BOUND)
        assert any(
            f"lease of message {message.message_id} of jobs lost" in r.getMessage()
            for r in caplog.records
        )
        with pytest.raises(LeaseLost):
            message.ack()


def test_a_message_without_a_lease_needs_no_keeping(server: ServerHandle) -> None:
    with connect(server) as qm:
        qm.new_queue("jobs")
        qm.add("jobs", "a")
        message = qm.poll("jobs")
        assert message is not None and message.lease_expires_at is None
        with qm.keep_lease(message) as guard:
            assert not guard.lost and guard.expires_at is None
        assert keeper_threads() == []
        message.ack()


def test_handle_acks_on_return_and_nacks_on_error(qm: QueueManagerClient) -> None:
    qm.add_all("jobs", ["fine", "broken"])
    fine = qm.poll("jobs", ack_deadline=1)
    assert fine is not None
    assert qm.handle(fine, lambda m: m.element.upper()) == "FINE"
    broken = qm.poll("jobs", ack_deadline=1)
    assert broken is not None

    def fail(message: Message) -> None:
        raise RuntimeError(f"cannot do {message.element}")

    with pytest.raises(RuntimeError):
        qm.handle(broken, fail)
    again = qm.poll("jobs")
    assert again is not None
    assert (again.element, again.delivery_count) == ("broken", 2)


def test_handle_raises_lease_lost_when_the_handler_outran_max_lease(
    qm: QueueManagerClient, lost: LostLeases
) -> None:
    message = take(qm)

    def slow(m: Message) -> str:
        assert lost.called.wait(BOUND)  # "works" until the keeper gives the lease up
        return "done"

    with pytest.raises(LeaseLost):
        qm.handle(message, slow, max_lease=1.0)


def test_leases_of_a_subscription_are_kept_and_acked_on_its_stream(
    qm: QueueManagerClient, other: QueueManagerClient
) -> None:
    qm.add("jobs", "streamed")
    with qm.subscribe("jobs", ack_deadline=1) as subscription:
        message = next(subscription)
        with qm.keep_lease(message) as guard:
            assert guard.wait_renewed(4, BOUND)
            assert other.poll("jobs") is None
            message.ack()
    assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


def test_a_queue_with_an_ack_deadline_is_kept_at_its_own_lease(qm: QueueManagerClient) -> None:
    qm.new_queue("timed", QueueSettings(ack_deadline_ms=1_000))
    qm.add("timed", "a")
    message = qm.poll("timed")
    assert message is not None and message.lease_expires_at is not None
    with qm.keep_lease(message) as guard:
        assert guard.wait_renewed(4, BOUND)
        message.ack()
    assert qm.unacked("timed") == 0


class LeasingServicer(ScriptedServicer):
    """Delivers messages with the lease asked for, and extends them; ExtendLease fails
    with gRPC UNAVAILABLE ``failures["ExtendLease"]`` times first."""

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: list[int] = []

    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollResponse:
        now = round(time.time() * 1000)
        return pb.PollResponse(
            element="e",
            message_id=self.attempts["Poll"] + 1,
            delivery_count=1,
            enqueued_at_ms=now,
            lease_expires_at_ms=now + request.ack_deadline_ms,
        )

    def ExtendLease(
        self, request: pb.ExtendLeaseRequest, context: grpc.ServicerContext
    ) -> pb.ExtendLeaseResponse:
        self._attempt("ExtendLease", context)
        self.deadlines.append(request.ack_deadline_ms)
        end = round(time.time() * 1000) + request.ack_deadline_ms
        return pb.ExtendLeaseResponse(
            results=[
                pb.LeaseResult(message_id=i, code=pb.CODE_OK, lease_expires_at_ms=end)
                for i in request.message_ids
            ]
        )


def test_a_failed_extension_call_loses_nothing_and_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = LeasingServicer()  # type: ignore[abstract]
    lost = LostLeases()
    with (
        scripted_server(servicer) as target,
        QueueManagerClient(target, "u", "p", heartbeat=False, on_lease_lost=lost) as qm,
    ):
        message = qm.poll("jobs", ack_deadline=1)
        assert message is not None
        servicer.failures["ExtendLease"] = 2
        with qm.keep_lease(message) as guard:
            assert guard.wait_renewed(2, BOUND)
        assert not guard.lost and lost.calls == []
        assert servicer.attempts["ExtendLease"] >= 4  # two failures, then renewals
        # Renewed with the lease it was delivered with.
        assert set(servicer.deadlines) == {1000}
    failures = [r for r in caplog.records if "extending 1 lease(s) failed" in r.getMessage()]
    assert len(failures) == 2
