"""Which calls the client retries, against a server scripted to fail at the transport.

The real server cannot be told to answer gRPC UNAVAILABLE on demand, so this module runs a
real gRPC server with a scripted servicer: it logs anyone in and fails chosen methods with
UNAVAILABLE a chosen number of times, counting attempts. Channel, retry policy and client
are the real ones.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client import QueueManagerClient, Unavailable
from qm_client._channel import RETRY_POLICY
from qm_client._login import fingerprint_of


class ScriptedServicer(pb_grpc.QueueManagerServiceServicer):
    """Logs anyone in; fails a method with UNAVAILABLE ``failures[method]`` times."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.failures: dict[str, int] = {}
        self.attempts: Counter[str] = Counter()
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
        return pb.AuthResponse(token="t", session_ttl_ms=60_000)

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


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedServicer, str]]:
    # Only the scripted methods exist; the others answer UNIMPLEMENTED, as the base does.
    servicer = ScriptedServicer()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_QueueManagerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def qm(scripted: tuple[ScriptedServicer, str]) -> Iterator[QueueManagerClient]:
    servicer, target = scripted
    servicer.failures.clear()
    servicer.attempts.clear()
    with QueueManagerClient(target, "anyone", "anything", heartbeat=False) as client:
        yield client


def test_idempotent_call_is_retried_through_unavailable(
    scripted: tuple[ScriptedServicer, str], qm: QueueManagerClient
) -> None:
    servicer, _ = scripted
    servicer.failures["Size"] = 2
    assert qm.size("jobs") == 7
    assert servicer.attempts["Size"] == 3


def test_retries_stop_at_the_policy_limit(
    scripted: tuple[ScriptedServicer, str], qm: QueueManagerClient
) -> None:
    servicer, _ = scripted
    servicer.failures["MapGet"] = 100
    with pytest.raises(Unavailable) as caught:
        qm.map("m")["k"]
    assert caught.value.grpc_status == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["MapGet"] == RETRY_POLICY["maxAttempts"]


@pytest.mark.parametrize("method", ["Add", "Poll"])
def test_non_idempotent_calls_are_not_retried(
    scripted: tuple[ScriptedServicer, str], qm: QueueManagerClient, method: str
) -> None:
    servicer, _ = scripted
    servicer.failures[method] = 1
    with pytest.raises(Unavailable):
        if method == "Add":
            qm.add("jobs", "x")
        else:
            qm.poll("jobs")
    assert servicer.attempts[method] == 1
