"""Which calls the client retries, against a server scripted to fail at the transport.

The real server cannot be told to answer gRPC UNAVAILABLE on demand, so this module runs a
real gRPC server with a scripted servicer that fails chosen methods a chosen number of
times and counts attempts. Channel, retry policy and client are the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from client_fixtures import ScriptedServicer, scripted_server

from qm_client import QueueManagerClient, Unavailable
from qm_client._channel import RETRY_POLICY


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedServicer, str]]:
    servicer = ScriptedServicer()  # type: ignore[abstract]
    with scripted_server(servicer) as target:
        yield servicer, target


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
