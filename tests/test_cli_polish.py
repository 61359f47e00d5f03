"""``qm`` for people: loads batched to the limits the server tells at login, progress and
summaries on a terminal only, the default target where the server listens, and a hint
instead of a bare "connection refused" when TLS and plaintext meet. Real servers, ``qm``
as a subprocess (on a pseudo-terminal where a terminal matters)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from client_fixtures import ROOT, client_env, connect, raw_stub, run_qm
from test_cli import failed, ok

from conftest import ServerHandle, encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm_client import ServerLimits
from qm_client.cli._context import DEFAULT_SERVER
from qm_server.config import ServerConfig, TlsSettings

KIB = 1024


def run_on_terminal(
    server: ServerHandle, *args: str, stdin: str, stream: str
) -> tuple[int, str, str]:
    """``qm ARGS`` with ``stream`` ("stdout" or "stderr") on a pseudo-terminal and the
    other piped: (status, what the terminal showed, what the pipe got)."""
    master, replica = os.openpty()
    on_terminal = {stream: replica}
    process = subprocess.Popen(
        [sys.executable, "-m", "qm_client", *args],
        stdin=subprocess.PIPE,
        stdout=on_terminal.get("stdout", subprocess.PIPE),
        stderr=on_terminal.get("stderr", subprocess.PIPE),
        env=client_env(server),
        cwd=ROOT,
    )
    os.close(replica)
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    piped, piped_err = process.communicate(stdin.encode(), timeout=60)
    reader.join(timeout=30)
    os.close(master)
    other = piped if stream == "stderr" else piped_err
    return process.returncode, shown.decode().replace("\r\n", "\n"), other.decode()


def test_login_tells_the_servers_limits(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(max_batch=10, max_request_bytes=64 * KIB)
    with raw_stub(server) as stub:
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        password = encrypt_password(challenge, server.admin_password)
        reply = stub.Auth(pb.AuthRequest(username="admin", password=password))
    assert (reply.code, reply.max_batch, reply.max_request_bytes) == (pb.CODE_OK, 10, 64 * KIB)
    with connect(server) as qm:
        assert qm.server_limits == ServerLimits(max_batch=10, max_request_bytes=64 * KIB)


def test_map_load_batched_to_the_servers_limits(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(max_batch=10, max_request_bytes=64 * KIB)
    many = {f"k{i:02}": str(i) for i in range(35)}
    # Without --batched a load larger than one call is refused whole, as before.
    stderr = failed(
        run_qm(server, "map", "load", "m", stdin=json.dumps(many)), 1, "INVALID_ARGUMENT"
    )
    assert "pass --batched to load them in 4 batches" in stderr
    result = run_qm(server, "map", "load", "m", "--batched", stdin=json.dumps(many))
    assert ok(result) == "loaded 35 key(s) into m in 4 batches\n"  # piped: no progress
    # Large values: batches cut by the request size, not the count (60 KiB fit a request).
    large = {f"big{i:02}": "x" * (10 * KIB) for i in range(20)}
    result = run_qm(server, "map", "load", "big", "--batched", stdin=json.dumps(large))
    assert ok(result) == "loaded 20 key(s) into big in 4 batches\n"
    with connect(server) as qm:
        assert qm.map("m").to_dict() == many
        assert qm.map("big").to_dict() == large


def test_map_load_shows_progress_on_a_terminal(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(max_batch=10)
    many = json.dumps({f"k{i:02}": str(i) for i in range(25)})
    status, shown, out = run_on_terminal(
        server, "map", "load", "m", "--batched", stdin=many, stream="stderr"
    )
    assert (status, out) == (0, "loaded 25 key(s) into m in 3 batches\n")
    assert shown == "".join(f"\rloaded {n}/25 key(s) into m" for n in (10, 20, 25)) + "\n"


def test_add_from_a_file_batches_and_sums_up_on_a_terminal(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server(max_batch=10)
    with connect(server) as qm:
        qm.new_queue("jobs")
        first = qm.add("jobs", "first")
    lines = "".join(f"line {i}\n" for i in range(25))  # 25 elements of 6 or 7 bytes
    status, shown, err = run_on_terminal(server, "add", "jobs", stdin=lines, stream="stdout")
    assert (status, err) == (0, "")
    assert (
        shown
        == f"added 25 element(s), 165 bytes, to jobs: ids {first + 1} to {first + 25} (3 batches)\n"
    )
    # Piped, the ids as before, one a line; and progress only on a terminal's stderr.
    assert ok(run_qm(server, "add", "jobs", stdin="a\nb\n")) == f"{first + 26}\n{first + 27}\n"
    status, shown, out = run_on_terminal(server, "add", "jobs", stdin=lines, stream="stderr")
    assert status == 0
    assert out.splitlines() == [str(first + 28 + i) for i in range(25)]
    assert shown == "".join(f"\radded {n}/25 element(s) to jobs" for n in (10, 20, 25)) + "\n"
    with connect(server) as qm:
        assert qm.size("jobs") == 1 + 25 + 2 + 25


def test_the_default_target_is_where_the_server_listens_by_default() -> None:
    listen = {f.name: f.default for f in dataclasses.fields(ServerConfig)}["listen"]
    assert DEFAULT_SERVER == listen == "127.0.0.1:50051"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_plaintext_client_of_a_tls_server_is_told_to_use_tls(
    make_server: Callable[..., ServerHandle], pki: dict[str, Path]
) -> None:
    server = make_server(tls=TlsSettings(pki["server_cert"], pki["server_key"]))
    result = run_qm(server, "--timeout", "3", "queue", "list")
    assert result.returncode == 4
    assert result.stderr.startswith("qm: UNAVAILABLE: ")
    assert result.stderr.splitlines()[-1] == (
        "qm: hint: the server speaks TLS: pass --ca-cert FILE (the CA that signed its certificate)"
    )


def test_a_tls_client_of_a_plaintext_server_is_told_to_leave_tls_out(
    server: ServerHandle, pki: dict[str, Path]
) -> None:
    for command in (["queue", "list"], ["health"]):
        result = run_qm(server, "--timeout", "3", "--ca-cert", str(pki["ca"]), *command)
        assert result.returncode == 4
        assert result.stderr.splitlines()[-1] == (
            "qm: hint: the server speaks plaintext: leave out --ca-cert, --cert and --key"
        )


def test_nothing_listening_is_said_so(server: ServerHandle) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = run_qm(server, "--timeout", "3", "queue", "list", QM_SERVER=target)
    assert result.returncode == 4
    assert result.stderr.splitlines()[-1] == (
        f"qm: hint: nothing answers at {target}: is the server running? "
        "(it listens on 127.0.0.1:50051 unless given --listen)"
    )


@pytest.mark.parametrize("tls", [False, True])
def test_matching_protocols_get_no_hint(
    make_server: Callable[..., ServerHandle], pki: dict[str, Path], tls: bool
) -> None:
    """A server that answers in the client's protocol gets no hint, even when a call
    fails for another reason (here: mutual TLS without a client certificate)."""
    settings = TlsSettings(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    server = make_server(tls=settings) if tls else make_server()
    args = ["--ca-cert", str(pki["ca"])] if tls else []
    target = f"localhost:{server.port}"
    result = run_qm(server, "--timeout", "3", *args, "queue", "list", QM_SERVER=target)
    if tls:
        assert result.returncode == 4
        assert "hint" not in result.stderr
    else:
        assert (result.returncode, result.stderr) == (0, "")
