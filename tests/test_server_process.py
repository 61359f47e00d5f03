"""qm-server as a process: first start, users, port conflicts, drain, crash recovery."""

from __future__ import annotations

import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from server_process import ServerProcess, qm_server
from test_subscribe import Stream

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub
FAST = ["--rsa-bits", "2048"]


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        proc.stop()


def start(processes: list[ServerProcess], data_dir: Path, *args: str, **env: str) -> ServerProcess:
    proc = ServerProcess(data_dir, *FAST, *args, env=env).start()
    processes.append(proc)
    return proc


def test_first_start_generates_admin_password(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    data = tmp_path / "data"
    proc = start(processes, data)
    password_file = data / "initial-admin-password"
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "server-key.pem").stat().st_mode) == 0o600
    log = proc.log()
    assert f"created user admin with password {password}" in log
    assert f"port {proc.port}" in log and str(data.resolve()) in log
    with grpc.insecure_channel(proc.target) as channel:
        stub = Stub(channel)
        fingerprint = stub.GetChallenge(pb.GetChallengeRequest()).fingerprint
        assert f"key fingerprint {fingerprint}" in log
        login(stub, "admin", password)
    assert proc.health() == health_pb2.HealthCheckResponse.SERVING


def test_admin_password_from_environment(tmp_path: Path, processes: list[ServerProcess]) -> None:
    proc = start(processes, tmp_path / "data", QM_ADMIN_PASSWORD="from-env")
    assert not (tmp_path / "data" / "initial-admin-password").exists()
    with grpc.insecure_channel(proc.target) as channel:
        login(Stub(channel), "admin", "from-env")


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = qm_server(
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), *FAST
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_data_directory_serves_one_server_at_a_time(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """Two servers on one data directory would each keep their own record of what is in
    flight and deliver the same messages to two sessions at once."""
    first = start(processes, tmp_path / "d")
    assert first.proc is not None
    second = qm_server("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), *FAST)
    assert second.returncode == 2
    assert f"data directory {tmp_path / 'd'} is in use by another qm-server" in second.stderr
    assert f"(pid {first.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    # The user commands edit the database beside a running server, as documented.
    added = qm_server(
        "user", "add", "alice", "--password-stdin", "--data-dir", str(tmp_path / "d"), stdin="pw\n"
    )
    assert added.returncode == 0, added.stderr
    # A killed server leaves no stale lock: the kernel drops it with the process.
    first.kill()
    start(processes, tmp_path / "d")


def test_user_commands(tmp_path: Path, processes: list[ServerProcess]) -> None:
    data = tmp_path / "data"
    proc = start(processes, data, QM_ADMIN_PASSWORD="root-pw")
    added = qm_server(
        "user", "add", "alice", "--password-stdin", "--data-dir", str(data), stdin="alice-pw\n"
    )
    assert (added.returncode, added.stdout.strip()) == (0, "added user alice")
    again = qm_server(
        "user", "add", "alice", "--password-stdin", "--data-dir", str(data), stdin="x\n"
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = qm_server("user", "list", "--data-dir", str(data))
    assert listed.stdout.splitlines() == ["admin (admin)", "alice"]
    with grpc.insecure_channel(proc.target) as channel:
        stub = Stub(channel)
        login(stub, "alice", "alice-pw")  # the running server sees the new user
        changed = qm_server(
            "user", "passwd", "alice", "--password-stdin", "--data-dir", str(data), stdin="new-pw\n"
        )
        assert changed.returncode == 0
        login(stub, "alice", "new-pw")
        removed = qm_server("user", "remove", "alice", "--data-dir", str(data))
        assert removed.returncode == 0
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        from conftest import encrypt_password

        reply = stub.Auth(
            pb.AuthRequest(username="alice", password=encrypt_password(challenge, "new-pw"))
        )
        assert reply.code == pb.CODE_UNAUTHENTICATED
    missing = qm_server("user", "remove", "alice", "--data-dir", str(data))
    assert missing.returncode == 1 and "no user" in missing.stderr


def test_grants_survive_kill_9(tmp_path: Path, processes: list[ServerProcess]) -> None:
    """Grants and revocations made with `qm-server user` beside a running server, which
    writes to the same database meanwhile, hold after that server is SIGKILLed."""
    data = tmp_path / "data"
    proc = start(processes, data, QM_ADMIN_PASSWORD="pw")

    def user(*args: str, stdin: str = "") -> None:
        result = qm_server("user", *args, "--data-dir", str(data), stdin=stdin)
        assert result.returncode == 0, result.stderr

    def bobs_codes(stub: Stub) -> list[int]:
        bob = login(stub, "bob", "bob-pw")
        return [
            stub.Size(pb.SizeRequest(token=bob, queue_name="jobs.a")).code,
            stub.Add(pb.AddRequest(token=bob, queue_name="jobs.a", element="b")).code,
            stub.Size(pb.SizeRequest(token=bob, queue_name="other")).code,
            stub.MapGet(pb.MapGetRequest(token=bob, map="cfg", key="k")).code,
        ]

    # Read on jobs.*, write revoked again, read on map cfg; nothing on queue "other".
    held = [pb.CODE_OK, pb.CODE_PERMISSION_DENIED, pb.CODE_PERMISSION_DENIED, pb.CODE_OK]
    with grpc.insecure_channel(proc.target) as channel:
        stub = Stub(channel)
        admin = login(stub, "admin", "pw")
        for name in ("jobs.a", "other"):
            stub.NewQueue(pb.NewQueueRequest(token=admin, queue_name=name))
        user("add", "bob", "--password-stdin", stdin="bob-pw\n")
        user("grant", "bob", "read,write", "queue", "jobs.*")
        stub.MapPut(pb.MapPutRequest(token=admin, map="cfg", key="k", value="v"))
        user("grant", "bob", "read", "map", "cfg")
        user("revoke", "bob", "write", "queue", "jobs.*")
        stub.Add(pb.AddRequest(token=admin, queue_name="jobs.a", element="a"))
        assert bobs_codes(stub) == held  # a login reloads grants at once
    proc.kill()
    again = start(processes, data, QM_ADMIN_PASSWORD="pw")
    with grpc.insecure_channel(again.target) as channel:
        assert bobs_codes(Stub(channel)) == held
    listed = qm_server("user", "list", "--data-dir", str(data))
    assert listed.stdout.splitlines() == ["admin (admin)", "bob: read map cfg; read queue jobs.*"]


def test_sigterm_drains(tmp_path: Path, processes: list[ServerProcess]) -> None:
    """Long polls and streams cut short by the drain answer UNAVAILABLE, never
    QUEUE_EMPTY: a consumer that stops at an empty queue must not stop because the server
    restarts."""
    proc = start(processes, tmp_path / "data", "--grace", "5", QM_ADMIN_PASSWORD="pw")
    with grpc.insecure_channel(proc.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", "pw")
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        polling = stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=20_000))
        pulling = stub.PullElements.future(
            pb.PullElementsRequest(token=token, queue_name="q", number=5, wait_ms=20_000)
        )
        stream = Stream(stub, token, "q", max_unacked=5)
        # Calls on one connection are dispatched in arrival order: once this answers, the
        # long polls and the stream are in progress on the server.
        assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
        started = time.monotonic()
        assert proc.terminate() == 0
        # The calls in progress were answered, not cut off, and well before their wait.
        assert polling.result(timeout=10).code == pb.CODE_UNAVAILABLE
        pulled = pulling.result(timeout=10)
        assert (pulled.code, pulled.number) == (pb.CODE_UNAVAILABLE, 0)
        assert stream.next().code == pb.CODE_UNAVAILABLE
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as refused:
            stub.HeartBeat(pb.HeartBeatRequest(token=token), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped; store closed" in proc.log()
    assert "Traceback" not in proc.log()


def test_kill_9_loses_nothing_answered_ok(tmp_path: Path, processes: list[ServerProcess]) -> None:
    """Add and ack under load, SIGKILL mid-flight, restart, check every invariant."""
    data = tmp_path / "data"
    proc = start(processes, data, QM_ADMIN_PASSWORD="pw")
    added: dict[int, str] = {}
    acked: set[int] = set()
    held: dict[int, int] = {}  # id -> delivery count, polled and not acked at the kill
    lock = threading.Lock()
    stop = threading.Event()

    with grpc.insecure_channel(proc.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", "pw")
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        stub.MapBatchPut(
            pb.MapBatchPutRequest(
                token=token, map="m", size=1, list=[pb.KeyValue(key="k", value="v")]
            )
        )
        fingerprint = stub.GetChallenge(pb.GetChallengeRequest()).fingerprint

    def producer(n: int) -> None:
        with grpc.insecure_channel(proc.target) as ch:
            s = Stub(ch)
            t = login(s, "admin", "pw")
            i = 0
            while not stop.is_set():
                element = f"p{n}-{i}"
                try:
                    reply = s.Add(
                        pb.AddRequest(token=t, queue_name="q", element=element), timeout=5
                    )
                except grpc.RpcError:
                    return  # the server died: this add's outcome is unknown
                assert reply.code == pb.CODE_OK
                with lock:
                    added[reply.message_id] = element
                i += 1

    def consumer() -> None:
        with grpc.insecure_channel(proc.target) as ch:
            s = Stub(ch)
            t = login(s, "admin", "pw")
            while not stop.is_set():
                try:
                    got = s.Poll(pb.PollRequest(token=t, queue_name="q", wait_ms=100), timeout=5)
                    if got.code != pb.CODE_OK:
                        continue
                    with lock:
                        held[got.message_id] = got.delivery_count
                    if got.message_id % 3:
                        reply = s.Ack(pb.AckRequest(token=t, message_id=got.message_id), timeout=5)
                        assert reply.code == pb.CODE_OK
                        with lock:
                            acked.add(got.message_id)
                            del held[got.message_id]
                except grpc.RpcError:
                    return

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=consumer) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)  # let load build up; the kill must land mid-traffic
    proc.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(acked) >= 200

    again = start(processes, data)
    with grpc.insecure_channel(again.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", "pw")  # users survived
        assert stub.GetChallenge(pb.GetChallengeRequest()).fingerprint == fingerprint
        got = stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k"))
        assert (got.code, got.value) == (pb.CODE_OK, "v")
        assert stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name="q")).ack_num == 0
        remaining: dict[int, tuple[str, int]] = {}
        while True:
            page = stub.PullElements(
                pb.PullElementsRequest(token=token, queue_name="q", number=1000)
            )
            if page.code == pb.CODE_QUEUE_EMPTY:
                break
            for e in page.element_info:
                remaining[e.message_id] = (e.element, e.delivery_count)
    # Every add answered OK is still there unless we acked it; acked ones stay gone. The
    # only other way out is an ack the kill cut off after its commit (never answered).
    lost = set(added) - acked - set(remaining)
    assert all(message_id in held and message_id % 3 for message_id in lost), lost
    assert len(lost) <= 2  # at most one ack in flight per consumer
    assert not acked & set(remaining)
    for message_id, element in added.items():
        if message_id in remaining:
            assert remaining[message_id][0] == element
    # Messages held at the kill came back ready, their delivery counted.
    for message_id, count in held.items():
        if message_id in remaining:
            assert remaining[message_id][1] == count + 1
    ids = sorted(remaining)
    assert len(ids) == len(set(ids))


def test_a_shutdown_that_fails_still_ends_the_server(
    make_server: Callable[..., ServerHandle],
) -> None:
    """qm-server waits for stop() to finish before it exits; a stop() that raised used
    to leave that wait pending for ever, so SIGTERM hung the process."""
    handle = make_server()
    server, thread = handle.thread.server, handle.thread._thread
    assert server is not None and server.engine is not None and thread is not None

    engine_stop = server.engine.stop

    async def broken_stop() -> None:
        await engine_stop()
        raise RuntimeError("the session sweeper died")

    server.engine.stop = broken_stop  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="sweeper died"):
        handle.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert server.failed_to_stop
    # Its data directory is free again.
    make_server(data_dir=handle.data_dir)
