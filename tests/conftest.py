"""Fixtures that start the real server and log in through real gRPC channels."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certs
import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.config import AuthSettings, Limits, ServerConfig
from qm_server.server import ServerThread

ADMIN_PASSWORD = "admin-secret"
# 2048-bit keys and cheap scrypt keep the many test servers fast; the defaults are tested
# by the subprocess tests.
FAST_AUTH = AuthSettings(rsa_bits=2048, scrypt_n=2**10)
TEST_DISK_RESERVE_BYTES = 1 << 20


@dataclasses.dataclass
class ServerHandle:
    thread: ServerThread
    data_dir: Path
    admin_password: str = ADMIN_PASSWORD

    @property
    def port(self) -> int:
        return self.thread.port

    @property
    def target(self) -> str:
        return self.thread.target

    def stop(self) -> None:
        self.thread.stop()


def encrypt_password(challenge: pb.GetChallengeResponse, password: str) -> bytes:
    key = serialization.load_pem_public_key(challenge.public_key_pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)
    envelope = pb.PasswordEnvelope(password=password, challenge=challenge.challenge)
    return key.encrypt(
        envelope.SerializeToString(),
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        ),
    )


def login(stub: pb_grpc.QueueManagerServiceStub, user: str, password: str) -> str:
    """The two-call login; returns the token (asserts success)."""
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    reply = stub.Auth(pb.AuthRequest(username=user, password=encrypt_password(challenge, password)))
    assert reply.code == pb.CODE_OK, reply.message
    return reply.token


def make_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    """A test configuration; Limits fields may be given directly (max_batch=10)."""
    limit_fields = {f.name for f in dataclasses.fields(Limits)}
    limits = {k: overrides.pop(k) for k in list(overrides) if k in limit_fields}
    overrides.setdefault("auth", FAST_AUTH)
    overrides.setdefault("listen", "127.0.0.1:0")
    overrides.setdefault("admin_password", ADMIN_PASSWORD)
    overrides.setdefault("grace_s", 1.0)
    # The 64 MiB default, allocated by each of hundreds of test servers, adds up.
    overrides.setdefault("disk_reserve_bytes", TEST_DISK_RESERVE_BYTES)
    return ServerConfig(data_dir=data_dir, limits=Limits(**limits), **overrides)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, as PEM files."""
    ca, ca_key = certs.make_ca()
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    server_cert, server_key = certs.write(certs.issue(ca, ca_key, "localhost"), tmp_path, "srv")
    client_cert, client_key = certs.write(certs.issue(ca, ca_key, "client"), tmp_path, "cli")
    return {
        "ca": tmp_path / "ca.crt",
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    """Start servers with config overrides; each is stopped at the end of the test."""
    started: list[ServerHandle] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> ServerHandle:
        directory = data_dir or tmp_path / f"data{len(started)}"
        handle = ServerHandle(ServerThread(make_config(directory, **overrides)).start(), directory)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerHandle]) -> ServerHandle:
    return make_server()


@pytest.fixture
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.QueueManagerServiceStub:
    return pb_grpc.QueueManagerServiceStub(channel)


@pytest.fixture
def token(stub: pb_grpc.QueueManagerServiceStub) -> str:
    return login(stub, "admin", ADMIN_PASSWORD)
