"""Static types for the generated stub.

``grpc_tools`` writes ``queue_manager_pb2_grpc.py`` without type information, so every
stub attribute would be ``Any`` and mypy could not tell a SizeResponse from an AckResponse.
This protocol restates the RPC signatures; the generated stub satisfies it.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

_U = grpc.UnaryUnaryMultiCallable
_S = grpc.StreamStreamMultiCallable


class Stub(Protocol):
    """The RPCs of ``qm.v1.QueueManagerService`` with their request and response types."""

    GetChallenge: _U[pb.GetChallengeRequest, pb.GetChallengeResponse]
    Auth: _U[pb.AuthRequest, pb.AuthResponse]
    HeartBeat: _U[pb.HeartBeatRequest, pb.HeartBeatResponse]
    Logout: _U[pb.LogoutRequest, pb.LogoutResponse]
    NewQueue: _U[pb.NewQueueRequest, pb.NewQueueResponse]
    Add: _U[pb.AddRequest, pb.AddResponse]
    AddAll: _U[pb.AddAllRequest, pb.AddAllResponse]
    Poll: _U[pb.PollRequest, pb.PollResponse]
    PullElements: _U[pb.PullElementsRequest, pb.PullElementsResponse]
    Ack: _U[pb.AckRequest, pb.AckResponse]
    BatchAck: _U[pb.BatchAckRequest, pb.BatchAckResponse]
    Size: _U[pb.SizeRequest, pb.SizeResponse]
    IsEmpty: _U[pb.IsEmptyRequest, pb.IsEmptyResponse]
    DestroyQueue: _U[pb.DestroyQueueRequest, pb.DestroyQueueResponse]
    GetUncheckNum: _U[pb.GetUncheckNumRequest, pb.GetUncheckNumResponse]
    MapPut: _U[pb.MapPutRequest, pb.MapPutResponse]
    MapRemove: _U[pb.MapRemoveRequest, pb.MapRemoveResponse]
    MapGet: _U[pb.MapGetRequest, pb.MapGetResponse]
    MapGetAll: _U[pb.MapGetAllRequest, pb.MapGetAllResponse]
    MapDestroy: _U[pb.MapDestroyRequest, pb.MapDestroyResponse]
    MapGetList: _U[pb.MapGetListRequest, pb.MapGetListResponse]
    MapBatchPut: _U[pb.MapBatchPutRequest, pb.MapBatchPutResponse]
    Subscribe: _S[pb.SubscribeRequest, pb.SubscribeResponse]


def make_stub(channel: grpc.Channel) -> Stub:
    """The generated stub, typed."""
    # The generated constructor is untyped; the annotation above is what this module adds.
    stub: Stub = pb_grpc.QueueManagerServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub
