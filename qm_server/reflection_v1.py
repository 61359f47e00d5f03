"""Server reflection under its stable name, `grpc.reflection.v1`, beside `v1alpha`.

grpcio-reflection (1.85 and before) serves only `grpc.reflection.v1alpha.ServerReflection`.
Newer tools ask for `grpc.reflection.v1` first (grpcurl from 1.8.8, Postman, grpcui),
and some ask for nothing else. The two protocols are the same messages with the same
field numbers under another package (v1 is v1alpha promoted), so the library's own
servicer answers both: its messages travel unchanged under the v1 method name. The v1
file descriptor is made from v1alpha's by renaming its package, and added to the pool,
so that reflection can describe the v1 service as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
V1_PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Put grpc/reflection/v1/reflection.proto into `pool`, unless something did already."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.options.Clear()  # v1alpha's Java and Go package names
    old, new = f".{V1ALPHA_PACKAGE}.", f".{V1_PACKAGE}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # set on message and enum fields only
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


class ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The library's servicer, which also finds the file of a method: grpcurl's `describe
    qm.v1.QueueManagerService.Poll` asks for the file containing that symbol, and the
    pool (upb) finds services and messages by name, not methods."""

    def _file_containing_symbol(self, request: Any, name: str) -> Any:
        # Not a method: the library's own lookup, and its NOT_FOUND.
        with contextlib.suppress(KeyError):
            name = self._pool.FindMethodByName(name).containing_service.full_name
        return super()._file_containing_symbol(request, name)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Reflection (v1 and v1alpha) listing `service_names` and both reflection services."""
    add_v1_descriptor(descriptor_pool.Default())
    servicer = ReflectionServicer([*service_names, reflection.SERVICE_NAME, SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE_NAME, {"ServerReflectionInfo": handler})]
    )
