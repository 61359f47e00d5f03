"""Sessions live in the PostgreSQL database, so several nodes on one schema act as one:
any node accepts any live token, an end on one node reaches the others within a second
(a notification, or the recheck when notifications are off), a node paused past the TTL
acks nothing that was redelivered meanwhile and its clients are told their session ended,
a restart releases nothing, and the session limits count every node's sessions.

Each test takes a schema of its own (tests/pg_fixtures.py); the nodes are in-process
servers (tests/conftest.py) that share it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pg_fixtures import pg_config
from test_pg_cluster import Node, Stream, start_nodes, wait_until

from conftest import ADMIN_PASSWORD, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm_server.engine import Engine
from qm_server.store.pg_driver import psycopg


def engine_of(node: Node) -> tuple[Engine, asyncio.AbstractEventLoop]:
    server = node.handle.thread.server
    loop = node.handle.thread._loop
    assert server is not None and server.engine is not None and loop is not None
    return server.engine, loop


def new_queue(node: Node, token: str, name: str = "q") -> None:
    assert node.stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name)).code == 0


def test_a_token_from_one_node_works_on_another_and_acks_what_it_holds_there(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    new_queue(a, a.token)
    added = a.stub.Add(pb.AddRequest(token=a.token, queue_name="q", element="m"))
    polled = a.stub.Poll(pb.PollRequest(token=a.token, queue_name="q", wait_ms=1000))
    assert polled.message_id == added.message_id
    # Logged in on a, called on b: the same session, holding what it polled on a.
    engine, _ = engine_of(b)
    registry = engine._sessions
    finds: list[str] = []
    find = registry.find

    async def counted(token: str) -> Any:
        finds.append(token)
        return await find(token)

    registry.find = counted  # type: ignore[method-assign]
    assert b.stub.HeartBeat(pb.HeartBeatRequest(token=a.token)).code == pb.CODE_OK
    for _ in range(20):  # the hot path: known to b now, no database round trip
        assert b.stub.Size(pb.SizeRequest(token=a.token, queue_name="q")).size == 0
    assert finds == [a.token]
    acked = b.stub.Ack(pb.AckRequest(token=a.token, message_id=added.message_id))
    assert acked.code == pb.CODE_OK
    assert b.stub.Size(pb.SizeRequest(token=a.token, queue_name="q")).size == 0
    again = a.stub.Ack(pb.AckRequest(token=a.token, message_id=added.message_id))
    assert again.code == pb.CODE_MESSAGE_NOT_FOUND


def logout_ends_a_poll_elsewhere(
    make_server: Callable[..., ServerHandle], tmp_path: Path, notify: bool
) -> float:
    """Seconds from a logout on b to the end of the session's long poll parked on a."""
    a, b = start_nodes(make_server, tmp_path, store_no_notify=not notify)
    new_queue(a, a.token)
    token = login(a.stub, "admin", ADMIN_PASSWORD)
    answer: list[pb.PollResponse] = []
    at: list[float] = []

    def poll() -> None:
        answer.append(a.stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=20_000)))
        at.append(time.monotonic())

    thread = threading.Thread(target=poll)
    thread.start()
    wait_until(lambda: a.waiting() == 1)
    assert b.stub.Logout(pb.LogoutRequest(token=token)).code == pb.CODE_OK
    logged_out_at = time.monotonic()
    thread.join()
    assert answer[0].code == pb.CODE_UNAUTHENTICATED, answer[0]
    size = a.stub.Size(pb.SizeRequest(token=token, queue_name="q"))
    assert size.code == pb.CODE_UNAUTHENTICATED
    return at[0] - logged_out_at


