"""Registers the servicer with gRPC so that a malformed request is a clean INVALID_ARGUMENT.

The generated `add_QueueManagerServiceServicer_to_server` parses requests with
`FromString`; bytes that do not parse (garbage, truncation, invalid UTF-8 in a string
field) raise inside grpcio, which answers UNKNOWN and logs a traceback for what is only a
client's mistake. Here each request parser returns a `Malformed` marker instead, and the
method is answered with gRPC INVALID_ARGUMENT naming the problem: the service never got to
judge the request, so per the contract it is a gRPC status, not a response code.

Every method, unary or streaming, first tags its task with the call (call_context.py), so
that each log line about the call carries its request id, malformed requests' included.

A call whose outcome the store cannot tell (errors.OutcomeUnknown: the database connection
broke while a commit was in flight) is answered here with the gRPC status UNAVAILABLE, not
a response code: CODE_UNAVAILABLE promises that nothing was applied, while the status
tells the client what a lost answer tells it, that the call may have taken effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from qm.v1 import queue_manager_pb2 as pb
from qm_server import call_context, errors

SERVICE = pb.DESCRIPTOR.services_by_name["QueueManagerService"]


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request that did not parse."""

    type_name: str
    reason: str

    def describe(self) -> str:
        return f"request is not a valid {self.type_name}: {self.reason}"


def _parser(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Malformed(
                name, str(exc).removeprefix(f"Error parsing message with type '{name}': ")
            )

    return parse


def _guard_unary(behavior: Callable[..., Any], rpc: str) -> Callable[..., Any]:
    async def handle(
        request: Message | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        call_context.enter(context, rpc)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        try:
            return await behavior(request, context)
        except errors.OutcomeUnknown as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    return handle


def _tagged_stream(behavior: Callable[..., AsyncGenerator[Any]], rpc: str) -> Callable[..., Any]:
    """A streaming method, its task tagged with the call first. An async generator in
    turn (grpc runs any other callable as a synchronous handler), closing the method's
    at once when it is closed, as grpc would have closed the method's itself."""

    async def handle(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call_context.enter(context, rpc)
        try:
            async with contextlib.aclosing(behavior(requests, context)) as responses:
                async for response in responses:
                    yield response
        except errors.OutcomeUnknown as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    return handle


def register(servicer: object, server: grpc.aio.Server) -> None:
    """Add every method of QueueManagerService, as the generated function would."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        parse = _parser(request_type)
        serialize = response_type.SerializeToString
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _tagged_stream(behavior, method.name),
                request_deserializer=parse,
                response_serializer=serialize,
            )
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(behavior, method.name),
                request_deserializer=parse,
                response_serializer=serialize,
            )
        else:  # pragma: no cover - the contract has no such method
            raise TypeError(f"unsupported streaming shape for {method.name}")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


async def checked(
    requests: AsyncIterator[Message | Malformed], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    """A streaming method's requests, ending the call with INVALID_ARGUMENT on bad bytes."""
    async for request in requests:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        yield request
