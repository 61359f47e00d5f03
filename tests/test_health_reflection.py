"""The standard health and reflection services, as grpcurl and load balancers use them."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from qm_server.server import SERVICE_NAME


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
