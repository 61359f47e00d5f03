"""``qm sessions`` and ``qm sessions end``, run as a subprocess against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_fixtures import add_user, connect, raw_stub, run_qm
from test_cli import failed, iso, ok, ok_json

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import QueueManagerClient


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    add_user(server, "bob", "bob-pw")
    with connect(server) as client:
        client.new_queue("jobs")
        client.add_all("jobs", ["a", "b"])
        yield client


def test_sessions_lists_every_live_session(server: ServerHandle, qm: QueueManagerClient) -> None:
    [held] = qm.pull("jobs", 1)
    mine = qm.heartbeat().session_id
    with QueueManagerClient(server.target, "bob", "bob-pw", heartbeat=False) as bob:
        theirs = bob.heartbeat().session_id
        listed = ok_json(run_qm(server, "--json", "sessions"))["sessions"]
        # The qm process's own session is listed too (it is live while it asks).
        assert len(listed) == 3
        by_id = {s["session_id"]: s for s in listed}
        assert (by_id[mine]["username"], by_id[mine]["messages_held"]) == ("admin", 1)
        assert (by_id[theirs]["username"], by_id[theirs]["messages_held"]) == ("bob", 0)
        assert by_id[theirs]["peer"].startswith("ipv4:127.0.0.1:")
        assert by_id[theirs]["created_at_ms"] <= by_id[theirs]["last_active_at_ms"]

        only_bob = ok_json(run_qm(server, "sessions", "--of", "bob", "--json"))["sessions"]
        assert only_bob == [by_id[theirs]]
        [line] = ok(run_qm(server, "sessions", "--of", "bob")).splitlines()
        bob_json = by_id[theirs]
        assert line == (
            f"{theirs}\tbob\t{bob_json['peer']}\tsince {iso(bob_json['created_at_ms'])}\t"
            f"active {iso(bob_json['last_active_at_ms'])}\t0 held\t0 subscriptions"
        )
    held.ack()


def test_sessions_end_ends_one(server: ServerHandle, qm: QueueManagerClient) -> None:
    with QueueManagerClient(server.target, "bob", "bob-pw", heartbeat=False) as bob:
        theirs, token = bob.heartbeat().session_id, bob.token
        assert ok(run_qm(server, "sessions", "end", str(theirs))) == f"ended session {theirs}\n"
        assert [s.username for s in qm.list_sessions()] == ["admin"]
        assert ok_json(run_qm(server, "--json", "sessions", "--of", "bob")) == {"sessions": []}
        with raw_stub(server) as stub:  # its token no longer works
            reply = stub.HeartBeat(pb.HeartBeatRequest(token=token))
            assert reply.code == pb.CODE_UNAUTHENTICATED
        failed(run_qm(server, "sessions", "end", str(theirs)), 1, "SESSION_NOT_FOUND")


def test_sessions_are_for_admins(server: ServerHandle, qm: QueueManagerClient) -> None:
    as_bob = {"QM_USER": "bob", "QM_PASSWORD": "bob-pw"}
    failed(run_qm(server, "sessions", **as_bob), 1, "PERMISSION_DENIED")
    failed(run_qm(server, "sessions", "end", "1", **as_bob), 1, "PERMISSION_DENIED")
    result = run_qm(server, "sessions", "end", "zero")
    assert result.returncode == 2
