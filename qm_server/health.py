"""The standard `grpc.health.v1.Health` service (Check, List, Watch), with Watch streams
that end at the drain.

grpcio-health-checking's servicer was used before. Two of its ways hurt a server that
drains: a Watch stream never ends by itself, so every shutdown with a watching client
(grpc's client-side health checking, a proxy) lasted the whole `--grace`; and it writes to
a watcher while holding the lock that setting a status needs, so a watcher that stopped
reading could hold up the drain's NOT_SERVING. Here a watcher is written to outside the
lock, and told NOT_SERVING once more at the drain, after which its stream ends with OK.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = int(health_pb2.HealthCheckResponse.SERVING)
NOT_SERVING = int(health_pb2.HealthCheckResponse.NOT_SERVING)
SERVICE_UNKNOWN = int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
# Trailing metadata of a Check answered NOT_SERVING: why, for people (the health protocol
# has no field for it). `grpcurl -v` shows it.
REASON_KEY = "qm-not-serving-reason"
DRAINING = "the server is shutting down"


class HealthService:
    """Check and Watch over a status per service name, set by the server. Registered with
    `add_to`: grpcio-health-checking ships no type hints to subclass its base with."""

    def __init__(self, services: Iterable[str] = ()) -> None:
        """`services` are known from the start, NOT_SERVING until set: a Check made while
        the server is still starting is told so, not NOT_FOUND."""
        self._statuses: dict[str, int] = dict.fromkeys(services, NOT_SERVING)
        self._reasons: dict[str, str] = {}
        self._draining = False
        # Guards _statuses and _draining; notified whenever either changes. (It binds to
        # the event loop that first uses it, so it may be made before the loop runs.)
        self._changed = asyncio.Condition()

    async def set(self, service: str, status: int, reason: str = "") -> None:
        """Ignored once draining: a recovered store must not turn a stopping server SERVING.
        `reason` says why a status other than SERVING (Check's trailing metadata)."""
        async with self._changed:
            if not self._draining:
                self._statuses[service] = status
                self._reasons[service] = reason
                self._changed.notify_all()

    async def drain(self) -> None:
        """NOT_SERVING for every service from now on, and every Watch stream ends."""
        async with self._changed:
            self._draining = True
            for service in self._statuses:
                self._statuses[service] = NOT_SERVING
                self._reasons[service] = DRAINING
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        reason = self._reasons.get(request.service, "")
        if status != SERVING and reason:
            context.set_trailing_metadata(((REASON_KEY, _header_value(reason)),))
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service, status in self._statuses.items():
            response.statuses[service].status = status
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """The status now, then each change; at the drain NOT_SERVING, then the end."""
        sent: int | None = None
        while True:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._news, request.service, sent))
                status = self._status_of(request.service)
                draining = self._draining
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if draining:
                return

    def _status_of(self, service: str) -> int:
        return self._statuses.get(service, SERVICE_UNKNOWN)

    def _news(self, service: str, sent: int | None) -> bool:
        """Whether a watcher that last sent `sent` has something to do."""
        return self._draining or self._status_of(service) != sent

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)


def _header_value(text: str) -> str:
    """Metadata values are printable ASCII on one line."""
    one_line = " ".join(text.split())
    return one_line.encode("ascii", "backslashreplace").decode()
