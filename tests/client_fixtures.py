"""Helpers shared by the client, CLI, example and Node tests.

Plain functions rather than fixtures, so that each test module declares the fixtures it
uses in plain sight (and linters do not see imported fixtures as unused).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
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
