"""Login abuse: nobody can keep a user out, refusals are cheap, and attacks are logged.

The server listens on `localhost`, which binds both 127.0.0.1 and [::1]: a channel to
each is a distinct client host (`ipv4:127.0.0.1` and `ipv6:[::1]`) to the throttles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_engine import FakeClock as EngineClock
from test_engine import log_in, run
from user_directory import as_user_command

from conftest import FAST_AUTH, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import errors
from qm_server.auth import PasswordHasher
from qm_server.config import AuthSettings
from qm_server.engine import Engine
from qm_server.store.base import UserRecord

Stub = pb_grpc.QueueManagerServiceStub


@contextmanager
def hosts(handle: ServerHandle) -> Iterator[tuple[Stub, Stub]]:
    """Stubs from two client hosts: IPv4 loopback and IPv6 loopback."""
    with (
        grpc.insecure_channel(f"127.0.0.1:{handle.port}") as v4,
        grpc.insecure_channel(f"[::1]:{handle.port}") as v6,
    ):
        yield Stub(v4), Stub(v6)


def auth(stub: Stub, user: str, password: str) -> pb.AuthResponse:
    challenge = stub.GetChallenge(pb.GetChallengeRequest())
    ciphertext = encrypt_password(challenge, password)
    return stub.Auth(pb.AuthRequest(username=user, password=ciphertext), timeout=30)


def add_user(handle: ServerHandle, name: str, password: str) -> None:
    """A user with no grants, written as `qm-server user add` writes it."""
    hashed = PasswordHasher.from_settings(FAST_AUTH).hash(password)
    record = UserRecord(name, hashed, is_admin=False)
    as_user_command(handle.data_dir, lambda users: users.create_user(record))


def test_failures_from_one_host_do_not_lock_the_user_out_of_another(
    make_server: Callable[..., ServerHandle],
) -> None:
    """A throttle keyed by the user name let anyone keep admin out for as long as they
    went on failing as admin at the pace the throttle allowed."""
    handle = make_server(listen="localhost:0")
    with hosts(handle) as (home, attacker):
        codes = [auth(attacker, "admin", f"guess-{i}").code for i in range(6)]
        assert codes == [pb.CODE_UNAUTHENTICATED] * 5 + [pb.CODE_RESOURCE_EXHAUSTED]
        # The guessing host stays throttled, even with the right password ...
        assert auth(attacker, "admin", handle.admin_password).code == pb.CODE_RESOURCE_EXHAUSTED
        # ... and the user logs in from elsewhere at once.
        assert auth(home, "admin", handle.admin_password).code == pb.CODE_OK


def test_a_flood_from_one_host_does_not_delay_a_login_from_another(
    make_server: Callable[..., ServerHandle],
) -> None:
    """Every call of a burst passed the throttle check before the first failed, so each
    did the RSA decryption and the password hash: 200 garbage calls delayed a good login
    from another host by seconds. Real scrypt cost here (n = 2**14), as in production."""
    settings = dataclasses.replace(
        FAST_AUTH, scrypt_n=AuthSettings().scrypt_n, host_failures_before_backoff=5
    )
    handle = make_server(listen="localhost:0", auth=settings)
    flood_size = 200
    with hosts(handle) as (home, attacker):
        challenge = home.GetChallenge(pb.GetChallengeRequest())
        good = encrypt_password(challenge, handle.admin_password)
        flood = [
            attacker.Auth.future(
                pb.AuthRequest(username=f"user-{i}", password=os.urandom(256)), timeout=60
            )
            for i in range(flood_size)
        ]
        flood[0].result()  # the server is at work on the flood
        started = time.monotonic()
        reply = home.Auth(pb.AuthRequest(username="admin", password=good), timeout=30)
        took = time.monotonic() - started
        codes = [call.result().code for call in flood]
    assert reply.code == pb.CODE_OK
    assert took < 1.0
    # Judged one at a time, so exactly as many were judged as the host throttle allows;
    # the rest were refused before any expensive work.
    assert codes.count(pb.CODE_UNAUTHENTICATED) == settings.host_failures_before_backoff
    assert codes.count(pb.CODE_RESOURCE_EXHAUSTED) == (
        flood_size - settings.host_failures_before_backoff
    )


def test_failures_throttling_and_denials_are_logged_without_secrets(
    make_server: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    handle = make_server(listen="localhost:0")
    add_user(handle, "bob", "bob-secret")
    caplog.set_level(logging.INFO)
    with hosts(handle) as (home, attacker):
        wrong = "wrong-password-123"
        for _ in range(6):
            auth(attacker, "admin", wrong)
        admin = login(home, "admin", handle.admin_password)
        bob = login(home, "bob", "bob-secret")
        denied = home.NewQueue(pb.NewQueueRequest(token=bob, queue_name="jobs"))
        assert denied.code == pb.CODE_PERMISSION_DENIED
    events = [vars(r) for r in caplog.records if r.name == "qm_server.audit"]
    failed = [e for e in events if e["event"] == "login.failed"]
    assert failed[0]["user"] == "admin" and failed[0]["reason"] == "wrong password"
    throttled = [e for e in events if e["event"] == "login.throttled"]
    assert throttled[0]["user"] == "admin"
    assert throttled[0]["reason"] == "failures of this user from this host"
    assert throttled[0]["failures"] == 5
    denials = [e for e in events if e["event"] == "permission.denied"]
    assert [(e["user"], e["action"], e["queue"]) for e in denials] == [("bob", "manage", "jobs")]
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (wrong, handle.admin_password, "bob-secret", admin, bob):
        assert secret not in text


def test_a_login_abandoned_while_it_hashes_keeps_its_host_s_turn_until_the_hash_ends(
    tmp_path: Path,
) -> None:
    """A call whose deadline ends while its hash runs leaves the hash running. Had its
    host's turn ended with the call, the host's next call would start more work at once,
    and calls with short deadlines (never judged, so never throttled) could pile up work
    in the pool in front of everyone else's logins."""

    async def scenario(engine: Engine, clock: EngineClock) -> None:
        release = threading.Event()
        entered = threading.Event()
        submitted: list[str] = []
        pool = engine._crypto_pool
        original_submit = pool.submit

        def counting_submit(work: Callable[..., Any], /, *args: Any) -> Any:
            submitted.append(getattr(work, "__name__", "?"))
            return original_submit(work, *args)

        class HeldHasher:
            def verify(self, password: str, stored: str | None) -> bool:
                entered.set()
                release.wait(10)
                return False

        pool.submit = counting_submit  # type: ignore[method-assign,assignment]
        engine._hasher = HeldHasher()  # type: ignore[assignment]
        first = asyncio.ensure_future(log_in(engine, "x", peer="h"))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        first.cancel()  # the client's deadline, while the hash runs
        second = asyncio.ensure_future(log_in(engine, "x", peer="h"))
        for _ in range(50):  # ample turns of the loop for the second to start its work
            await asyncio.sleep(0)
        assert submitted == ["_open_envelope", "verify"]  # the second has not started
        assert not first.done()  # the first waits for its hash
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(errors.Unauthenticated):
            await second
        assert len(submitted) == 4

    run(tmp_path, scenario)
