"""A database connection lost while a commit was in flight: outcome unknown, not
CODE_UNAVAILABLE (store/pg_outcome.py).

The contract: a CODE_UNAVAILABLE answer applied nothing, a gRPC UNAVAILABLE status may
have. An in-process server on a schema of its own (tests/pg_fixtures.py), its store's
connection dropped right after the database answered (tests/pg_faults.py), must answer
the status when the commit may have happened and the code when it cannot have; the
Python client must then neither add twice nor lose track of a claim.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_fixtures import connect, raw_stub
from pg_faults import LostAnswer
from pg_fixtures import pg_config

from conftest import ADMIN_PASSWORD, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client.errors import Unavailable
from qm_server.errors import COMMIT_LOST
from qm_server.store import pg_sql as sql

QUEUE = "jobs"
LEASE_S = 1  # the shortest lease a poll may ask for


@pytest.fixture
def node(make_server: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    config = pg_config(tmp_path / "db")
    handle = make_server(tmp_path / "node", store=config.store, store_schema=config.store_schema)
    with connect(handle) as client:
        client.new_queue(QUEUE)
    return handle


@pytest.fixture
def stub(node: ServerHandle) -> Iterator[tuple[pb_grpc.QueueManagerServiceStub, str]]:
    with raw_stub(node) as stub:
        yield stub, login(stub, "admin", ADMIN_PASSWORD)


def counts(stub: pb_grpc.QueueManagerServiceStub, token: str) -> tuple[int, int]:
    """(ready, in flight) of the queue."""
    size = stub.Size(pb.SizeRequest(token=token, queue_name=QUEUE))
    in_flight = stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name=QUEUE))
    assert (size.code, in_flight.code) == (pb.CODE_OK, pb.CODE_OK)
    return size.size, in_flight.ack_num


def lost(call: Callable[[], Any], says: str = COMMIT_LOST) -> grpc.RpcError:
    """The gRPC status UNAVAILABLE that `call` must end with, its message saying `says`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert says in (error.details() or "")
    return error


