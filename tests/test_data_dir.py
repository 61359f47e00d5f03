"""The data directory: a database gone from beside its key, file modes, corruption."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import qm_server

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.auth import KEY_FILE
from qm_server.fsutil import DataDirRefused
from qm_server.store.sqlite_file import SQLITE_FILES, DatabaseDamaged

Stub = pb_grpc.QueueManagerServiceStub
MAP_ENTRIES = 3000


def call(handle: ServerHandle, password: str | None = None) -> tuple[grpc.Channel, Stub, str]:
    channel = grpc.insecure_channel(handle.target)
    stub = Stub(channel)
    return channel, stub, login(stub, "admin", password or handle.admin_password)


# A database gone from beside its key --------------------------------------------------


def test_a_key_without_its_database_is_refused(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """The server used to start empty there, re-create admin and serve: every queue and
    map the clients knew was silently gone."""
    data = tmp_path / "data"
    handle = make_server(data_dir=data)
    channel, stub, token = call(handle)
    with channel:
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q")).code == pb.CODE_OK
    handle.stop()
    for name in SQLITE_FILES:
        (data / name).unlink(missing_ok=True)
    with pytest.raises(DataDirRefused, match=r"qm\.db is missing.*--new-database"):
        make_server(data_dir=data)
    assert not (data / "qm.db").exists()  # refused before anything was created
    (data / "qm.db").write_bytes(b"")
    with pytest.raises(DataDirRefused, match=r"qm\.db is empty.*--new-database"):
        make_server(data_dir=data)
    (data / "qm.db").unlink()
    sqlite3.connect(data / "qm.db").execute("PRAGMA user_version = 1").connection.close()
    with pytest.raises(DataDirRefused, match=r"qm\.db holds no tables.*--new-database"):
        make_server(data_dir=data)
    fresh = make_server(data_dir=data, new_database=True)
    channel, stub, token = call(fresh)
    with channel:
        size = stub.Size(pb.SizeRequest(token=token, queue_name="q"))
        assert size.code == pb.CODE_QUEUE_NOT_FOUND


def test_a_database_without_its_key_is_refused(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """The server used to make a new key there and serve: its identity changed silently,
    and clients that pinned the old fingerprint could no longer tell it from an impostor."""
    data = tmp_path / "data"
    make_server(data_dir=data).stop()
    old_key = (data / KEY_FILE).read_bytes()
    (data / KEY_FILE).unlink()
    with pytest.raises(DataDirRefused, match=r"server-key\.pem is missing.*--new-key"):
        make_server(data_dir=data)
    assert not (data / KEY_FILE).exists()  # refused before a key was made
    make_server(data_dir=data, new_key=True).stop()
    assert (data / KEY_FILE).read_bytes() != old_key


def test_the_refusal_is_exit_status_2_without_a_traceback(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    make_server(data_dir=data).stop()
    (data / "qm.db").unlink()
    result = qm_server("--listen", "127.0.0.1:0", "--data-dir", str(data), "--rsa-bits", "2048")
    assert result.returncode == 2
    assert f"the database {data / 'qm.db'} is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_user_commands_refuse_a_directory_without_a_database(tmp_path: Path) -> None:
    """A mistyped --data-dir used to get a new database and "added user alice"."""
    typo = tmp_path / "typo"
    added = qm_server(
        "user", "add", "alice", "--password-stdin", "--data-dir", str(typo), stdin="pw\n"
    )
    assert added.returncode == 2
    assert f"no database in {typo} (qm.db is missing)" in added.stderr
    assert not typo.exists()
    typo.mkdir()
    listed = qm_server("user", "list", "--data-dir", str(typo))
    assert (listed.returncode, listed.stdout) == (2, "")
    assert list(typo.iterdir()) == []


# File modes -------------------------------------------------------------------------


def modes(data: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir() if p.is_file()}


def test_every_file_is_private_whatever_the_umask(
    make_server: Callable[..., ServerHandle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Database, WAL, shared memory, key, password file, lock and reserve: 0600, with a
    umask of 0 in a directory anyone may enter, and after files were left wider."""
    monkeypatch.delenv("QM_ADMIN_PASSWORD", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    old_umask = os.umask(0)
    try:
        handle = make_server(data_dir=data, admin_password=None)
        password = (data / "initial-admin-password").read_text().strip()
        channel, stub, token = call(handle, password)
        with channel:
            stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
            assert stub.Add(pb.AddRequest(token=token, queue_name="q", element="x")).code == 0
        expected = {
            "qm.db",
            "qm.db-wal",
            "qm.db-shm",
            "server-key.pem",
            "initial-admin-password",
            "qm.lock",
            "qm.reserve",
        }
        assert modes(data) == dict.fromkeys(expected, 0o600)
        handle.stop()
        for path in data.iterdir():
            path.chmod(0o644)
        make_server(data_dir=data, admin_password=None)
        assert modes(data) == dict.fromkeys(expected, 0o600)
    finally:
        os.umask(old_umask)


# Corruption -------------------------------------------------------------------------


def database_with_a_map(make_server: Callable[..., ServerHandle], data: Path) -> None:
    """A stopped server's database holding map "m" of MAP_ENTRIES keys (all in qm.db:
    the last connection's close checkpoints the write-ahead log into it)."""
    handle = make_server(data_dir=data)
    channel, stub, token = call(handle)
    with channel:
        pairs = [pb.KeyValue(key=f"key{i:05}", value="v" * 50) for i in range(MAP_ENTRIES)]
        for start in range(0, MAP_ENTRIES, 1000):
            chunk = pairs[start : start + 1000]
            reply = stub.MapBatchPut(
                pb.MapBatchPutRequest(token=token, map="m", size=len(chunk), list=chunk)
            )
            assert reply.code == pb.CODE_OK
    handle.stop()
    assert not (data / "qm.db-wal").exists()


def garble_the_page_holding(database: Path, text: bytes) -> None:
    """Make the b-tree page holding `text` claim one cell only: SQLite then reads the
    rest of the page as gone, without an error (a torn or bit-flipped write)."""
    data = bytearray(database.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    page_start = data.index(text) // page_size * page_size
    data[page_start + 3 : page_start + 5] = (1).to_bytes(2, "big")  # the cell count
    database.write_bytes(data)


def test_a_damaged_database_is_refused_at_start(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """It used to be served as a shorter map, with health SERVING."""
    data = tmp_path / "data"
    database_with_a_map(make_server, data)
    garble_the_page_holding(data / "qm.db", b"key01500")
    with pytest.raises(DatabaseDamaged, match=r"is damaged .*qm-server check --data-dir"):
        make_server(data_dir=data)
    # Skipping the check (--start-check-seconds 0) serves it: what the check prevents.
    handle = make_server(data_dir=data, start_check_s=0)
    channel, stub, token = call(handle)
    with channel:
        size = len(stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m")).map)
        assert size < MAP_ENTRIES


def test_the_check_at_start_is_bounded_in_time(
    make_server: Callable[..., ServerHandle], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A check that takes longer than --start-check-seconds is abandoned with a warning,
    so a big database does not hold the start for ever."""
    data = tmp_path / "data"
    database_with_a_map(make_server, data)
    garble_the_page_holding(data / "qm.db", b"key01500")
    with caplog.at_level(logging.WARNING):
        make_server(data_dir=data, start_check_s=1e-6)
    assert any("did not finish within 1e-06 s" in r.getMessage() for r in caplog.records)


def test_qm_server_check(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    data = tmp_path / "data"
    database_with_a_map(make_server, data)
    intact = qm_server("check", "--data-dir", str(data))
    assert (intact.returncode, intact.stdout) == (0, f"{data / 'qm.db'}: ok\n")
    garble_the_page_holding(data / "qm.db", b"key01500")
    damaged = qm_server("check", "--data-dir", str(data))
    assert damaged.returncode == 1
    assert "Fragmentation" in damaged.stdout
    assert "is damaged" in damaged.stderr and "Traceback" not in damaged.stderr
    missing = qm_server("check", "--data-dir", str(tmp_path / "typo"))
    assert missing.returncode == 2 and "no database in" in missing.stderr


def test_a_file_that_is_no_database_is_refused(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    make_server(data_dir=data).stop()
    (data / "qm.db").write_bytes(b"this is not a database" * 100)
    result = qm_server("--listen", "127.0.0.1:0", "--data-dir", str(data), "--rsa-bits", "2048")
    assert result.returncode == 2
    assert "is damaged (file is not a database)" in result.stderr
    assert "Traceback" not in result.stderr
    listed = qm_server("user", "list", "--data-dir", str(data))
    assert listed.returncode == 2 and "is damaged" in listed.stderr
    assert "Traceback" not in listed.stderr


def test_damage_found_while_serving_keeps_the_server_not_serving(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """A read that meets a corrupt page (the start-up check skipped) turns the server
    NOT_SERVING with the reason, and it stays so: the next call's probe write would
    succeed, and the server used to serve again, until the next read of that page."""
    data = tmp_path / "data"
    database_with_a_map(make_server, data)
    database = bytearray((data / "qm.db").read_bytes())
    page_size = int.from_bytes(database[16:18], "big")
    start = database.index(b"key01500") // page_size * page_size
    database[start : start + page_size] = bytes(page_size)
    (data / "qm.db").write_bytes(database)
    handle = make_server(data_dir=data, start_check_s=0)
    channel, stub, token = call(handle)
    with channel:
        read = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
        assert read.code == pb.CODE_UNAVAILABLE
        assert "malformed" in read.message
        size = stub.Size(pb.SizeRequest(token=token, queue_name="q"))
        assert size.code == pb.CODE_UNAVAILABLE
        assert "is damaged" in size.message and "qm-server check" in size.message
        reply, check = health_pb2_grpc.HealthStub(channel).Check.with_call(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        reason = dict(check.trailing_metadata() or ()).get("qm-not-serving-reason", "")
        assert f"the database {data / 'qm.db'} is damaged" in str(reason)


def test_a_user_command_that_cannot_write_says_so(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """A database that refuses writes (immutable here, a full disk alike) used to end the
    command with a traceback."""
    data = tmp_path / "data"
    make_server(data_dir=data).stop()
    subprocess.run(["chattr", "+i", str(data / "qm.db")], check=True)
    try:
        added = qm_server(
            "user", "add", "alice", "--password-stdin", "--data-dir", str(data), stdin="pw\n"
        )
    finally:
        subprocess.run(["chattr", "-i", str(data / "qm.db")], check=True)
    assert added.returncode == 2
    assert f"qm-server: nothing changed, {data / 'qm.db'}: " in added.stderr
    assert "Traceback" not in added.stderr


def test_a_database_from_a_newer_server_is_refused_without_a_traceback(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """Serving and user commands on a schema this server does not know: exit status 2 and
    what to do, the database untouched (they used to end with a RuntimeError's traceback)."""
    data = tmp_path / "data"
    make_server(data_dir=data).stop()
    with sqlite3.connect(data / "qm.db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    served = qm_server("--listen", "127.0.0.1:0", "--data-dir", str(data), "--rsa-bits", "2048")
    listed = qm_server("user", "list", "--data-dir", str(data))
    for result in (served, listed):
        assert result.returncode == 2, result.stderr
        assert "database schema version 99 is newer than this server" in result.stderr
        assert "upgrade qm-server" in result.stderr
        assert "Traceback" not in result.stderr
    with sqlite3.connect(data / "qm.db") as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version == "99"
