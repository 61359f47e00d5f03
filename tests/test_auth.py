"""Login, challenges, tokens and sessions through a real channel."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from conftest import FAST_AUTH, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.engine import LOGIN_FAILED

Stub = pb_grpc.QueueManagerServiceStub


def test_challenge_describes_the_key(stub: Stub) -> None:
    reply = stub.GetChallenge(pb.GetChallengeRequest())
    assert reply.code == pb.CODE_OK
    assert reply.algorithm == "RSA-OAEP-SHA256"
    assert len(reply.challenge) == 32
    assert reply.challenge_ttl_ms == 60_000
    key = serialization.load_pem_public_key(reply.public_key_pem.encode())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert reply.fingerprint == hashlib.sha256(der).hexdigest()
    assert stub.GetChallenge(pb.GetChallengeRequest()).challenge != reply.challenge


def test_login_returns_token_and_ttl(stub: Stub, server: ServerHandle) -> None:
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    reply = stub.Auth(
        pb.AuthRequest(
            username="admin", password=encrypt_password(challenge, server.admin_password)
        )
    )
    assert (reply.code, reply.message, reply.session_ttl_ms) == (pb.CODE_OK, "", 30_000)
    assert len(reply.token) >= 43
    assert stub.HeartBeat(pb.HeartBeatRequest(token=reply.token)).code == pb.CODE_OK


def _auth(stub: Stub, username: str, password: bytes) -> pb.AuthResponse:
    return stub.Auth(pb.AuthRequest(username=username, password=password))


def test_every_login_failure_looks_the_same(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(auth=dataclasses.replace(FAST_AUTH, failures_before_backoff=100))
    channel = grpc.insecure_channel(server.target)
    stub = Stub(channel)

    def fresh(password: str) -> bytes:
        return encrypt_password(stub.GetChallenge(pb.GetChallengeRequest()), password)

    used = stub.GetChallenge(pb.GetChallengeRequest())
    ciphertext = encrypt_password(used, server.admin_password)
    assert _auth(stub, "admin", ciphertext).code == pb.CODE_OK
    failures = [
        _auth(stub, "admin", ciphertext),  # replayed: the challenge is burnt
        _auth(stub, "admin", fresh("wrong")),
        _auth(stub, "nobody", fresh(server.admin_password)),
        _auth(stub, "admin", b"garbage"),
        _auth(stub, "admin", b""),
        _auth(stub, "", fresh(server.admin_password)),
    ]
    assert {(f.code, f.message, f.token) for f in failures} == {
        (pb.CODE_UNAUTHENTICATED, LOGIN_FAILED, "")
    }
    channel.close()


def test_challenge_from_another_key_or_unissued_fails(stub: Stub, server: ServerHandle) -> None:
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    forged = pb.GetChallengeResponse()
    forged.CopyFrom(challenge)
    forged.challenge = b"\x01" * 32
    reply = _auth(stub, "admin", encrypt_password(forged, server.admin_password))
    assert reply.code == pb.CODE_UNAUTHENTICATED


def test_expired_challenge_fails(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(auth=dataclasses.replace(FAST_AUTH, challenge_ttl_s=0.05))
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        assert challenge.challenge_ttl_ms == 50
        ciphertext = encrypt_password(challenge, handle.admin_password)
        time.sleep(0.1)  # the ttl itself is what is under test
        assert _auth(stub, "admin", ciphertext).code == pb.CODE_UNAUTHENTICATED


def test_failed_logins_are_throttled(stub: Stub, server: ServerHandle) -> None:
    codes = []
    for _ in range(6):
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        codes.append(_auth(stub, "admin", encrypt_password(challenge, "wrong")).code)
    assert codes[:5] == [pb.CODE_UNAUTHENTICATED] * 5
    assert codes[5] == pb.CODE_RESOURCE_EXHAUSTED
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    blocked = _auth(stub, "admin", encrypt_password(challenge, server.admin_password))
    assert blocked.code == pb.CODE_RESOURCE_EXHAUSTED
    assert "retry in" in blocked.message


@pytest.mark.parametrize("token", ["", "not-a-token", "x" * 10_000])
def test_bad_tokens_are_unauthenticated(stub: Stub, token: str) -> None:
    replies: list[Any] = [
        stub.HeartBeat(pb.HeartBeatRequest(token=token)),
        stub.Logout(pb.LogoutRequest(token=token)),
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q")),
        stub.Poll(pb.PollRequest(token=token, queue_name="q")),
        stub.Ack(pb.AckRequest(token=token, message_id=1)),
        stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k")),
    ]
    assert [r.code for r in replies] == [pb.CODE_UNAUTHENTICATED] * len(replies)


def test_logout_ends_session_and_releases_messages(stub: Stub, server: ServerHandle) -> None:
    token = login(stub, "admin", server.admin_password)
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="held"))
    held = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
    assert stub.Logout(pb.LogoutRequest(token=token)).code == pb.CODE_OK
    assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_UNAUTHENTICATED
    assert stub.Logout(pb.LogoutRequest(token=token)).code == pb.CODE_UNAUTHENTICATED
    other = login(stub, "admin", server.admin_password)
    again = stub.Poll(pb.PollRequest(token=other, queue_name="q"))
    assert (again.message_id, again.delivery_count) == (held.message_id, 2)


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll a server-side condition (expiry happens on the server's clock)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        threading.Event().wait(0.02)
    return False


def test_idle_session_expires_and_releases(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(session_ttl_s=0.5)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        watcher = login(stub, "admin", handle.admin_password)
        idle = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=watcher, queue_name="q"))
        stub.Add(pb.AddRequest(token=watcher, queue_name="q", element="e"))
        assert stub.Poll(pb.PollRequest(token=idle, queue_name="q")).code == pb.CODE_OK

        def released() -> bool:
            reply = stub.Size(pb.SizeRequest(token=watcher, queue_name="q"))
            return reply.size == 1  # each Size call also keeps the watcher alive

        assert _wait_until(released)
        assert stub.HeartBeat(pb.HeartBeatRequest(token=idle)).code == pb.CODE_UNAUTHENTICATED
        assert stub.HeartBeat(pb.HeartBeatRequest(token=watcher)).code == pb.CODE_OK


def test_heartbeat_keeps_session_beyond_ttl(make_server: Callable[..., ServerHandle]) -> None:
    # A ttl of 2 s with a heartbeat every 0.1 s tolerates a loaded machine's stalls.
    handle = make_server(session_ttl_s=2.0)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        pace = threading.Event()
        started = time.monotonic()
        while time.monotonic() - started < 5.0:  # two and a half ttls
            assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
            pace.wait(0.1)
        assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