def test_an_add_committed_by_itself_answers_the_grpc_status_and_is_in_the_queue(
    stub: tuple[pb_grpc.QueueManagerServiceStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    qm, token = stub
    with LostAnswer((sql.ENQUEUE_PLAIN,), at="statement").installed(monkeypatch) as fault:
        lost(lambda: qm.Add(pb.AddRequest(token=token, queue_name=QUEUE, element="a")))
    assert fault.fired == 1
    assert counts(qm, token) == (1, 0)
    polled = qm.Poll(pb.PollRequest(token=token, queue_name=QUEUE))
    assert (polled.code, polled.element) == (pb.CODE_OK, "a")


def test_an_add_whose_commit_answer_was_lost_is_answered_once_more_by_its_request_id(
    stub: tuple[pb_grpc.QueueManagerServiceStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    qm, token = stub
    request = pb.AddRequest(token=token, queue_name=QUEUE, element="a", request_id="r1")
    with LostAnswer((sql.PUT_IDEMPOTENCY_KEY,), at="commit").installed(monkeypatch) as fault:
        lost(lambda: qm.Add(request))
    assert fault.fired == 1
    assert counts(qm, token) == (1, 0)
    again = qm.Add(request)
    assert (again.code, again.replayed) == (pb.CODE_OK, True)
    assert counts(qm, token) == (1, 0)


def test_a_connection_lost_before_the_commit_answers_code_unavailable_with_nothing_added(
    stub: tuple[pb_grpc.QueueManagerServiceStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    qm, token = stub
    request = pb.AddRequest(token=token, queue_name=QUEUE, element="a", request_id="r1")
    with LostAnswer((sql.ENQUEUE,), at="before commit").installed(monkeypatch) as fault:
        answer = qm.Add(request)
    assert fault.fired == 1
    assert answer.code == pb.CODE_UNAVAILABLE, answer.message
    assert "the database is unavailable" in answer.message
    assert counts(qm, token) == (0, 0)
    again = qm.Add(request)  # the key was rolled back with the message: a first add
    assert (again.code, again.replayed) == (pb.CODE_OK, False)
    assert counts(qm, token) == (1, 0)


def test_the_client_does_not_repeat_an_add_without_request_id_after_a_lost_commit(
    node: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(node) as client:
        fault = LostAnswer((sql.ENQUEUE_PLAIN,), at="statement", times=5)
        with fault.installed(monkeypatch), pytest.raises(Unavailable) as caught:
            client.add(QUEUE, "a")
        assert caught.value.grpc_status == grpc.StatusCode.UNAVAILABLE
        assert caught.value.code is None
        assert fault.fired == 1  # one attempt: the client did not repeat it
        assert (client.size(QUEUE), client.unacked(QUEUE)) == (1, 0)


def test_the_client_repeats_an_add_with_request_id_and_it_is_added_once(
    node: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(node) as client:
        with LostAnswer((sql.PUT_IDEMPOTENCY_KEY,), at="commit").installed(monkeypatch) as fault:
            message_id = client.add(QUEUE, "a", request_id="r1")
        assert fault.fired == 1
        assert client.size(QUEUE) == 1
        message = client.poll(QUEUE)
        assert message is not None
        assert (message.message_id, message.element) == (message_id, "a")


def test_a_lost_claim_stays_with_the_session_until_its_lease_runs_out(
    node: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poll is not repeated (a repeat would claim a second message, or find the queue
    empty): the caller is told the outcome is unknown. The message it may have got is in
    flight for its session, given to nobody, until its lease runs out."""
    with connect(node) as client, connect(node) as other:
        client.add(QUEUE, "a")
        fault = LostAnswer((sql.CLAIM,), at="statement")
        with fault.installed(monkeypatch), pytest.raises(Unavailable) as caught:
            client.poll(QUEUE, ack_deadline=LEASE_S)
        assert fault.fired == 1
        assert caught.value.grpc_status == grpc.StatusCode.UNAVAILABLE
        assert (client.size(QUEUE), client.unacked(QUEUE)) == (0, 1)
        assert other.poll(QUEUE) is None
        again = other.poll(QUEUE, wait=10 * LEASE_S)  # the lease runs out meanwhile
        assert again is not None
        assert (again.element, again.delivery_count) == ("a", 2)


def test_a_lost_claim_is_released_when_its_session_ends(
    node: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(node) as other:
        with connect(node) as client:
            client.add(QUEUE, "a")
            fault = LostAnswer((sql.CLAIM,), at="statement")
            with fault.installed(monkeypatch), pytest.raises(Unavailable):
                client.poll(QUEUE)  # no lease: held until the session ends
            assert fault.fired == 1
            assert other.poll(QUEUE) is None
        again = other.poll(QUEUE)  # the client logged out as it closed
        assert again is not None
        assert (again.element, again.delivery_count) == ("a", 2)


def test_a_stream_whose_nack_committed_before_its_refill_failed_ends_with_the_grpc_status(
    stub: tuple[pb_grpc.QueueManagerServiceStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nack and its refill are two commits on PostgreSQL: when the refill fails after
    the nack committed, CODE_UNAVAILABLE would say that the nack was not applied."""
    qm, token = stub
    added = qm.AddAll(pb.AddAllRequest(token=token, queue_name=QUEUE, elements=["a", "b"]))
    assert added.code == pb.CODE_OK
    requests: queue.Queue[pb.SubscribeRequest | None] = queue.Queue()
    requests.put(
        pb.SubscribeRequest(open=pb.SubscribeOpen(token=token, queue_name=QUEUE, max_unacked=1))
    )
    stream = qm.Subscribe(iter(requests.get, None), timeout=30)
    try:
        first = next(stream)
        assert [e.element for e in first.element_info] == ["a"]
        nack = pb.SubscribeAck(
            message_ids=[first.element_info[0].message_id], ack_type=pb.ACK_TYPE_ERROR
        )
        with LostAnswer((sql.CLAIM,), at="refused").installed(monkeypatch) as fault:
            requests.put(pb.SubscribeRequest(ack=nack))
            lost(lambda: list(stream), says="the acks committed, but what followed failed")
    finally:
        requests.put(None)
    assert fault.fired == 1
    assert counts(qm, token) == (2, 0)  # the nack was applied: "a" is ready again


def test_a_stream_whose_claim_was_lost_ends_with_the_grpc_status(
    stub: tuple[pb_grpc.QueueManagerServiceStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    qm, token = stub
    assert qm.Add(pb.AddRequest(token=token, queue_name=QUEUE, element="a")).code == pb.CODE_OK
    opening = pb.SubscribeRequest(
        open=pb.SubscribeOpen(
            token=token, queue_name=QUEUE, max_unacked=1, ack_deadline_ms=LEASE_S * 1000
        )
    )
    ended = threading.Event()

    def requests() -> Iterator[pb.SubscribeRequest]:
        yield opening
        ended.wait(30)  # the client's side stays open: the server ends the stream

    with LostAnswer((sql.CLAIM,), at="statement").installed(monkeypatch) as fault:
        try:
            stream = qm.Subscribe(requests(), timeout=30)
            lost(lambda: list(stream))
        finally:
            ended.set()
    assert fault.fired == 1
    assert counts(qm, token) == (0, 1)
    again = qm.Poll(pb.PollRequest(token=token, queue_name=QUEUE, wait_ms=10_000 * LEASE_S))
    assert (again.code, again.element, again.delivery_count) == (pb.CODE_OK, "a", 2)
