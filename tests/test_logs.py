"""Logs: JSON or text lines, a request id on each line about a call, audit events that
name who did what from where and never a secret, and no grpc C-core line in between.

The scenario runs `qm-server --log-format json` as a process, as an operator would, and
parses every line it wrote to stderr.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_fixtures import ROOT, client_env, run
from server_process import ServerProcess, qm_server

from conftest import ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import audit, call_context
from qm_server.logs import quiet_grpc_core

Stub = pb_grpc.QueueManagerServiceStub
ADMIN_PASSWORD = "admin-pw-Zq81"
BOB_PASSWORD = "bob-pw-Kx27"
WRONG_PASSWORD = "wrong-pw-Jm55"
PAYLOAD = "payload-Vb90"
VALUE = "map-value-Ht34"
FAST = ["--rsa-bits", "2048"]


def metadata(request_id: str) -> tuple[tuple[str, str]]:
    return ((call_context.REQUEST_ID_KEY, request_id),)


def auth(stub: Stub, user: str, password: str, request_id: str) -> pb.AuthResponse:
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    ciphertext = encrypt_password(challenge, password)
    return stub.Auth(
        pb.AuthRequest(username=user, password=ciphertext), metadata=metadata(request_id)
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed: a line that is not one JSON object fails the test."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(line, dict) for line in lines)
    return lines


@pytest.fixture
def json_server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path / "data",
        *FAST,
        "--log-format",
        "json",
        # A second failure of one user from all hosts crosses the ceiling: that call logs
        # a warning besides its login.failed, and the user's host backs off at once.
        "--user-login-failures",
        "1",
        env={"QM_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    yield proc.start()
    proc.stop()


def test_json_log_of_a_scenario(json_server: ServerProcess, tmp_path: Path) -> None:
    data = str(json_server.data_dir)
    added = qm_server(
        "--log-format", "json", "user", "add", "bob", "--password-stdin", "--data-dir", data,
        stdin=BOB_PASSWORD + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    granted = qm_server("--log-format", "json", "user", "grant", "bob", "read", "queue", "b.*",
                        "--data-dir", data)  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    commands = json_lines(added.stderr + granted.stderr)
    assert [(c["event"], c["user"]) for c in commands] == [
        ("user.added", "bob"),
        ("grant.added", "bob"),
    ]
    assert commands[1]["pattern"] == "b.*" and commands[1]["action"] == "read"
    assert BOB_PASSWORD not in added.stderr + added.stdout

    with grpc.insecure_channel(json_server.target) as channel:
        stub = Stub(channel)
        admin = auth(stub, "admin", ADMIN_PASSWORD, "login-admin").token
        for attempt in range(3):
            answer = auth(stub, "mallory", WRONG_PASSWORD, f"guess-{attempt}")
            expected = pb.CODE_RESOURCE_EXHAUSTED if attempt == 2 else pb.CODE_UNAUTHENTICATED
            assert answer.code == expected, answer
        bob = auth(stub, "bob", BOB_PASSWORD, "login-bob").token
        denied = stub.NewQueue(
            pb.NewQueueRequest(token=bob, queue_name="jobs"), metadata=metadata("deny-1")
        )
        assert denied.code == pb.CODE_PERMISSION_DENIED
        opening = pb.SubscribeOpen(token=bob, queue_name="jobs", max_unacked=1)
        stream = stub.Subscribe(
            iter([pb.SubscribeRequest(open=opening)]), metadata=metadata("sub-1"), timeout=30
        )
        assert next(stream).code == pb.CODE_PERMISSION_DENIED
        stream.cancel()
        token, jobs = admin, "jobs"
        calls: list[tuple[str, Any, Any]] = [
            ("create-q", stub.NewQueue, pb.NewQueueRequest(token=token, queue_name=jobs)),
            ("add", stub.Add, pb.AddRequest(token=token, queue_name=jobs, element=PAYLOAD)),
            ("purge", stub.Purge, pb.PurgeRequest(token=token, queue_name=jobs)),
            ("destroy-q", stub.DestroyQueue, pb.DestroyQueueRequest(token=token, queue_name=jobs)),
            ("put-1", stub.MapPut, pb.MapPutRequest(token=token, map="m", key="k", value=VALUE)),
            ("put-2", stub.MapPut, pb.MapPutRequest(token=token, map="m", key="j", value=VALUE)),
            ("destroy-m", stub.MapDestroy, pb.MapDestroyRequest(token=token, map="m")),
        ]
        for request_id, method, request in calls:
            assert method(request, metadata=metadata(request_id)).code == pb.CODE_OK
        # No id, and an id that would forge a log line: the server makes its own.
        stub.NewQueue(pb.NewQueueRequest(token=bob, queue_name="q2"))
        stub.NewQueue(
            pb.NewQueueRequest(token=bob, queue_name="q3"),
            metadata=metadata('x" forged\\nline'),
        )
        stub.Logout(pb.LogoutRequest(token=admin), metadata=metadata("logout"))
    assert json_server.terminate() == 0

    log = json_server.log()
    lines = json_lines(log)
    events = [line for line in lines if "event" in line]
    assert all(e["logger"] == "qm_server.audit" and e["level"] == "INFO" for e in events)
    by_id = {e.get("request_id"): e for e in events}
    peer = re.compile(r"ipv4:127\.0\.0\.1:\d+")

    def event(request_id: str, name: str, **fields: object) -> None:
        found = by_id[request_id]
        assert found["event"] == name
        assert peer.fullmatch(found["peer"]), found
        for key, value in fields.items():
            assert found[key] == value, (key, found)

    event("login-admin", "login.ok", user="admin", rpc="Auth")
    event("guess-0", "login.failed", user="mallory", reason="no such user")
    event("guess-2", "login.throttled", user="mallory")
    event("login-bob", "login.ok", user="bob")
    event("deny-1", "permission.denied", user="bob", action="manage", queue="jobs")
    event("sub-1", "permission.denied", user="bob", action="read", rpc="Subscribe")
    event("create-q", "queue.created", user="admin", queue="jobs", rpc="NewQueue")
    event("purge", "queue.purged", user="admin", queue="jobs", purged=1)
    event("destroy-q", "queue.destroyed", user="admin", queue="jobs")
    event("put-1", "map.created", user="admin", map="m")
    event("destroy-m", "map.destroyed", user="admin", map="m")
    event("logout", "session.ended", user="admin", reason="logged_out")
    assert "put-2" not in by_id  # the map existed: nothing created
    assert "add" not in by_id  # an add is no audit event

    # The call that crossed the ceiling logged two lines, tied by its request id.
    guess = [line for line in lines if line.get("request_id") == "guess-1"]
    assert [line.get("event") for line in guess] == ["login.failed", None]
    assert guess[1]["level"] == "WARNING" and "mallory" in guess[1]["message"]
    # Denials of calls without a sane id: ids of the server's own, all different.
    denials = [e for e in events if e["event"] == "permission.denied"]
    made = [e["request_id"] for e in denials[2:]]
    assert len(made) == 2 and len(set(made)) == 2
    assert all(re.fullmatch(r"[0-9a-f]{16}", m) for m in made)
    # Lines not about a call have no request id.
    serving = next(line for line in lines if line["message"].startswith("serving"))
    assert "request_id" not in serving and "time" in serving

    for secret in (ADMIN_PASSWORD, BOB_PASSWORD, WRONG_PASSWORD, PAYLOAD, VALUE, admin, bob):
        assert secret not in log


def test_text_log_shows_request_ids_and_events(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", *FAST, env={"QM_ADMIN_PASSWORD": ADMIN_PASSWORD})
    try:
        proc.start()
        with grpc.insecure_channel(proc.target) as channel:
            stub = Stub(channel)
            assert auth(stub, "admin", ADMIN_PASSWORD, "text-login").code == pb.CODE_OK
        assert proc.terminate() == 0
    finally:
        proc.stop()
    lines = proc.log().splitlines()
    assert any(
        re.fullmatch(
            r"\S+ \S+ INFO qm_server\.audit \[text-login\]: "
            r"login\.ok user='admin' session='\w+' peer='ipv4:127\.0\.0\.1:\d+'",
            line,
        )
        for line in lines
    ), lines
    assert any(" INFO qm_server.server [-]: serving plaintext" in line for line in lines)
    assert ADMIN_PASSWORD not in proc.log()


def test_grpc_core_lines_stay_out_of_a_json_log(tmp_path: Path, pki: dict[str, Path]) -> None:
    """A plaintext client reaching a TLS server: grpc's C core would write `I... Handshake
    failed ...` lines of its own to the server's stderr."""
    proc = ServerProcess(
        tmp_path / "data",
        *FAST,
        "--log-format",
        "json",
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
        env={"QM_ADMIN_PASSWORD": ADMIN_PASSWORD, "GRPC_VERBOSITY": "", "GRPC_TRACE": ""},
    )
    try:
        proc.start()
        with grpc.insecure_channel(proc.target) as channel, pytest.raises(grpc.RpcError):
            Stub(channel).GetChallenge(pb.GetChallengeRequest(), timeout=5)
        assert proc.terminate() == 0
    finally:
        proc.stop()
    assert "Handshake" not in proc.log()
    assert json_lines(proc.log())


def test_cli_stderr_has_only_its_own_message(server: ServerHandle, pki: dict[str, Path]) -> None:
    """`qm` with TLS against a plaintext server: grpc's C core would write two `I...
    Handshake failed` lines before the command's message."""
    env = client_env(server)
    for name in ("GRPC_VERBOSITY", "GRPC_TRACE"):
        env.pop(name, None)
    qm = [sys.executable, "-m", "qm_client", "--ca-cert", str(pki["ca"]), "--timeout", "3"]
    result = run([*qm, "queue", "list"], env)
    assert result.returncode == 4
    assert result.stderr.startswith("qm: UNAVAILABLE: ")
    lines = result.stderr.splitlines()
    assert all(line.startswith("qm: ") for line in lines), result.stderr
    assert (
        lines[-1] == "qm: hint: the server speaks plaintext: leave out --ca-cert, --cert and --key"
    )


def test_cli_entry_point_is_the_quiet_one() -> None:
    """The installed `qm` script runs the entry point that keeps C-core lines out."""
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'qm = "qm_client._cli_entry:main"' in scripts


def test_internal_error_incident_is_the_request_id(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = server.thread.server.engine  # type: ignore[union-attr]
    assert engine is not None

    async def broken(*args: object) -> None:
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(engine, "heartbeat", broken)
    with grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", server.admin_password)
        answer = stub.HeartBeat(pb.HeartBeatRequest(token=token), metadata=metadata("boom-42"))
        unnamed = stub.HeartBeat(pb.HeartBeatRequest(token=token))
    assert answer.code == pb.CODE_INTERNAL
    assert answer.message == "internal error (incident boom-42)"
    assert any(
        r.getMessage() == "internal error boom-42 in HeartBeatResponse" for r in caplog.records
    )
    assert re.fullmatch(r"internal error \(incident [0-9a-f]{16}\)", unnamed.message)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("two words", False),
        ("line\nbreak", False),
        ('quote"', False),
    ],
)
def test_only_a_sane_request_id_is_kept(sent: str, kept: bool) -> None:
    made = call_context.request_id_of([("other", "x"), (call_context.REQUEST_ID_KEY, sent)])
    assert (made == sent) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{16}", made)


def test_audit_fields_cannot_shadow_record_attributes() -> None:
    with pytest.raises(ValueError, match="clash"):
        audit.record(audit.Event.QUEUE_CREATED, name="jobs")


def test_grpc_core_quieted_unless_the_operator_asked() -> None:
    env: dict[str, str] = {}
    quiet_grpc_core(env)
    assert env == {"GRPC_VERBOSITY": "NONE"}
    for asked in ({"GRPC_VERBOSITY": "ERROR"}, {"GRPC_TRACE": "api"}):
        given = dict(asked)
        quiet_grpc_core(given)
        assert given == asked


def test_server_main_imports_no_grpc_before_it_quiets_it() -> None:
    """GRPC_VERBOSITY works only if set before grpc is first imported."""
    code = "import sys, qm_server.__main__; print('grpc' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.stdout.strip() == "False", result.stderr


def test_readme_names_every_audit_event() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| `event` |") :].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (.+?) \|", table, flags=re.MULTILINE)[2:]
    named = {name for row in rows for name in re.findall(r"`([a-z_]+\.[a-z_]+)`", row)}
    assert named == {event.value for event in audit.Event}
    reasons = re.search(r"^\| `session\.ended` \|.*$", table, flags=re.MULTILINE)
    assert reasons is not None
    assert {r.value for r in audit.EndReason} <= set(re.findall(r"`(\w+)`", reasons[0]))
