"""What every client of ours needs: a stub, and the two-step login (challenge, then Auth)."""

from __future__ import annotations

from typing import Any

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

LOGIN_TIMEOUT_S = 30.0
"""Generous: password hashing is deliberately slow and the machine is shared."""


def new_stub(channel: grpc.aio.Channel) -> Any:
    """An aio stub typed Any: the generated stub's typing changes with the generator."""
    stub_class: Any = pb_grpc.QueueManagerServiceStub
    return stub_class(channel)


class LoginFailed(RuntimeError):
    """Auth did not answer CODE_OK; the benchmark cannot run without a session."""


def seal_password(public_key_pem: str, password: str, challenge: bytes) -> bytes:
    """Encrypts the envelope as the contract says: RSA-OAEP, SHA-256, MGF1-SHA-256."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        raise LoginFailed("server key is not RSA")
    envelope = pb.PasswordEnvelope(password=password, challenge=challenge).SerializeToString()
    return key.encrypt(
        envelope,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )


async def login(stub: Any, username: str, password: str) -> str:
    """Returns a session token; stub is an aio QueueManagerServiceStub."""
    challenge = await stub.GetChallenge(pb.GetChallengeRequest(), timeout=LOGIN_TIMEOUT_S)
    sealed = seal_password(challenge.public_key_pem, password, challenge.challenge)
    answer = await stub.Auth(
        pb.AuthRequest(username=username, password=sealed), timeout=LOGIN_TIMEOUT_S
    )
    if answer.code != pb.CODE_OK:
        raise LoginFailed(f"Auth answered {pb.Code.Name(answer.code)}: {answer.message}")
    return str(answer.token)
