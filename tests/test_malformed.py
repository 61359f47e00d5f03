"""Bytes that are not a valid request get a clean INVALID_ARGUMENT and no traceback."""

from __future__ import annotations

import logging

import grpc
import pytest

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["QueueManagerService"]
UNARY = [m.name for m in SERVICE.methods if not m.client_streaming]
BAD_BYTES = {
    "garbage": b"\xff\xff\xff\xff",
    "truncated": pb.AddRequest(token="t", queue_name="q", element="x" * 50).SerializeToString()[
        :20
    ],
    "bad utf-8": b"\x0a\x02\xc3\x28",  # field 1 (a string everywhere) holds invalid UTF-8
}


@pytest.mark.parametrize("method", UNARY)
def test_every_method_rejects_bad_bytes(
    method: str, server: ServerHandle, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/qm.v1.QueueManagerService/{method}"
    )
    for what, data in BAD_BYTES.items():
        if method == "GetChallenge" and what != "garbage":
            continue  # GetChallengeRequest has no fields: unknown fields parse fine
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert f"request is not a valid qm.v1.{method}Request" in str(caught.value.details())
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    # The server still serves.
    stub = pb_grpc.QueueManagerServiceStub(channel)
    assert stub.GetChallenge(pb.GetChallengeRequest()).code == pb.CODE_OK
