"""The Python client against a real server: every method, sessions, and typed errors."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from client_fixtures import (
    ADMIN,
    LossRecorder,
    add_user,
    connect,
    heartbeat_threads,
    raw_stub,
    server_fingerprint,
)

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import (
    ClientClosed,
    DeadlineExceeded,
    FingerprintMismatch,
    InvalidArgument,
    KeyNotFound,
    MapNotFound,
    Message,
    MessageNotFound,
    MessageReleased,
    PermissionDenied,
    QMError,
    QueueAlreadyExists,
    QueueManagerClient,
    QueueNotEmpty,
    QueueNotFound,
    ResourceExhausted,
    SessionLoss,
    Unauthenticated,
    Unavailable,
)
from qm_client.errors import error_for_code


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    with connect(server) as client:
        yield client


@pytest.fixture
def jobs(qm: QueueManagerClient) -> str:
    qm.new_queue("jobs")
    return "jobs"


# -- login and lifecycle -------------------------------------------------------------------


def test_login_gives_a_session_the_server_accepts(server: ServerHandle) -> None:
    with connect(server) as qm:
        assert qm.session_ttl == 30.0
        assert repr(qm) == f"QueueManagerClient({server.target!r}, user='admin')"
        with raw_stub(server) as stub:
            reply = stub.HeartBeat(pb.HeartBeatRequest(token=qm.token))
        assert reply.code == pb.CODE_OK


def test_wrong_password_is_unauthenticated_and_leaves_no_thread(server: ServerHandle) -> None:
    with pytest.raises(Unauthenticated) as caught:
        QueueManagerClient(server.target, ADMIN, "not-the-password")
    assert caught.value.code == pb.CODE_UNAUTHENTICATED
    assert caught.value.code_name == "UNAUTHENTICATED"
    assert caught.value.grpc_status is None
    assert heartbeat_threads() == []


def test_pinned_fingerprint_accepts_the_servers_key_in_any_usual_spelling(
    server: ServerHandle,
) -> None:
    fingerprint = server_fingerprint(server)
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2))
    for pin in (fingerprint, fingerprint.upper(), "sha256:" + colons):
        with connect(server, pin_fingerprint=pin) as qm:
            assert qm.token


def test_wrong_pinned_fingerprint_refuses_before_sending_the_password(
    server: ServerHandle,
) -> None:
    with pytest.raises(FingerprintMismatch) as caught:
        connect(server, pin_fingerprint="00" * 32)
    assert caught.value.code_name == "FINGERPRINT_MISMATCH"
    assert server_fingerprint(server) in caught.value.message


def test_heartbeat_thread_is_named_daemon_and_joined_on_close(server: ServerHandle) -> None:
    qm = connect(server)
    (thread,) = heartbeat_threads()
    assert thread.name == f"qm-heartbeat-{ADMIN}@{server.target}"
    assert thread.daemon
    qm.close()
    assert not thread.is_alive()
    assert heartbeat_threads() == []


def test_close_logs_out_and_further_calls_raise_client_closed(server: ServerHandle) -> None:
    qm = connect(server)
    token = qm.token
    qm.close()
    qm.close()  # a second close is a no-op
    with raw_stub(server) as stub:
        assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_UNAUTHENTICATED
    with pytest.raises(ClientClosed):
        qm.size("jobs")


def test_close_releases_held_messages(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    qm.add_all("jobs", ["a", "b"])
    with connect(server) as holder:
        held = holder.pull("jobs", 2)
        assert [m.element for m in held] == ["a", "b"]
        assert qm.unacked("jobs") == 2
        assert qm.size("jobs") == 0
    assert qm.unacked("jobs") == 0
    again = qm.pull("jobs", 2)
    assert [(m.element, m.message_id, m.delivery_count) for m in again] == [
        ("a", held[0].message_id, 2),
        ("b", held[1].message_id, 2),
    ]


def test_close_without_logout_keeps_the_session(server: ServerHandle) -> None:
    qm = connect(server)
    token = qm.token
    qm.close(logout=False)
    with raw_stub(server) as stub:
        assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
        assert stub.Logout(pb.LogoutRequest(token=token)).code == pb.CODE_OK


# -- sessions: heartbeat, expiry, re-login ---------------------------------------------------


def test_heartbeat_keeps_an_idle_session_alive_beyond_its_ttl(
    make_server: Callable[..., ServerHandle],
) -> None:
    # A ttl of 2 s rather than 1: each beat may take half a ttl, and on a loaded 2-core
    # machine a beat of the in-process server's 1 s sessions once took longer than 0.5 s.
    server = make_server(session_ttl_s=2.0)
    lost = LossRecorder()
    with connect(server, on_session_lost=lost) as holder, connect(server) as other:
        holder.new_queue("jobs")
        holder.add("jobs", "x")
        message = holder.poll("jobs")
        assert message is not None
        token = holder.token
        # `other` waits 2.5 ttls for the message: it would get it the moment the holder's
        # session expired and released it.
        assert other.poll("jobs", wait=5.0) is None
        message.ack()
        assert holder.token == token
        assert lost.losses == []
        assert other.size("jobs") == 0
        assert other.unacked("jobs") == 0


def test_relogin_after_expiry_reports_the_released_messages(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server(session_ttl_s=1.0)
    lost = LossRecorder()
    with (
        connect(server, heartbeat=False, on_session_lost=lost) as idle,
        connect(server) as other,
    ):
        idle.new_queue("jobs")
        idle.add("jobs", "x")
        held = idle.poll("jobs")
        assert held is not None
        old_token = idle.token
        # The expiry releases the message to whoever waits for it.
        redelivered = other.poll("jobs", wait=10)
        assert redelivered is not None
        assert (redelivered.message_id, redelivered.delivery_count) == (held.message_id, 2)

        assert idle.size("jobs") == 0  # logs in again by itself
        assert idle.token != old_token
        assert [loss.released for loss in lost.losses] == [(held,)]
        assert lost.losses[0].generation == 2
        with pytest.raises(MessageReleased):
            held.ack()
        # The refusal was local: the other consumer's delivery is untouched.
        assert other.unacked("jobs") == 1
        redelivered.ack()
        assert other.unacked("jobs") == 0


def test_heartbeat_notices_a_lost_session_and_logs_in_again(server: ServerHandle) -> None:
    lost = LossRecorder()
    with connect(server, on_session_lost=lost) as qm:
        qm.new_queue("jobs")
        qm.add("jobs", "x")
        held = qm.poll("jobs")
        assert held is not None
        old_token = qm.token
        with raw_stub(server) as stub:  # the session ends behind the client's back
            assert stub.Logout(pb.LogoutRequest(token=old_token)).code == pb.CODE_OK
        # No call from the test: the heartbeat finds out (within a third of the ttl).
        assert lost.called.wait(timeout=30)
        assert lost.losses[0].released == (held,)
        assert qm.token != old_token
        with pytest.raises(MessageReleased):
            held.nack()
        again = qm.poll("jobs")
        assert again is not None
        assert (again.message_id, again.delivery_count) == (held.message_id, 2)
        again.ack()


def test_on_session_lost_may_close_the_client(server: ServerHandle) -> None:
    closed = threading.Event()
    qm: QueueManagerClient | None = None

    def give_up(loss: SessionLoss) -> None:
        assert qm is not None
        qm.close()  # from the heartbeat thread: must not try to join itself
        closed.set()

    qm = connect(server, on_session_lost=give_up)
    (thread,) = heartbeat_threads()
    with raw_stub(server) as stub:
        assert stub.Logout(pb.LogoutRequest(token=qm.token)).code == pb.CODE_OK
    assert closed.wait(timeout=30)
    thread.join(timeout=30)
    assert not thread.is_alive()
    with pytest.raises(ClientClosed):
        qm.size("jobs")


def test_an_ack_whose_session_ended_is_refused_and_the_client_recovers(
    server: ServerHandle,
) -> None:
    lost = LossRecorder()
    with connect(server, heartbeat=False, on_session_lost=lost) as qm:
        qm.new_queue("jobs")
        qm.add("jobs", "x")
        held = qm.poll("jobs")
        assert held is not None
        with raw_stub(server) as stub:
            assert stub.Logout(pb.LogoutRequest(token=qm.token)).code == pb.CODE_OK
        with pytest.raises(MessageReleased):
            held.ack()  # answered UNAUTHENTICATED: log in again, but do not ack by id
        assert lost.losses[0].released == (held,)
        assert qm.size("jobs") == 1


def test_loss_without_callback_is_logged(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(server, heartbeat=False) as qm:
        with raw_stub(server) as stub:
            assert stub.Logout(pb.LogoutRequest(token=qm.token)).code == pb.CODE_OK
        with caplog.at_level("WARNING", logger="qm_client"):
            qm.new_queue("jobs")
    assert "logged in again; 0 held message(s) were released" in caplog.text


# -- queues ---------------------------------------------------------------------------------


def test_new_queue(qm: QueueManagerClient) -> None:
    qm.new_queue("a.b:c-d_9")
    with pytest.raises(QueueAlreadyExists) as caught:
        qm.new_queue("a.b:c-d_9")
    assert caught.value.code == pb.CODE_QUEUE_ALREADY_EXISTS
    qm.new_queue("a.b:c-d_9", exist_ok=True)
    assert qm.size("a.b:c-d_9") == 0


def test_add_and_add_all_return_increasing_ids(qm: QueueManagerClient, jobs: str) -> None:
    first = qm.add(jobs, "one")
    rest = qm.add_all(jobs, iter(["two", "three"]))
    assert rest == [first + 1, first + 2]
    assert qm.size(jobs) == 3
    assert qm.is_empty(jobs) is False


def test_poll_delivers_fifo_and_ack_removes(qm: QueueManagerClient, jobs: str) -> None:
    ids = qm.add_all(jobs, ["a", "b"])
    message = qm.poll(jobs)
    assert message is not None
    assert (message.element, message.message_id, message.delivery_count, message.queue) == (
        "a",
        ids[0],
        1,
        jobs,
    )
    assert (qm.size(jobs), qm.unacked(jobs)) == (1, 1)
    message.ack()
    assert (qm.size(jobs), qm.unacked(jobs)) == (1, 0)
    with pytest.raises(MessageNotFound) as caught:
        message.ack()
    assert caught.value.code == pb.CODE_MESSAGE_NOT_FOUND


def test_nack_puts_back_at_the_original_place(qm: QueueManagerClient, jobs: str) -> None:
    ids = qm.add_all(jobs, ["a", "b"])
    first = qm.poll(jobs)
    assert first is not None
    qm.nack(first)
    again = qm.poll(jobs)
    assert again is not None
    assert (again.element, again.message_id, again.delivery_count) == ("a", ids[0], 2)
    qm.ack(again)
    assert qm.size(jobs) == 1


def test_messages_are_immutable_records(qm: QueueManagerClient, jobs: str) -> None:
    qm.add(jobs, "a")
    message = qm.poll(jobs)
    assert isinstance(message, Message)
    with pytest.raises(AttributeError):
        message.element = "b"  # type: ignore[misc]
    assert repr(message) == (
        f"Message(element='a', message_id={message.message_id}, delivery_count=1, "
        f"queue='jobs', enqueued_at={message.enqueued_at!r}, lease_expires_at=None)"
    )


def test_poll_and_pull_on_an_empty_queue(qm: QueueManagerClient, jobs: str) -> None:
    assert qm.poll(jobs) is None
    assert qm.pull(jobs, 10) == []
    assert qm.is_empty(jobs) is True


def test_poll_waits_for_a_message_added_meanwhile(
    server: ServerHandle, qm: QueueManagerClient, jobs: str
) -> None:
    results: list[Message | None] = []
    waiter = threading.Thread(target=lambda: results.append(qm.poll(jobs, wait=15)))
    waiter.start()
    with connect(server) as producer:
        message_id = producer.add(jobs, "late")
    waiter.join(timeout=30)
    assert [(m.element, m.message_id) for m in results if m is not None] == [("late", message_id)]


def test_pull_takes_at_most_the_count_oldest_first(qm: QueueManagerClient, jobs: str) -> None:
    ids = qm.add_all(jobs, ["a", "b", "c"])
    batch = qm.pull(jobs, 2)
    assert [(m.element, m.message_id) for m in batch] == [("a", ids[0]), ("b", ids[1])]
    rest = qm.pull(jobs, 5, wait=1)
    assert [m.message_id for m in rest] == [ids[2]]
    assert qm.unacked(jobs) == 3


def test_ack_many_finishes_the_batch_and_returns_failures(
    server: ServerHandle, qm: QueueManagerClient, jobs: str
) -> None:
    qm.add_all(jobs, ["a", "b", "c"])
    batch = qm.pull(jobs, 3)
    batch[0].ack()
    assert qm.ack_many(batch) == [batch[0]]
    assert (qm.size(jobs), qm.unacked(jobs)) == (0, 0)
    assert qm.ack_many([]) == []

    qm.add_all(jobs, ["d", "e"])
    batch = qm.pull(jobs, 2)
    assert qm.ack_many(batch, nack=True) == []
    assert [m.delivery_count for m in qm.pull(jobs, 2)] == [2, 2]


def test_destroy_queue(qm: QueueManagerClient, jobs: str) -> None:
    qm.add(jobs, "a")
    with pytest.raises(QueueNotEmpty) as caught:
        qm.destroy_queue(jobs)
    assert caught.value.code == pb.CODE_QUEUE_NOT_EMPTY
    qm.destroy_queue(jobs, force=True)
    with pytest.raises(QueueNotFound):
        qm.size(jobs)
    qm.new_queue("empty")
    qm.destroy_queue("empty")
    with pytest.raises(QueueNotFound) as missing:
        qm.destroy_queue("empty")
    assert missing.value.code == pb.CODE_QUEUE_NOT_FOUND


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "code"),
    [
        (lambda qm: qm.add("nope", "x"), QueueNotFound, pb.CODE_QUEUE_NOT_FOUND),
        (lambda qm: qm.poll("nope"), QueueNotFound, pb.CODE_QUEUE_NOT_FOUND),
        (lambda qm: qm.pull("nope", 1), QueueNotFound, pb.CODE_QUEUE_NOT_FOUND),
        (lambda qm: qm.is_empty("nope"), QueueNotFound, pb.CODE_QUEUE_NOT_FOUND),
        (lambda qm: qm.unacked("nope"), QueueNotFound, pb.CODE_QUEUE_NOT_FOUND),
        (lambda qm: qm.new_queue("bad name"), InvalidArgument, pb.CODE_INVALID_ARGUMENT),
        (lambda qm: qm.add_all("jobs", []), InvalidArgument, pb.CODE_INVALID_ARGUMENT),
        (lambda qm: qm.pull("jobs", 0), InvalidArgument, pb.CODE_INVALID_ARGUMENT),
        (lambda qm: qm.pull("jobs", 1001), InvalidArgument, pb.CODE_INVALID_ARGUMENT),
        (lambda qm: qm.map("nope")["k"], MapNotFound, pb.CODE_MAP_NOT_FOUND),
        (lambda qm: qm.map("nope").destroy(), MapNotFound, pb.CODE_MAP_NOT_FOUND),
        (lambda qm: qm.map("nope").page(-1), InvalidArgument, pb.CODE_INVALID_ARGUMENT),
        (lambda qm: qm.map("bad name!").update(k="v"), InvalidArgument, pb.CODE_INVALID_ARGUMENT),
    ],
)
def test_codes_become_typed_errors(
    qm: QueueManagerClient,
    jobs: str,
    call: Callable[[QueueManagerClient], object],
    error: type[QMError],
    code: int,
) -> None:
    with pytest.raises(error) as caught:
        call(qm)
    assert type(caught.value) is error
    assert caught.value.code == code
    assert caught.value.code_name == pb.Code.Name(code).removeprefix("CODE_")
    assert str(caught.value).startswith(caught.value.code_name + ": ")


def test_a_user_without_grants_is_permission_denied(
    server: ServerHandle, qm: QueueManagerClient, jobs: str
) -> None:
    add_user(server, "bob", "bob-pw")
    with QueueManagerClient(server.target, "bob", "bob-pw") as bob:
        with pytest.raises(PermissionDenied) as caught:
            bob.size(jobs)
        assert caught.value.code == pb.CODE_PERMISSION_DENIED
        with pytest.raises(PermissionDenied):
            bob.map("cfg")["k"] = "v"


def test_limits_are_resource_exhausted(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(max_queues=1)
    with connect(server) as qm:
        qm.new_queue("one")
        with pytest.raises(ResourceExhausted) as caught:
            qm.new_queue("two")
    assert caught.value.code == pb.CODE_RESOURCE_EXHAUSTED


def test_transport_limit_is_resource_exhausted_with_the_grpc_status(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server(max_request_bytes=64 * 1024)
    with connect(server) as qm:
        qm.new_queue("jobs")
        with pytest.raises(ResourceExhausted) as caught:
            qm.add("jobs", "x" * 100_000)
        assert qm.size("jobs") == 0
    assert caught.value.code is None
    assert caught.value.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_is_deadline_exceeded(server: ServerHandle) -> None:
    with pytest.raises(DeadlineExceeded) as caught:
        connect(server, timeout=1e-6)
    assert caught.value.grpc_status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.code_name == "DEADLINE_EXCEEDED"


def test_unreachable_server_is_unavailable(server: ServerHandle) -> None:
    target = server.target
    server.stop()
    with pytest.raises(Unavailable) as caught:
        QueueManagerClient(target, ADMIN, "whatever", timeout=5)
    assert caught.value.grpc_status == grpc.StatusCode.UNAVAILABLE


def test_every_code_has_its_class() -> None:
    for name, number in pb.Code.items():
        if number == pb.CODE_OK:
            continue
        err = error_for_code(number, "why")
        assert err.code == number
        assert err.code_name == name.removeprefix("CODE_")
        assert type(err) is not QMError, name
    future = error_for_code(99, "new")
    assert (type(future), future.code_name, future.code) == (QMError, "CODE_99", 99)


# -- maps -----------------------------------------------------------------------------------


def test_map_is_a_mutable_mapping(qm: QueueManagerClient) -> None:
    m = qm.map("config")
    assert repr(m) == "QMap('config')"
    assert m.exists() is False
    m["b"] = "2"
    m["a"] = "1"
    assert m.exists() is True
    assert m["a"] == "1"
    assert m.get("zzz") is None
    assert m.get("zzz", "d") == "d"
    assert "a" in m
    assert "zzz" not in m
    with pytest.raises(KeyError) as caught:
        m["zzz"]
    assert isinstance(caught.value, KeyNotFound)
    assert caught.value.code == pb.CODE_KEY_NOT_FOUND
    assert len(m) == 2
    assert list(m) == ["a", "b"]
    assert list(m.items()) == [("a", "1"), ("b", "2")]
    assert list(m.values()) == ["1", "2"]
    assert ("a", "1") in m.items()
    assert ("a", "2") not in m.items()
    assert m == {"a": "1", "b": "2"}
    m["a"] = "one"
    assert m.to_dict() == {"a": "one", "b": "2"}
    del m["a"]
    with pytest.raises(KeyNotFound):
        del m["a"]
    assert m.pop("b") == "2"
    assert m.pop("b", "gone") == "gone"
    assert m.setdefault("c", "3") == "3"
    assert m.setdefault("c", "4") == "3"
    m.clear()
    assert len(m) == 0
    assert m.exists() is True  # clear keeps the (empty) map
    m.destroy()
    assert m.exists() is False
    with pytest.raises(MapNotFound):
        len(m)


def test_map_iteration_pages_in_key_order(qm: QueueManagerClient) -> None:
    m = qm.map("big", page_size=2)
    m.update({f"k{i}": str(i) for i in range(5)})
    assert list(m) == ["k0", "k1", "k2", "k3", "k4"]
    assert len(m) == 5
    assert dict(m.items()) == {f"k{i}": str(i) for i in range(5)}
    assert m.page(1, 2) == [("k1", "1"), ("k2", "2")]
    assert m.page(5) == []
    even = qm.map("even", page_size=2)
    even.update(a="1", b="2")
    assert list(even) == ["a", "b"]


def test_map_update_is_one_atomic_batch(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(max_batch=3)
    with connect(server) as qm:
        m = qm.map("m")
        m.update([("a", "1"), ("b", "2")], c="3")
        assert m.to_dict() == {"a": "1", "b": "2", "c": "3"}
        with pytest.raises(InvalidArgument):
            m.update({"a": "x", "d": "4", "e": "5", "f": "6"})
        assert m.to_dict() == {"a": "1", "b": "2", "c": "3"}
        m.update({})  # nothing to set: no call, no error
        with pytest.raises(MapNotFound):
            qm.map("untouched").to_dict()


def test_an_unexpected_heartbeat_error_is_logged_and_the_heartbeat_goes_on(
    make_server: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    """Not only QMError: a re-login against a server with a malformed key raises
    ValueError from the key parser, say. The thread must log it and keep beating."""
    server = make_server(session_ttl_s=1.0)
    with connect(server) as qm:
        call = qm._session.call
        beats: list[str] = []
        beat_again = threading.Event()

        def failing_once(method: Any, request: Any, **kwargs: Any) -> Any:
            if isinstance(request, pb.HeartBeatRequest):
                beats.append("beat")
                if len(beats) == 1:
                    raise ValueError("a malformed server key")
                beat_again.set()
            return call(method, request, **kwargs)

        qm._session.call = failing_once  # type: ignore[method-assign]
        assert beat_again.wait(10)
        (thread,) = heartbeat_threads()
        assert thread.is_alive()
    assert "a malformed server key" in caplog.text
