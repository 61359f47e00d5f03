"""What every client of ours needs: a stub, and the two-step login (challenge, then Auth).

The aio clients here cannot use qm_client's (blocking) session, but share its key check
and password envelope.
"""

from __future__ import annotations

from typing import Any

import grpc

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client._login import check_server_key, encrypt_password

LOGIN_TIMEOUT_S = 30.0
"""Generous: password hashing is deliberately slow and the machine is shared."""


def new_stub(channel: grpc.aio.Channel) -> Any:
    """An aio stub typed Any: the generated stub's typing changes with the generator."""
    stub_class: Any = pb_grpc.QueueManagerServiceStub
    return stub_class(channel)


class LoginFailed(RuntimeError):
    """Auth did not answer CODE_OK; the benchmark cannot run without a session."""


async def login(stub: Any, username: str, password: str) -> str:
    """Returns a session token; stub is an aio QueueManagerServiceStub."""
    challenge = await stub.GetChallenge(pb.GetChallengeRequest(), timeout=LOGIN_TIMEOUT_S)
    sealed = encrypt_password(check_server_key(challenge, None), password, challenge.challenge)
    answer = await stub.Auth(
        pb.AuthRequest(username=username, password=sealed), timeout=LOGIN_TIMEOUT_S
    )
    if answer.code != pb.CODE_OK:
        raise LoginFailed(f"Auth answered {pb.Code.Name(answer.code)}: {answer.message}")
    return str(answer.token)
