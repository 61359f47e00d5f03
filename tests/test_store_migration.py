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
from qm_server.store.sqlite_file import DB_FILE, connect, transaction


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


def schema_of(conn: sqlite3.Connection) -> dict[str, object]:
    """Every table and index of the file, by name: columns (name, type, not null, default,
    primary key position), indexes with their columns, WITHOUT ROWID, and each partial
    index's condition. Compared as structure, not as text: ALTER TABLE writes the new
    column into the stored CREATE text in a shape of its own."""
    schema: dict[str, object] = {}
    entries = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")
    for kind, name, table, text in entries.fetchall():
        if kind == "table":
            columns = conn.execute(f"PRAGMA table_xinfo({name})").fetchall()
            indexes = {
                index: (
                    unique,
                    origin,
                    partial,
                    conn.execute(f"PRAGMA index_xinfo({index})").fetchall(),
                )
                for _, index, unique, origin, partial in conn.execute(f"PRAGMA index_list({name})")
            }
            without_rowid = " ".join(text.split()).upper().endswith("WITHOUT ROWID")
            schema[name] = ("table", columns, indexes, without_rowid)
        else:
            schema[name] = (kind, table, " ".join(text.split()) if text else None)
    return schema


def test_a_file_migrated_from_empty_has_exactly_the_written_schema(tmp_path: Path) -> None:
    """sqlite_sql.SCHEMA is the schema to read; the migrations are what builds it. A
    migration that changes a table without SCHEMA (or the reverse) fails here."""
    migrated = connect(tmp_path / DB_FILE)
    written = sqlite3.connect(":memory:")
    written.executescript(sql.SCHEMA)
    try:
        assert schema_of(migrated) == schema_of(written)
    finally:
        migrated.close()
        written.close()
