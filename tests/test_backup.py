"""`qm-server backup DEST`: an online copy that a new server starts from as the same server.

The server runs as an operator runs it (a subprocess), a producer keeps adding while the
backup is taken, and a second server started on the backup is compared with what was
answered OK before the backup began.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_process import ServerProcess, qm_server

from conftest import login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.auth import KEY_FILE
from qm_server.store.sqlite_file import DB_FILE

ADMIN_PASSWORD = "backup-admin"
ALICE_PASSWORD = "alice-secret"
SERVER_ARGS = ("--rsa-bits", "2048", "--disk-reserve-bytes", "0")
MAX_PRODUCED = 20_000  # the producer's bound, whatever happens to the backup
MAP_ENTRIES = {f"k{i:03}": f"v{i}" for i in range(200)}


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop()


def start(processes: list[ServerProcess], data_dir: Path) -> ServerProcess:
    process = ServerProcess(data_dir, *SERVER_ARGS, env={"QM_ADMIN_PASSWORD": ADMIN_PASSWORD})
    processes.append(process)
    return process.start()


class Producer(threading.Thread):
    """Adds to `jobs` until told to stop (or MAX_PRODUCED); records each add answered OK,
    and which were answered before `mark` was called."""

    def __init__(self, target: str, token: str) -> None:
        super().__init__(name="backup-test-producer", daemon=True)
        self.target, self.token = target, token
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # guards answered and the marks
        self.answered: list[str] = []
        self.marks: list[int] = []
        self.error: BaseException | None = None

    def mark(self) -> int:
        """How many adds were answered OK by now."""
        with self.lock:
            self.marks.append(len(self.answered))
            return self.marks[-1]

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = pb_grpc.QueueManagerServiceStub(channel)
                for n in range(MAX_PRODUCED):
                    if self.stopping.is_set():
                        return
                    element = f"produced-{n}"
                    request = pb.AddRequest(token=self.token, queue_name="jobs", element=element)
                    reply = stub.Add(request, timeout=30)
                    assert reply.code == pb.CODE_OK, reply.message
                    with self.lock:
                        self.answered.append(element)
        except BaseException as exc:  # reported by the test
            self.error = exc


def drain(stub: pb_grpc.QueueManagerServiceStub, token: str) -> list[str]:
    """Every ready element of `jobs`, in order (acked, so each is read once)."""
    elements: list[str] = []
    while True:
        reply = stub.PullElements(
            pb.PullElementsRequest(token=token, queue_name="jobs", number=1000), timeout=30
        )
        if reply.code == pb.CODE_QUEUE_EMPTY or not reply.element_info:
            return elements
        assert reply.code == pb.CODE_OK, reply.message
        elements += [info.element for info in reply.element_info]
        ids = [info.message_id for info in reply.element_info]
        acked = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=ids), timeout=30)
        assert acked.code == pb.CODE_OK, acked.message


def fingerprint(stub: pb_grpc.QueueManagerServiceStub) -> str:
    return stub.GetChallenge(pb.GetChallengeRequest(), timeout=10).fingerprint


def test_backup_of_a_busy_server_restores_as_the_same_server(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    original = start(processes, tmp_path / "data")
    added = qm_server(
        "user",
        "add",
        "alice",
        "--password-stdin",
        "--data-dir",
        str(original.data_dir),
        stdin=f"{ALICE_PASSWORD}\n",
    )
    assert added.returncode == 0, added.stderr
    granted = qm_server(
        "user", "grant", "alice", "read", "queue", "jobs", "--data-dir", str(original.data_dir)
    )
    assert granted.returncode == 0, granted.stderr
    with grpc.insecure_channel(original.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        original_fingerprint = fingerprint(stub)
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="jobs")).code == 0
        entries = [pb.KeyValue(key=k, value=v) for k, v in MAP_ENTRIES.items()]
        put = stub.MapBatchPut(
            pb.MapBatchPutRequest(token=token, map="cfg", size=len(entries), list=entries)
        )
        assert put.code == pb.CODE_OK, put.message

        producer = Producer(original.target, token)
        producer.start()
        deadline = time.monotonic() + 60
        while len(producer.answered) < 200 and producer.is_alive():
            assert time.monotonic() < deadline, "the producer made no progress"
            time.sleep(0.01)
        # One message in flight at the backup: a restart makes it ready again.
        in_flight = stub.Poll(pb.PollRequest(token=token, queue_name="jobs"))
        assert in_flight.code == pb.CODE_OK, in_flight.message
        before = producer.mark()
        backed_up = qm_server(
            "backup", str(tmp_path / "backup"), "--data-dir", str(original.data_dir)
        )
        after = producer.mark()
        producer.stopping.set()
        producer.join(timeout=60)
        assert producer.error is None, producer.error
    assert backed_up.returncode == 0, backed_up.stderr
    assert backed_up.stdout == f"backed up {DB_FILE}, {KEY_FILE} to {tmp_path / 'backup'}\n"
    assert after > before, "the server did not go on answering adds during the backup"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["backup", "data", "data-server.log", "data.port"]
    ), "a temporary directory was left"
    assert sorted(os.listdir(tmp_path / "backup")) == [DB_FILE, KEY_FILE]
    assert original.terminate() == 0

    restored = start(processes, tmp_path / "backup")
    with grpc.insecure_channel(restored.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        assert fingerprint(stub) == original_fingerprint
        token = login(stub, "admin", ADMIN_PASSWORD)
        got = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="cfg"))
        assert dict(got.map) == MAP_ENTRIES
        elements = drain(stub, token)
        answered = producer.answered
        # Everything answered before the backup began, in order, once; then some of
        # what came during it; nothing that was never answered.
        assert elements[:before] == answered[:before]
        assert elements == answered[: len(elements)]
        assert len(elements) <= after

        alice = login(stub, "alice", ALICE_PASSWORD)
        size = stub.Size(pb.SizeRequest(token=alice, queue_name="jobs"))
        assert (size.code, size.size) == (pb.CODE_OK, 0)
        denied = stub.NewQueue(pb.NewQueueRequest(token=alice, queue_name="other"))
        assert denied.code == pb.CODE_PERMISSION_DENIED


def test_dest_that_is_not_empty_is_refused(tmp_path: Path, processes: list[ServerProcess]) -> None:
    start(processes, tmp_path / "data")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine\n")
    refused = qm_server("backup", str(dest), "--data-dir", str(tmp_path / "data"))
    assert refused.returncode == 2
    assert refused.stderr == f"qm-server: {dest} exists and is not an empty directory\n"
    assert os.listdir(dest) == ["keep"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert qm_server("backup", str(a_file), "--data-dir", str(tmp_path / "data")).returncode == 2


def test_an_empty_dest_directory_is_used(tmp_path: Path, processes: list[ServerProcess]) -> None:
    start(processes, tmp_path / "data").terminate()  # a stopped server: an offline copy
    (tmp_path / "dest").mkdir()
    done = qm_server("backup", str(tmp_path / "dest"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "dest")) == [DB_FILE, KEY_FILE]
    assert (tmp_path / "dest").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "dest" / DB_FILE).stat().st_mode & 0o777 == 0o600


def test_a_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_FILE).write_bytes(b"not a database at all " * 200)
    (data / KEY_FILE).write_text("key\n")
    failed = qm_server("backup", str(tmp_path / "dest"), "--data-dir", str(data))
    assert failed.returncode == 2
    assert failed.stderr.startswith(f"qm-server: cannot copy {data / DB_FILE}: ")
    assert os.listdir(tmp_path) == ["data"]


def test_no_database_is_refused(tmp_path: Path) -> None:
    refused = qm_server("backup", str(tmp_path / "dest"), "--data-dir", str(tmp_path / "none"))
    assert refused.returncode == 2
    assert "no database in" in refused.stderr
    assert os.listdir(tmp_path) == []


def test_postgresql_store_points_at_pg_dump(tmp_path: Path) -> None:
    refused = qm_server(
        "--store",
        "postgresql://qm@db.internal/qm",
        "--store-schema",
        "jobs",
        "backup",
        str(tmp_path / "d"),
    )
    assert refused.returncode == 2
    assert "pg_dump --schema=jobs" in refused.stderr
    assert os.listdir(tmp_path) == []


def test_a_dest_filled_during_the_copy_is_left_alone(
    tmp_path: Path, processes: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is the last step: if DEST got files meanwhile, it fails and the copy
    is removed (in-process, to fill DEST at the right moment)."""
    from qm_server import backup

    start(processes, tmp_path / "data")
    dest = tmp_path / "dest"
    copy_files = backup._copy_files

    def copy_then_fill(data_dir: Path, work: Path) -> list[str]:
        dest.mkdir()
        (dest / "theirs").write_text("")
        return copy_files(data_dir, work)

    monkeypatch.setattr(backup, "_copy_files", copy_then_fill)
    with pytest.raises(backup.BackupRefused, match=f"cannot write {dest}: "):
        backup.back_up(tmp_path / "data", dest)
    assert os.listdir(dest) == ["theirs"]
    assert sorted(os.listdir(tmp_path)) == ["data", "data-server.log", "data.port", "dest"]


def test_backup_after_a_kill_keeps_what_the_log_holds(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """A server killed with -9 leaves qm.db-wal and qm.db-shm behind: a backup from
    that directory (before a restart) holds every add answered before the kill."""
    original = start(processes, tmp_path / "data")
    with grpc.insecure_channel(original.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="jobs")).code == 0
        elements = [f"e{i}" for i in range(50)]
        added = stub.AddAll(pb.AddAllRequest(token=token, queue_name="jobs", elements=elements))
        assert added.code == pb.CODE_OK, added.message
    original.kill()
    assert (tmp_path / "data" / f"{DB_FILE}-wal").stat().st_size > 0
    done = qm_server("backup", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    restored = start(processes, tmp_path / "backup")
    with grpc.insecure_channel(restored.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        assert drain(stub, login(stub, "admin", ADMIN_PASSWORD)) == elements
