"""The challenge login: GetChallenge, check the key, encrypt the envelope, Auth.

Sans-IO: both clients send the two calls themselves and hand the answers here.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from qm.v1 import queue_manager_pb2 as pb

from ._message import Login
from ._session_core import Endpoint
from .errors import FingerprintMismatch, QMError, error_for_code

ALGORITHM = "RSA-OAEP-SHA256"


@dataclass(frozen=True)
class ServerKey:
    """The server's public key as the client checked it."""

    public_key: rsa.RSAPublicKey
    fingerprint: str


def normalize_fingerprint(fingerprint: str) -> str:
    """Accept the forms people paste (upper case, ``aa:bb:..``, ``sha256:`` prefix)."""
    text = fingerprint.strip().lower().removeprefix("sha256:")
    return text.replace(":", "").replace(" ", "")


def fingerprint_of(public_key: rsa.RSAPublicKey) -> str:
    """Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo, as the contract defines it."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def check_server_key(challenge: pb.GetChallengeResponse, pin: str | None) -> ServerKey:
    """Load the key from a challenge and, when pinned, refuse any other key.

    The fingerprint is computed here from the PEM rather than taken from the response: a
    server that swapped its key could claim any fingerprint.
    """
    if challenge.algorithm != ALGORITHM:
        raise QMError(f"server offers login algorithm {challenge.algorithm!r}, not {ALGORITHM}")
    key = serialization.load_pem_public_key(challenge.public_key_pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        raise QMError("server key is not an RSA key")
    actual = fingerprint_of(key)
    if pin is not None and not hmac.compare_digest(actual, normalize_fingerprint(pin)):
        raise FingerprintMismatch(
            f"server key fingerprint {actual} does not match the pinned one; password not sent"
        )
    return ServerKey(public_key=key, fingerprint=actual)


def encrypt_password(key: ServerKey, password: str, challenge: bytes) -> bytes:
    """The Auth.password ciphertext: a serialized PasswordEnvelope under RSA-OAEP-SHA256."""
    envelope = pb.PasswordEnvelope(password=password, challenge=challenge)
    return key.public_key.encrypt(
        envelope.SerializeToString(),
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()),
            algorithm=hashes.SHA256(),
            label=None,
        ),
    )


def auth_request(challenge: pb.GetChallengeResponse, endpoint: Endpoint) -> pb.AuthRequest:
    """The Auth call answering ``challenge``: its key checked against the pinned
    fingerprint, the password sealed with the challenge (so a captured Auth cannot be
    replayed)."""
    if challenge.code != pb.CODE_OK:
        raise error_for_code(challenge.code, challenge.message)
    key = check_server_key(challenge, endpoint.pin_fingerprint)
    password = encrypt_password(key, endpoint.password, challenge.challenge)
    return pb.AuthRequest(username=endpoint.username, password=password)


def login_from(response: pb.AuthResponse, generation: int) -> Login:
    """The login an Auth answer gives; its typed error if refused."""
    if response.code != pb.CODE_OK:
        raise error_for_code(response.code, response.message)
    return Login(
        token=response.token,
        ttl=response.session_ttl_ms / 1000,
        generation=generation,
        max_batch=response.max_batch,
        max_request_bytes=response.max_request_bytes,
    )
