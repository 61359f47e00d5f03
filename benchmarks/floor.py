"""The floor: a gRPC server that does no work, so it shows what grpcio alone costs.

It serves the same service and message shapes as ours, from the same grpcio and the same
server flavour (grpc.aio), so "ours / floor" isolates what our server adds: auth, rules,
storage and fsync. It keeps no state: Poll always has a message and acks always succeed.
Run it as ``python -m benchmarks.floor --port-file FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

GRPC_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_send_message_length", -1)]
"""The options qm_server sets that could change a hot path, so both servers match."""
Ctx = Any
"""The servicer context; its generated type changes with the stub generator's version."""
SUBSCRIBE_DEFAULT_WINDOW = 100
"""Window used when a Subscribe open asks for none, like a server default would be."""


class FloorServicer(pb_grpc.QueueManagerServiceServicer):
    """Answers every call with a well-formed response and nothing else.

    Ids still increase so that the responses are the same size as a real server's; the
    element is built once so that no per-call allocation beyond protobuf's own is measured.
    """

    def __init__(self, element_size: int) -> None:
        self._element = "x" * element_size
        self._next_id = 0
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._challenge = pb.GetChallengeResponse(
            public_key_pem=pem.decode(),
            fingerprint="0" * 64,
            algorithm="RSA-OAEP-SHA256",
            challenge=os.urandom(32),
            challenge_ttl_ms=60_000,
        )

    def _ids(self, n: int) -> range:
        first = self._next_id + 1
        self._next_id += n
        return range(first, first + n)

    def _infos(self, n: int) -> list[pb.ElementInfo]:
        return [
            pb.ElementInfo(element=self._element, message_id=i, delivery_count=1)
            for i in self._ids(n)
        ]

    async def GetChallenge(
        self, request: pb.GetChallengeRequest, context: Ctx
    ) -> pb.GetChallengeResponse:
        return self._challenge

    async def Auth(self, request: pb.AuthRequest, context: Ctx) -> pb.AuthResponse:
        return pb.AuthResponse(token="floor-token", session_ttl_ms=30_000)

    async def HeartBeat(self, request: pb.HeartBeatRequest, context: Ctx) -> pb.HeartBeatResponse:
        return pb.HeartBeatResponse()

    async def Logout(self, request: pb.LogoutRequest, context: Ctx) -> pb.LogoutResponse:
        return pb.LogoutResponse()

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Ctx
    ) -> pb.ListSessionsResponse:
        return pb.ListSessionsResponse()

    async def EndSession(
        self, request: pb.EndSessionRequest, context: Ctx
    ) -> pb.EndSessionResponse:
        return pb.EndSessionResponse()

    async def NewQueue(self, request: pb.NewQueueRequest, context: Ctx) -> pb.NewQueueResponse:
        return pb.NewQueueResponse()

    async def DestroyQueue(
        self, request: pb.DestroyQueueRequest, context: Ctx
    ) -> pb.DestroyQueueResponse:
        return pb.DestroyQueueResponse()

    async def Size(self, request: pb.SizeRequest, context: Ctx) -> pb.SizeResponse:
        return pb.SizeResponse(size=0)

    async def Add(self, request: pb.AddRequest, context: Ctx) -> pb.AddResponse:
        return pb.AddResponse(message_id=self._ids(1)[0])

    async def AddAll(self, request: pb.AddAllRequest, context: Ctx) -> pb.AddAllResponse:
        return pb.AddAllResponse(message_ids=self._ids(len(request.elements)))

    async def Poll(self, request: pb.PollRequest, context: Ctx) -> pb.PollResponse:
        return pb.PollResponse(element=self._element, message_id=self._ids(1)[0], delivery_count=1)

    async def PullElements(
        self, request: pb.PullElementsRequest, context: Ctx
    ) -> pb.PullElementsResponse:
        n = max(1, request.number)
        return pb.PullElementsResponse(element_info=self._infos(n), number=n)

    async def Ack(self, request: pb.AckRequest, context: Ctx) -> pb.AckResponse:
        return pb.AckResponse()

    async def BatchAck(self, request: pb.BatchAckRequest, context: Ctx) -> pb.BatchAckResponse:
        return pb.BatchAckResponse(
            results=[pb.AckResult(message_id=i) for i in request.message_ids]
        )

    async def IsEmpty(self, request: pb.IsEmptyRequest, context: Ctx) -> pb.IsEmptyResponse:
        return pb.IsEmptyResponse(empty=True)

    async def GetUncheckNum(
        self, request: pb.GetUncheckNumRequest, context: Ctx
    ) -> pb.GetUncheckNumResponse:
        return pb.GetUncheckNumResponse()

    async def MapPut(self, request: pb.MapPutRequest, context: Ctx) -> pb.MapPutResponse:
        return pb.MapPutResponse()

    async def MapRemove(self, request: pb.MapRemoveRequest, context: Ctx) -> pb.MapRemoveResponse:
        return pb.MapRemoveResponse()

    async def MapGet(self, request: pb.MapGetRequest, context: Ctx) -> pb.MapGetResponse:
        return pb.MapGetResponse(value="")

    async def MapGetAll(self, request: pb.MapGetAllRequest, context: Ctx) -> pb.MapGetAllResponse:
        return pb.MapGetAllResponse()

    async def MapDestroy(
        self, request: pb.MapDestroyRequest, context: Ctx
    ) -> pb.MapDestroyResponse:
        return pb.MapDestroyResponse()

    async def MapGetList(
        self, request: pb.MapGetListRequest, context: Ctx
    ) -> pb.MapGetListResponse:
        return pb.MapGetListResponse(offset=request.offset)

    async def MapBatchPut(
        self, request: pb.MapBatchPutRequest, context: Ctx
    ) -> pb.MapBatchPutResponse:
        return pb.MapBatchPutResponse()

    # The lifecycle calls are not on any measured path: empty answers keep the servicer whole.

    async def UpdateQueue(
        self, request: pb.UpdateQueueRequest, context: Ctx
    ) -> pb.UpdateQueueResponse:
        return pb.UpdateQueueResponse()

    async def GetQueueInfo(
        self, request: pb.GetQueueInfoRequest, context: Ctx
    ) -> pb.GetQueueInfoResponse:
        return pb.GetQueueInfoResponse()

    async def ExtendLease(
        self, request: pb.ExtendLeaseRequest, context: Ctx
    ) -> pb.ExtendLeaseResponse:
        return pb.ExtendLeaseResponse()

    async def Purge(self, request: pb.PurgeRequest, context: Ctx) -> pb.PurgeResponse:
        return pb.PurgeResponse()

    async def Redrive(self, request: pb.RedriveRequest, context: Ctx) -> pb.RedriveResponse:
        return pb.RedriveResponse()

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Ctx
    ) -> pb.ListDeadLettersResponse:
        return pb.ListDeadLettersResponse()

    async def ListQueues(
        self, request: pb.ListQueuesRequest, context: Ctx
    ) -> pb.ListQueuesResponse:
        return pb.ListQueuesResponse()

    async def ListMaps(self, request: pb.ListMapsRequest, context: Ctx) -> pb.ListMapsResponse:
        return pb.ListMapsResponse()

    async def Subscribe(
        self, request_iterator: Any, context: Ctx
    ) -> AsyncIterator[pb.SubscribeResponse]:
        """Pushes a full window, then as many new messages as each ack frees: real flow control."""
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            yield pb.SubscribeResponse(code=pb.CODE_INVALID_ARGUMENT)
            return
        window = first.open.max_unacked or SUBSCRIBE_DEFAULT_WINDOW
        yield pb.SubscribeResponse(element_info=self._infos(window))
        async for req in request_iterator:
            freed = len(req.ack.message_ids)
            if freed:
                yield pb.SubscribeResponse(element_info=self._infos(freed))


async def serve(listen: str, port_file: Path, element_size: int) -> None:
    """Serves until SIGTERM/SIGINT; the port file is written only once the port is bound."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    register: Any = pb_grpc.add_QueueManagerServiceServicer_to_server
    register(FloorServicer(element_size), server)
    port = server.add_insecure_port(listen)
    await server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--element-size", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.port_file, args.element_size))


if __name__ == "__main__":
    main()
