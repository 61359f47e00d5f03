"""Seeing inside sessions through a real server and real channels: HeartBeat's status for
its caller, ListSessions and EndSession for admins, with exact codes and values."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_client_unavailable import Outage
from test_permissions import user_command
from test_subscribe import Stream

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub
TTL_S = 20.0


@pytest.fixture
def setup(make_server: Callable[..., ServerHandle]) -> Iterator[tuple[ServerHandle, Stub, str]]:
    handle = make_server(session_ttl_s=TTL_S, max_page=50)
    user_command(handle.data_dir, "add", "bob", "--password-stdin", stdin="bob-pw\n")
    user_command(handle.data_dir, "grant", "bob", "read,write", "queue", "*")
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        admin = login(stub, "admin", handle.admin_password)
        assert stub.NewQueue(pb.NewQueueRequest(token=admin, queue_name="q")).code == pb.CODE_OK
        yield handle, stub, admin


def status(stub: Stub, token: str) -> pb.HeartBeatResponse:
    return stub.HeartBeat(pb.HeartBeatRequest(token=token))


def listing(stub: Stub, token: str, **fields: object) -> pb.ListSessionsResponse:
    fields.setdefault("limit", 50)
    return stub.ListSessions(pb.ListSessionsRequest(token=token, **fields))  # type: ignore[arg-type]


def test_heartbeat_answers_the_callers_session(setup: tuple[ServerHandle, Stub, str]) -> None:
    _, stub, admin = setup
    bob = login(stub, "bob", "bob-pw")
    stub.AddAll(pb.AddAllRequest(token=admin, queue_name="q", elements=["a", "b", "c", "d"]))
    reply = status(stub, bob)
    assert reply.code == pb.CODE_OK
    assert reply.session.expires_in_ms == int(TTL_S * 1000)
    assert (reply.session.messages_held, reply.session.subscriptions) == (0, 0)
    [mine] = [s for s in listing(stub, admin).sessions if s.username == "bob"]
    assert reply.session.session_id == mine.session_id != 0

    polled = stub.PullElements(pb.PullElementsRequest(token=bob, queue_name="q", number=2))
    assert len(polled.element_info) == 2
    stream = Stream(stub, bob, "q", max_unacked=1)
    assert len(stream.next().element_info) == 1
    reply = status(stub, bob)
    assert (reply.session.messages_held, reply.session.subscriptions) == (3, 1)
    stub.Ack(pb.AckRequest(token=bob, message_id=polled.element_info[0].message_id))
    assert status(stub, bob).session.messages_held == 2
    # Only the caller's own: the admin holds nothing.
    assert (
        status(stub, admin).session.messages_held,
        status(stub, admin).session.subscriptions,
    ) == (
        0,
        0,
    )
    stream.close()

    assert status(stub, "not-a-token").code == pb.CODE_UNAUTHENTICATED


def test_list_sessions_pages_by_id_and_filters_by_user(
    setup: tuple[ServerHandle, Stub, str],
) -> None:
    _, stub, admin = setup
    before_ms = int(time.time() * 1000)
    bobs = [login(stub, "bob", "bob-pw") for _ in range(3)]
    after_ms = int(time.time() * 1000)
    stub.AddAll(pb.AddAllRequest(token=admin, queue_name="q", elements=["a", "b"]))
    stub.PullElements(pb.PullElementsRequest(token=bobs[1], queue_name="q", number=2))

    everyone = listing(stub, admin)
    assert everyone.code == pb.CODE_OK
    assert everyone.next_start_after == 0
    ids = [s.session_id for s in everyone.sessions]
    assert ids == sorted(ids) and len(ids) == 4
    assert sorted(s.username for s in everyone.sessions) == ["admin", "bob", "bob", "bob"]
    bob_ids = [status(stub, t).session.session_id for t in bobs]
    for s in everyone.sessions:
        assert s.peer.startswith("ipv4:127.0.0.1:"), s.peer
        assert s.created_at_ms <= s.last_active_at_ms <= int(time.time() * 1000) + 1
        if s.session_id in bob_ids:
            assert before_ms <= s.created_at_ms <= after_ms
        assert s.messages_held == (2 if s.session_id == bob_ids[1] else 0)

    only_bob = listing(stub, admin, username="bob")
    assert sorted(s.session_id for s in only_bob.sessions) == sorted(bob_ids)
    assert listing(stub, admin, username="nobody").sessions == []

    # Page by page, by id, one at a time: every session once, in order.
    seen: list[int] = []
    start_after = 0
    while True:
        page = listing(stub, admin, start_after=start_after, limit=1)
        assert page.code == pb.CODE_OK
        seen += [s.session_id for s in page.sessions]
        if not page.next_start_after:
            break
        assert page.next_start_after == page.sessions[-1].session_id
        start_after = page.next_start_after
    assert seen == ids


def test_list_sessions_is_for_admins_and_checks_its_limit(
    setup: tuple[ServerHandle, Stub, str],
) -> None:
    _, stub, admin = setup
    bob = login(stub, "bob", "bob-pw")
    assert listing(stub, bob).code == pb.CODE_PERMISSION_DENIED
    assert listing(stub, admin, limit=0).code == pb.CODE_INVALID_ARGUMENT
    assert listing(stub, admin, limit=51).code == pb.CODE_INVALID_ARGUMENT
    assert listing(stub, "").code == pb.CODE_UNAUTHENTICATED


def test_end_session_ends_it_as_logout_does(setup: tuple[ServerHandle, Stub, str]) -> None:
    handle, stub, admin = setup
    bob = login(stub, "bob", "bob-pw")
    waiter = login(stub, "bob", "bob-pw")
    stub.AddAll(pb.AddAllRequest(token=admin, queue_name="q", elements=["a", "b"]))
    stream = Stream(stub, bob, "q", max_unacked=2)
    assert len(stream.next().element_info) == 2
    bob_id = status(stub, bob).session.session_id
    waiter_id = status(stub, waiter).session.session_id
    assert stub.Size(pb.SizeRequest(token=admin, queue_name="q")).size == 0

    # Only admins may end sessions, and ending one of bob's is not bob's to do either.
    denied = stub.EndSession(pb.EndSessionRequest(token=bob, session_id=waiter_id))
    assert denied.code == pb.CODE_PERMISSION_DENIED

    with ThreadPoolExecutor(1) as pool:
        parked = pool.submit(
            stub.Poll, pb.PollRequest(token=waiter, queue_name="q", wait_ms=60_000), timeout=60
        )
        # Ended while parked, not before: the server counts the poll as waiting first.
        assert handle.thread.server is not None and handle.thread.server.engine is not None
        engine = handle.thread.server.engine
        deadline = time.monotonic() + 30
        while engine.stats().waiting_polls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().waiting_polls == 1
        ended = stub.EndSession(pb.EndSessionRequest(token=admin, session_id=waiter_id))
        assert ended.code == pb.CODE_OK
        assert parked.result(timeout=30).code == pb.CODE_UNAUTHENTICATED

    assert stub.EndSession(pb.EndSessionRequest(token=admin, session_id=bob_id)).code == pb.CODE_OK
    end = stream.next()
    assert end.code == pb.CODE_UNAUTHENTICATED
    # Its messages are ready again, and its token no longer works.
    assert stub.Size(pb.SizeRequest(token=admin, queue_name="q")).size == 2
    assert status(stub, bob).code == pb.CODE_UNAUTHENTICATED
    assert [s.username for s in listing(stub, admin).sessions] == ["admin"]
    # Repeating it, or naming a session that never was, answers SESSION_NOT_FOUND.
    again = stub.EndSession(pb.EndSessionRequest(token=admin, session_id=bob_id))
    assert again.code == pb.CODE_SESSION_NOT_FOUND
    never = stub.EndSession(pb.EndSessionRequest(token=admin, session_id=12345))
    assert never.code == pb.CODE_SESSION_NOT_FOUND


def test_heartbeat_answers_while_the_store_fails(
    server: ServerHandle, stub: Stub, token: str
) -> None:
    """A failing disk must not cost sessions their heartbeat: the status is read without
    the store's writer (regression: it once waited for a commit, and failed with it)."""
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="x"))
    assert stub.Poll(pb.PollRequest(token=token, queue_name="q")).code == pb.CODE_OK
    Outage(server).writes.failing = True
    refused = stub.Add(pb.AddRequest(token=token, queue_name="q", element="y"))
    assert refused.code == pb.CODE_UNAVAILABLE  # the store is failing now
    reply = status(stub, token)
    assert (reply.code, reply.session.messages_held) == (pb.CODE_OK, 1)