def test_a_logout_on_one_node_ends_the_sessions_poll_on_another_at_once(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    latency = logout_ends_a_poll_elsewhere(make_server, tmp_path, notify=True)
    print(f"logout on one node to the end of a poll on another: {latency * 1000:.1f} ms")
    assert latency < 0.5, latency  # the notification, not the once-a-second recheck


def test_without_notify_the_recheck_ends_it_within_about_a_second(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    latency = logout_ends_a_poll_elsewhere(make_server, tmp_path, notify=False)
    print(f"the same without notify: {latency * 1000:.1f} ms")
    assert latency < 2.5, latency


def test_a_logout_on_one_node_ends_the_sessions_stream_on_another(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    new_queue(a, a.token)
    stream = Stream(a, "q", max_unacked=1)
    try:
        wait_until(lambda: a.waiting() == 1)
        assert b.stub.Logout(pb.LogoutRequest(token=a.token)).code == pb.CODE_OK
        logged_out_at = time.monotonic()
        ended = stream.next()
        latency = time.monotonic() - logged_out_at
        assert ended is not None
        assert ended.code == pb.CODE_UNAUTHENTICATED
        assert stream.next() is None  # and the stream is over
        assert latency < 0.5, latency
    finally:
        stream.close()


def test_a_paused_node_acks_nothing_redelivered_and_its_client_is_told_the_session_ended(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    # No notifications: a paused node would not read them either.
    a, b = start_nodes(make_server, tmp_path, session_ttl_s=2.0, store_no_notify=True)
    first = login(a.stub, "admin", ADMIN_PASSWORD)
    new_queue(a, first)
    added = a.stub.Add(pb.AddRequest(token=first, queue_name="q", element="m"))
    held = a.stub.Poll(pb.PollRequest(token=first, queue_name="q", wait_ms=1000))
    assert held.message_id == added.message_id
    # a is "paused": it stops writing its sessions' activity and sweeping, while its
    # client goes on calling it (answered from its cache).
    engine, loop = engine_of(a)
    assert engine._sweeper is not None
    loop.call_soon_threadsafe(engine._sweeper.cancel)
    second = login(b.stub, "admin", ADMIN_PASSWORD)
    redelivered: list[pb.PollResponse] = []

    def poll() -> None:
        request = pb.PollRequest(token=second, queue_name="q", wait_ms=20_000)
        redelivered.append(b.stub.Poll(request))

    thread = threading.Thread(target=poll)
    thread.start()
    while thread.is_alive():
        assert a.stub.HeartBeat(pb.HeartBeatRequest(token=first)).code == pb.CODE_OK
        thread.join(0.2)
    # b's sweep expired the first session and released its message to the second.
    assert (redelivered[0].message_id, redelivered[0].delivery_count) == (added.message_id, 2)
    # a has not heard that the session ended (no sweep, no notification): its ack finds
    # the message gone, looks, and tells the client its session ended.
    late = a.stub.Ack(pb.AckRequest(token=first, message_id=added.message_id))
    assert late.code == pb.CODE_UNAUTHENTICATED
    extend = pb.ExtendLeaseRequest(
        token=second, message_ids=[added.message_id], ack_deadline_ms=9000
    )
    [still] = b.stub.ExtendLease(extend).results
    assert still.code == pb.CODE_OK  # the second session still holds it
    # a resumes: its next sweep learns that the session ended.
    asyncio.run_coroutine_threadsafe(engine.expire_idle_sessions(), loop).result(10)
    ended = a.stub.HeartBeat(pb.HeartBeatRequest(token=first))
    assert ended.code == pb.CODE_UNAUTHENTICATED
    acked = b.stub.Ack(pb.AckRequest(token=second, message_id=added.message_id))
    assert acked.code == pb.CODE_OK


def test_a_restarted_node_releases_nothing_and_its_sessions_go_on(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    new_queue(a, a.token)
    for element in ("x", "y"):
        assert a.stub.Add(pb.AddRequest(token=a.token, queue_name="q", element=element)).code == 0
    on_a = a.stub.Poll(pb.PollRequest(token=a.token, queue_name="q", wait_ms=1000))
    on_b = b.stub.Poll(pb.PollRequest(token=b.token, queue_name="q", wait_ms=1000))
    assert (on_a.element, on_b.element) == ("x", "y")
    b.handle.stop()
    config = pg_config(tmp_path / "cluster")
    again = Node(
        make_server(tmp_path / "node1", store=config.store, store_schema=config.store_schema)
    )
    unchecked = a.stub.GetUncheckNum(pb.GetUncheckNumRequest(token=a.token, queue_name="q"))
    assert (unchecked.code, unchecked.ack_num) == (pb.CODE_OK, 2)
    # b's session outlived b: its token works on the new node and acks what it held.
    for token, message_id in ((b.token, on_b.message_id), (a.token, on_a.message_id)):
        acked = again.stub.Ack(pb.AckRequest(token=token, message_id=message_id))
        assert acked.code == pb.CODE_OK


def test_max_sessions_counts_the_sessions_of_every_node(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path, max_sessions=3)  # an admin session on each
    third = login(a.stub, "admin", ADMIN_PASSWORD)
    challenge = b.stub.GetChallenge(pb.GetChallengeRequest())
    password = encrypt_password(challenge, ADMIN_PASSWORD)
    refused = b.stub.Auth(pb.AuthRequest(username="admin", password=password))
    assert refused.code == pb.CODE_RESOURCE_EXHAUSTED, refused
    assert a.stub.Logout(pb.LogoutRequest(token=third)).code == pb.CODE_OK
    login(b.stub, "admin", ADMIN_PASSWORD)


def test_an_admin_on_one_node_lists_and_ends_the_sessions_of_every_node(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    new_queue(a, a.token)
    token = login(a.stub, "admin", ADMIN_PASSWORD)
    assert a.stub.Add(pb.AddRequest(token=token, queue_name="q", element="m")).code == 0
    assert a.stub.Poll(pb.PollRequest(token=token, queue_name="q")).code == pb.CODE_OK
    status = a.stub.HeartBeat(pb.HeartBeatRequest(token=token)).session
    listed = b.stub.ListSessions(pb.ListSessionsRequest(token=b.token, limit=10))
    assert listed.code == pb.CODE_OK
    by_id = {s.session_id: s for s in listed.sessions}
    assert len(by_id) == 3  # an admin session per node, and this one
    mine = by_id[status.session_id]
    assert (mine.username, mine.messages_held) == ("admin", 1)
    assert mine.peer.startswith("ipv4:127.0.0.1:"), mine.peer
    assert 0 < mine.created_at_ms <= mine.last_active_at_ms
    ended = b.stub.EndSession(pb.EndSessionRequest(token=b.token, session_id=status.session_id))
    assert ended.code == pb.CODE_OK
    assert a.stub.Size(pb.SizeRequest(token=a.token, queue_name="q")).size == 1  # released
    wait_until(
        lambda: a.stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_UNAUTHENTICATED,
        timeout_s=1.5,
    )


def test_a_session_no_node_holds_ends_with_its_users_password(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """A node holding a session ends it at its next reload of the users; one that no
    node holds (its node stopped) is refused by the lookup of any other."""
    a, b = start_nodes(make_server, tmp_path)
    token = login(a.stub, "admin", ADMIN_PASSWORD)
    a.handle.stop()
    config = pg_config(tmp_path / "cluster")
    with psycopg.connect(config.store, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("UPDATE {}.users SET password_hash = 'changed'").format(
                psycopg.sql.Identifier(config.store_schema)
            )
        )
    answer = b.stub.HeartBeat(pb.HeartBeatRequest(token=token))
    assert answer.code == pb.CODE_UNAUTHENTICATED


def test_a_session_waiting_in_a_long_poll_stays_active_on_every_node(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """The node holding the poll writes the session's activity while it waits: no node's
    sweep expires it, however long past the TTL the wait lasts."""
    a, b = start_nodes(make_server, tmp_path, session_ttl_s=1.0)
    token = login(a.stub, "admin", ADMIN_PASSWORD)
    new_queue(a, token)
    polled = a.stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=3000))
    assert polled.code == pb.CODE_QUEUE_EMPTY
    assert b.stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
