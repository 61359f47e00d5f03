"""Helpers shared by the client, CLI, example and Node tests.

Plain functions rather than fixtures, so that each test module declares the fixtures it
uses in plain sight (and linters do not see imported fixtures as unused).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client import QueueManagerClient, SessionLoss
from qm_client._login import fingerprint_of

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "admin"
# Generous: a subprocess imports grpc and cryptography and logs in; on a loaded 2-core
# machine that can take seconds. Only a hang should ever reach it.
SUBPROCESS_TIMEOUT = 60.0


def add_user(server: ServerHandle, name: str, password: str) -> None:
    """A user with no grants, through the server's own command line."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "qm_server",
            "user",
            "add",
            name,
            "--password-stdin",
            "--data-dir",
            str(server.data_dir),
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=True,
    )


def connect(server: ServerHandle, **kwargs: Any) -> QueueManagerClient:
    """A client logged in as the admin of ``server``."""
    return QueueManagerClient(server.target, ADMIN, server.admin_password, **kwargs)


@contextmanager
def raw_stub(server: ServerHandle) -> Iterator[pb_grpc.QueueManagerServiceStub]:
    """The bare generated stub, to check what the client did from the outside."""
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.QueueManagerServiceStub(channel)


def server_fingerprint(server: ServerHandle) -> str:
    """The login key's fingerprint, computed from the key the server hands out."""
    with raw_stub(server) as stub:
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
    key = serialization.load_pem_public_key(challenge.public_key_pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)
    return fingerprint_of(key)


class ScriptedServicer(pb_grpc.QueueManagerServiceServicer):
    """A stand-in server for what the real one cannot be made to do on demand.

    Logs anyone in (tokens t1, t2, ... in login order) and fails a method with gRPC
    UNAVAILABLE ``failures[method]`` times, counting attempts. Only the methods defined
    here exist; the others answer UNIMPLEMENTED, as the generated base does.
    """

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.failures: dict[str, int] = {}
        self.attempts: Counter[str] = Counter()
        self.logins = 0
        self._lock = threading.Lock()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.attempts[method] += 1
            failing = self.failures.get(method, 0) > 0
            if failing:
                self.failures[method] -= 1
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")

    def GetChallenge(
        self, request: pb.GetChallengeRequest, context: grpc.ServicerContext
    ) -> pb.GetChallengeResponse:
        public = self.key.public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pb.GetChallengeResponse(
            public_key_pem=pem.decode(),
            fingerprint=fingerprint_of(public),
            algorithm="RSA-OAEP-SHA256",
            challenge=secrets.token_bytes(32),
            challenge_ttl_ms=60_000,
        )

    def Auth(self, request: pb.AuthRequest, context: grpc.ServicerContext) -> pb.AuthResponse:
        with self._lock:
            self.logins += 1
            return pb.AuthResponse(token=f"t{self.logins}", session_ttl_ms=60_000)

    def Logout(self, request: pb.LogoutRequest, context: grpc.ServicerContext) -> pb.LogoutResponse:
        return pb.LogoutResponse()

    def Size(self, request: pb.SizeRequest, context: grpc.ServicerContext) -> pb.SizeResponse:
        self._attempt("Size", context)
        return pb.SizeResponse(size=7)

    def MapGet(self, request: pb.MapGetRequest, context: grpc.ServicerContext) -> pb.MapGetResponse:
        self._attempt("MapGet", context)
        return pb.MapGetResponse(value="v")

    def Add(self, request: pb.AddRequest, context: grpc.ServicerContext) -> pb.AddResponse:
        self._attempt("Add", context)
        return pb.AddResponse(message_id=1)

    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollResponse:
        self._attempt("Poll", context)
        return pb.PollResponse(code=pb.CODE_QUEUE_EMPTY)


@contextmanager
def scripted_server(servicer: ScriptedServicer) -> Iterator[str]:
    """Serve ``servicer`` on a free local port; yields the target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_QueueManagerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


class LossRecorder:
    """An ``on_session_lost`` callback whose calls a test can wait for."""

    def __init__(self) -> None:
        self.losses: list[SessionLoss] = []
        self.called = threading.Event()

    def __call__(self, loss: SessionLoss) -> None:
        self.losses.append(loss)
        self.called.set()


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qm-heartbeat-")]


def client_env(server: ServerHandle, **extra: str | None) -> dict[str, str]:
    """The environment a user of ``qm`` or an example would set up; ``None`` unsets."""
    env = dict(os.environ)
    for name in ("QM_SERVER", "QM_USER", "QM_PASSWORD", "QM_PIN"):
        env.pop(name, None)
    env.update(
        QM_SERVER=server.target,
        QM_USER=ADMIN,
        QM_PASSWORD=server.admin_password,
        PYTHONPATH=str(ROOT),
    )
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run(
    command: Sequence[str],
    env: dict[str, str],
    stdin: str | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, detached from any terminal (so nothing prompts)."""
    return subprocess.run(
        list(command),
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=SUBPROCESS_TIMEOUT,
        start_new_session=True,
        check=False,
    )


def run_qm(
    server: ServerHandle, *args: str, stdin: str | None = None, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """``qm ARGS...`` against ``server``, as a subprocess."""
    return run([sys.executable, "-m", "qm_client", *args], client_env(server, **env), stdin)
