"""The client's session methods against a real server through real gRPC: ``heartbeat``'s
status, ``list_sessions`` and ``end_session`` with their typed results and errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from client_fixtures import ROOT, LossRecorder, add_user, connect
from test_permissions import user_command

from conftest import ServerHandle
from qm_client import (
    PermissionDenied,
    QueueManagerClient,
    SessionNotFound,
    SessionStatus,
    SessionSummary,
)

NEAR = timedelta(seconds=5)


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    add_user(server, "bob", "bob-pw")
    user_command(server.data_dir, "grant", "bob", "read", "queue", "*")
    with connect(server) as client:
        client.new_queue("jobs")
        client.add_all("jobs", ["a", "b", "c"])
        yield client


def bob(server: ServerHandle, **kwargs: object) -> QueueManagerClient:
    return QueueManagerClient(server.target, "bob", "bob-pw", heartbeat=False, **kwargs)  # type: ignore[arg-type]


def test_heartbeat_returns_the_sessions_status(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    with bob(server) as consumer:
        assert consumer.heartbeat() == SessionStatus(
            session_id=consumer.heartbeat().session_id,
            expires_in_ms=round(consumer.session_ttl * 1000),
            messages_held=0,
            subscriptions=0,
        )
        held = consumer.pull("jobs", 2)
        with consumer.subscribe("jobs", max_unacked=1) as stream:
            next(iter(stream))
            status = consumer.heartbeat()
            assert (status.messages_held, status.subscriptions) == (3, 1)
        held[0].ack()
        assert consumer.heartbeat().messages_held == 1


def test_list_sessions_lists_every_live_session(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    before = datetime.now(UTC)
    with bob(server) as first, bob(server) as second:
        first.pull("jobs", 2)
        ids = {c.heartbeat().session_id: c for c in (first, second)}
        everyone = list(qm.list_sessions(page_size=1))  # one call per session
        assert [s.session_id for s in everyone] == sorted(s.session_id for s in everyone)
        by_id = {s.session_id: s for s in everyone}
        assert set(by_id) == set(ids) | {qm.heartbeat().session_id}
        summary = by_id[first.heartbeat().session_id]
        assert isinstance(summary, SessionSummary)
        assert (summary.username, summary.messages_held, summary.subscriptions) == ("bob", 2, 0)
        assert summary.peer.startswith("ipv4:127.0.0.1:")
        assert before - NEAR <= summary.created_at <= summary.last_active_at
        assert summary.last_active_at <= datetime.now(UTC) + NEAR
        assert {s.session_id for s in qm.list_sessions(username="bob")} == set(ids)
        with pytest.raises(PermissionDenied):
            list(first.list_sessions())


def test_end_session_ends_another_session(server: ServerHandle, qm: QueueManagerClient) -> None:
    lost = LossRecorder()
    with bob(server, on_session_lost=lost) as consumer:
        [held] = consumer.pull("jobs", 1)
        ended = consumer.heartbeat().session_id
        with pytest.raises(PermissionDenied):
            consumer.end_session(qm.heartbeat().session_id)
        qm.end_session(ended)
        assert qm.size("jobs") == 3  # its message is ready again
        with pytest.raises(SessionNotFound):
            qm.end_session(ended)
        # The ended client notices on its next call, logs in again and says what it lost.
        assert consumer.heartbeat().session_id != ended
        assert lost.called.is_set()
        assert lost.losses[0].released == (held,)


def test_the_docs_example_ends_the_sessions_holding_too_much(
    server: ServerHandle, qm: QueueManagerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    [code] = [
        c
        for c in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
        if c.startswith("for s in qm.list_sessions(")
    ]
    qm.add_all("jobs", [str(i) for i in range(200)])
    with bob(server) as greedy, bob(server) as modest:
        greedy.pull("jobs", 101)
        modest.pull("jobs", 100)
        ended, kept = greedy.heartbeat().session_id, modest.heartbeat().session_id
        exec(compile(code, "docs/client.md", "exec"), {"qm": qm})
        printed = capsys.readouterr().out.splitlines()
        assert sorted(int(line.split()[0]) for line in printed) == sorted([ended, kept])
        assert [s.session_id for s in qm.list_sessions(username="bob")] == [kept]
