"""The standard health and reflection services, as grpcurl and load balancers use them."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import ServerHandle, make_config
from qm_server.health import HealthService
from qm_server.server import SERVICE_NAME, QueueManagerServer
from qm_server.store.sqlite import SqliteStore


def test_health_serves_both_names(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "qm.v1.QueueManagerService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME == "qm.v1.QueueManagerService"


def test_reflection_lists_and_describes_the_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"qm.v1.QueueManagerService", "grpc.health.v1.Health"} <= services
    descriptor = database.FindFileContainingSymbol("qm.v1.QueueManagerService")
    assert descriptor.package == "qm.v1"
    methods = {m.name for s in descriptor.service for m in s.method}
    assert {"GetChallenge", "Auth", "Add", "Poll", "MapBatchPut", "DestroyQueue"} <= methods


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_check_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as failure:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_list_names_both_services(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in reply.statuses.items()} == {
        "": SERVING,
        SERVICE_NAME: SERVING,
    }


def test_a_health_watch_ends_at_the_drain_instead_of_holding_it(
    make_server: Callable[..., ServerHandle],
) -> None:
    """grpc's health servicer kept Watch streams open until the drain's grace ran out, so a
    client watching health (grpc's client-side health checking) made every shutdown last
    the whole --grace. The stream now says NOT_SERVING and ends."""
    handle = make_server()
    with grpc.insecure_channel(handle.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=110
        )
        assert next(stream).status == SERVING
        stopping = concurrent.futures.ThreadPoolExecutor(1)
        # A grace far beyond the test's timeout: the stop must not need it.
        stopped = stopping.submit(handle.thread.stop, 600.0)
        assert [reply.status for reply in stream] == [NOT_SERVING]
        assert stream.code() == grpc.StatusCode.OK
        stopped.result(timeout=60)
        stopping.shutdown()


def test_a_store_failure_during_start_is_not_reported_serving(tmp_path: Path) -> None:
    """The health listener was attached only once the server served: a failure the store
    reported while the server started was missed, and health said SERVING."""

    class FailsWhileStarting(SqliteStore):
        async def open(self) -> None:
            await super().open()
            self._writer._notify_health(False)  # as a failed commit reports it

    async def scenario() -> None:
        server = QueueManagerServer(make_config(tmp_path), FailsWhileStarting(tmp_path))
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                assert reply.status == NOT_SERVING
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_health_is_not_serving_until_the_server_says_so() -> None:
    """Its names are known from the start: a Check while the server still starts is
    NOT_SERVING, not NOT_FOUND."""

    async def check() -> int:
        service = HealthService(("", SERVICE_NAME))
        no_context: Any = None  # not needed for a known service
        reply = await service.Check(health_pb2.HealthCheckRequest(service=""), no_context)
        return int(reply.status)

    assert asyncio.run(check()) == NOT_SERVING


def reflect_v1(channel: grpc.Channel, *requests: Any) -> list[Any]:
    """Requests to grpc.reflection.v1 (the same messages as v1alpha's, under v1's name)."""
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


def test_reflection_v1_lists_and_describes_a_method(channel: grpc.Channel) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest as Request

    listed, method, v1 = reflect_v1(
        channel,
        Request(list_services=""),
        Request(file_containing_symbol="qm.v1.QueueManagerService.HeartBeat"),
        Request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    assert {s.name for s in listed.list_services_response.service} == {
        "qm.v1.QueueManagerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in method.file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].package == "qm.v1"
    (file,) = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in v1.file_descriptor_response.file_descriptor_proto
    ]
    (rpc,) = file.service[0].method
    assert (file.package, rpc.input_type) == (
        "grpc.reflection.v1",
        ".grpc.reflection.v1.ServerReflectionRequest",
    )


def test_reflection_v1alpha_finds_a_method(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert database.FindFileContainingSymbol("qm.v1.QueueManagerService.Poll").package == "qm.v1"
