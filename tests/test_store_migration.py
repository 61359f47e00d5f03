"""A data directory written by an older schema keeps its messages and delivery counts."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc

from conftest import ADMIN_PASSWORD, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.store import sqlite_sql as sql
from qm_server.store.sqlite_file import DB_FILE, transaction


def write_schema_2_file(data_dir: Path) -> None:
    """The file as schema 2 left it: being in flight was a column of each message."""
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / DB_FILE, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    with transaction(conn):
        for script in sql.MIGRATIONS[:2]:
            assert isinstance(script, str)
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(sql.SET_SCHEMA_VERSION, ("2",))
        conn.execute("INSERT INTO queues (id, name) VALUES (1, 'jobs'), (2, 'idle')")
        conn.executemany(
            "INSERT INTO messages (id, queue_id, state, session_id, delivery_count, payload)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (1, 1, 0, None, 2, "given back twice"),
                (2, 1, 1, 77, 1, "in flight at the stop"),
                (3, 1, 0, None, 0, "never delivered"),
                (4, 2, 0, None, 0, "other queue"),
                (5, 1, 0, None, 0, "newest"),
            ],
        )
    conn.close()


def pull(stub: pb_grpc.QueueManagerServiceStub, token: str, n: int) -> list[tuple[int, str, int]]:
    reply = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="jobs", number=n))
    assert reply.code == pb.CODE_OK, reply.message
    return [(e.message_id, e.element, e.delivery_count) for e in reply.element_info]


def test_schema_2_file_serves_with_its_delivery_counts(
    tmp_path: Path, make_server: Callable[..., ServerHandle]
) -> None:
    data_dir = tmp_path / "old"
    write_schema_2_file(data_dir)

    server = make_server(data_dir)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        size = stub.Size(pb.SizeRequest(token=token, queue_name="jobs"))
        assert (size.code, size.size) == (pb.CODE_OK, 4)
        assert pull(stub, token, 10) == [
            (1, "given back twice", 3),
            (2, "in flight at the stop", 2),
            (3, "never delivered", 1),
            (5, "newest", 1),
        ]
        added = stub.Add(pb.AddRequest(token=token, queue_name="jobs", element="after"))
        assert (added.code, added.message_id) == (pb.CODE_OK, 6)
    server.stop()

    # Restarted, everything that was in flight comes back once more, counted.
    again = make_server(data_dir)
    with grpc.insecure_channel(again.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert pull(stub, token, 10) == [
            (1, "given back twice", 4),
            (2, "in flight at the stop", 3),
            (3, "never delivered", 2),
            (5, "newest", 2),
            (6, "after", 1),
        ]
        other = stub.Poll(pb.PollRequest(token=token, queue_name="idle"))
        assert (other.element, other.message_id, other.delivery_count) == ("other queue", 4, 1)
