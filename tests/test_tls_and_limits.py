"""TLS, mutual TLS, the plaintext rule, and a test that hits each transport limit.

grpcio silently ignores a misspelled channel option, so every limit is proven by a call
that runs into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from test_engine import FakeClock, run

from conftest import FAST_AUTH, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.config import KeepaliveSettings, TlsSettings

Stub = pb_grpc.QueueManagerServiceStub


def tls_target(handle: ServerHandle) -> str:
    return f"localhost:{handle.port}"


def test_tls(make_server: Callable[..., ServerHandle], pki: dict[str, Path]) -> None:
    handle = make_server(tls=TlsSettings(pki["server_cert"], pki["server_key"]))
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(tls_target(handle), credentials) as channel:
        login(Stub(channel), "admin", handle.admin_password)
    with grpc.insecure_channel(handle.target) as plain:
        with pytest.raises(grpc.RpcError) as refused:
            Stub(plain).GetChallenge(pb.GetChallengeRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(make_server: Callable[..., ServerHandle], pki: dict[str, Path]) -> None:
    handle = make_server(
        tls=TlsSettings(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    )
    without = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(tls_target(handle), without) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            Stub(channel).GetChallenge(pb.GetChallengeRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes(),
    )
    with grpc.secure_channel(tls_target(handle), with_cert) as channel:
        login(Stub(channel), "admin", handle.admin_password)


def qm_server(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "qm_server",
            "--data-dir",
            str(tmp_path / "d"),
            "--rsa-bits",
            "2048",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_plaintext_off_loopback_needs_a_flag(tmp_path: Path) -> None:
    refused = qm_server(tmp_path, "--listen", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "refusing plaintext on 0.0.0.0:0" in refused.stderr
    half = qm_server(tmp_path, "--tls-key", str(tmp_path / "k.pem"))
    assert half.returncode == 2
    assert "need --tls-cert" in half.stderr


def test_plaintext_flag_warns(
    make_server: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    handle = make_server(listen="0.0.0.0:0", allow_plaintext=True)
    assert "serving PLAINTEXT on 0.0.0.0:0" in caplog.text
    with grpc.insecure_channel(handle.target) as channel:
        login(Stub(channel), "admin", handle.admin_password)


def test_concurrent_rpc_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_concurrent_rpcs=2)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        parked = [
            stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=5000))
            for _ in range(2)
        ]
        # Two long polls plus any third call exceed the limit; which call is refused
        # depends on when grpc counts a finished call out, so collect every refusal.
        refusals: list[grpc.StatusCode] = []
        deadline = time.monotonic() + 4  # the polls wait 5 s
        while not refusals and time.monotonic() < deadline:
            try:
                stub.HeartBeat(pb.HeartBeatRequest(token=token), timeout=5)
            except grpc.RpcError as exc:
                refusals.append(exc.code())
            for call in parked:
                failure = call.exception() if call.done() else None
                if isinstance(failure, grpc.RpcError):
                    refusals.append(failure.code())
        assert refusals
        assert set(refusals) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for call in parked:
            call.cancel()


def test_waiting_poll_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_waiting_polls=1)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        first = stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
        assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK  # parked
        second = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
        assert second.code == pb.CODE_RESOURCE_EXHAUSTED
        assert "waiting long polls (limit)" in second.message
        assert stub.Poll(pb.PollRequest(token=token, queue_name="q")).code == (
            pb.CODE_QUEUE_EMPTY  # a poll that does not wait is not limited
        )
        stub.Add(pb.AddRequest(token=token, queue_name="q", element="x"))
        assert first.result(timeout=10).code == pb.CODE_OK


def test_subscription_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_subscriptions=1)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        stub.Add(pb.AddRequest(token=token, queue_name="q", element="x"))
        opening = pb.SubscribeRequest(
            open=pb.SubscribeOpen(token=token, queue_name="q", max_unacked=1)
        )
        release = threading.Event()

        def requests() -> Iterator[pb.SubscribeRequest]:
            yield opening
            release.wait(10)

        first = stub.Subscribe(requests(), timeout=20)
        assert next(first).code == pb.CODE_OK  # open and holding a message
        second = list(stub.Subscribe(iter([opening]), timeout=20))
        assert [r.code for r in second] == [pb.CODE_RESOURCE_EXHAUSTED]
        release.set()
        first.cancel()


def test_session_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_sessions=2)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        login(stub, "admin", handle.admin_password)
        login(stub, "admin", handle.admin_password)
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        third = stub.Auth(
            pb.AuthRequest(
                username="admin", password=encrypt_password(challenge, handle.admin_password)
            )
        )
        assert third.code == pb.CODE_RESOURCE_EXHAUSTED
        assert "sessions (limit)" in third.message


def test_failed_logins_are_throttled_per_host(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(auth=dataclasses.replace(FAST_AUTH, host_failures_before_backoff=3))
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        for user in ("u1", "u2", "u3"):  # three different users, one host
            challenge = stub.GetChallenge(pb.GetChallengeRequest())
            reply = stub.Auth(
                pb.AuthRequest(username=user, password=encrypt_password(challenge, "x"))
            )
            assert reply.code == pb.CODE_UNAUTHENTICATED
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        fourth = stub.Auth(pb.AuthRequest(username="u4", password=encrypt_password(challenge, "x")))
        assert fourth.code == pb.CODE_RESOURCE_EXHAUSTED


def test_keepalive_abuse_gets_goaway(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(
        keepalive=KeepaliveSettings(min_client_ping_interval_ms=60_000, max_ping_strikes=1)
    )
    pinging = grpc.insecure_channel(
        handle.target,
        options=[
            ("grpc.keepalive_time_ms", 50),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    with pinging, grpc.insecure_channel(handle.target) as calm:
        stub = Stub(pinging)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        with pytest.raises(grpc.RpcError) as cut:
            stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000), timeout=15)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        # A well-behaved client is unaffected.
        assert Stub(calm).GetChallenge(pb.GetChallengeRequest()).code == pb.CODE_OK


def test_password_hashing_concurrency_is_capped(tmp_path: Path) -> None:
    from test_engine import log_in

    async def scenario(engine: object, clock: FakeClock) -> None:
        from qm_server.engine import Engine

        assert isinstance(engine, Engine)
        active = peak = 0
        lock = threading.Lock()
        original = engine._hasher

        class CountingHasher:
            def verify(self, password: str, stored: str | None) -> bool:
                nonlocal active, peak
                with lock:
                    active += 1
                    peak = max(peak, active)
                try:
                    return original.verify(password, stored)
                finally:
                    with lock:
                        active -= 1

        engine._hasher = CountingHasher()  # type: ignore[assignment]
        # From six hosts: logins from one host are judged one at a time anyway.
        await asyncio.gather(*(log_in(engine, peer=f"host-{i}") for i in range(6)))
        assert peak == FAST_AUTH.max_concurrent_hashes == 2

    run(tmp_path, scenario)
