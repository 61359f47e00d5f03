"""The gRPC face of the engine: request -> engine call -> response, nothing more.

Every domain outcome travels in the response's `code` with gRPC status OK (the contract);
`_answer` is the one place that maps engine errors to codes, and the one place where an
unexpected exception becomes CODE_INTERNAL with a logged id instead of a traceback sent to
the client. Subscribe, a stream with two activities, hands its work to subscribe_stream.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import unquote

import grpc
from google.protobuf.message import Message

from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import errors, handlers
from qm_server.engine import Engine
from qm_server.metrics import CallMetrics
from qm_server.subscribe_stream import SubscribeStream
from qm_server.wire import add_element_info, add_results, settings_change, settings_message

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Message)
Context = grpc.aio.ServicerContext[Message, Message]


async def _answer(response_type: type[R], call: Callable[[], Awaitable[R]]) -> R:
    try:
        return await call()
    except errors.QmError as exc:
        return response_type(code=int(exc.code), message=str(exc))
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("internal error %s in %s", incident, response_type.__name__)
        return response_type(code=pb.CODE_INTERNAL, message=f"internal error (incident {incident})")


class _Answerer(Protocol):
    def __call__(
        self, response_type: type[R], call: Callable[[], Awaitable[R]]
    ) -> Awaitable[R]: ...


def _measured(calls: CallMetrics) -> _Answerer:
    """`_answer`, counted by method and code and timed: here rather than in a gRPC
    interceptor, which would wrap every call in a handler and a coroutine of its own and
    would have to read the code back out of the response; here both are at hand."""
    record = calls.record
    clock = time.perf_counter

    async def answer(response_type: type[R], call: Callable[[], Awaitable[R]]) -> R:
        started = clock()
        response = await _answer(response_type, call)
        record(response_type, response.code, clock() - started)  # type: ignore[attr-defined]
        return response

    return answer


def _lease_of(request: pb.PollRequest | pb.PullElementsRequest) -> int | None:
    """The call's own ack deadline, or None for the queue's."""
    return request.ack_deadline_ms if request.HasField("ack_deadline_ms") else None


def peer_address(context: Context) -> str:
    """The caller's address as gRPC names it, port included (`ipv4:127.0.0.1:53422`).

    grpc percent-encodes an IPv6 peer (`ipv6:%5B::1%5D:port`); decoded for people."""
    return unquote(context.peer() or "unknown")


def peer_host(context: Context) -> str:
    """The caller's address without its port: login throttling counts per host."""
    peer = peer_address(context)
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class QueueManagerServicer(pb_grpc.QueueManagerServiceServicer):
    def __init__(
        self, engine: Engine, calls: CallMetrics | None = None, max_request_bytes: int = 0
    ) -> None:
        """`max_request_bytes` is the transport's limit, told to clients at login."""
        self._engine = engine
        self._max_request_bytes = max_request_bytes
        self._calls = calls
        # Without metrics, the bare `_answer`: nothing is added to a call.
        self._answer: _Answerer = _answer if calls is None else _measured(calls)

    async def GetChallenge(
        self, request: pb.GetChallengeRequest, context: Context
    ) -> pb.GetChallengeResponse:
        async def call() -> pb.GetChallengeResponse:
            c = self._engine.get_challenge()
            return pb.GetChallengeResponse(
                public_key_pem=c.public_key_pem,
                fingerprint=c.fingerprint,
                algorithm=c.algorithm,
                challenge=c.challenge,
                challenge_ttl_ms=c.ttl_ms,
            )

        return await self._answer(pb.GetChallengeResponse, call)

    async def Auth(self, request: pb.AuthRequest, context: Context) -> pb.AuthResponse:
        async def call() -> pb.AuthResponse:
            token, ttl_ms = await self._engine.login(
                request.username, request.password, peer_host(context), peer_address(context)
            )
            return pb.AuthResponse(
                token=token,
                session_ttl_ms=ttl_ms,
                max_batch=self._engine.limits.max_batch,
                max_request_bytes=self._max_request_bytes,
            )

        return await self._answer(pb.AuthResponse, call)

    async def HeartBeat(
        self, request: pb.HeartBeatRequest, context: Context
    ) -> pb.HeartBeatResponse:
        async def call() -> pb.HeartBeatResponse:
            status = await self._engine.heartbeat(request.token)
            return pb.HeartBeatResponse(
                session=pb.SessionStatus(
                    session_id=status.session_id,
                    expires_in_ms=int(self._engine.session_ttl_s * 1000),
                    messages_held=status.messages_held,
                    subscriptions=status.subscriptions,
                )
            )

        return await self._answer(pb.HeartBeatResponse, call)

    async def Logout(self, request: pb.LogoutRequest, context: Context) -> pb.LogoutResponse:
        async def call() -> pb.LogoutResponse:
            await self._engine.logout(request.token)
            return pb.LogoutResponse()

        return await self._answer(pb.LogoutResponse, call)

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        async def call() -> pb.ListSessionsResponse:
            sessions, next_start_after = await self._engine.session_admin.list_sessions(
                request.token, request.start_after, request.limit, request.username
            )
            response = pb.ListSessionsResponse(next_start_after=next_start_after)
            add = response.sessions.add
            for s in sessions:
                add(
                    session_id=s.session_id,
                    username=s.username,
                    peer=s.peer,
                    created_at_ms=s.created_at_ms,
                    last_active_at_ms=s.last_active_at_ms,
                    messages_held=s.messages_held,
                    subscriptions=s.subscriptions,
                )
            return response

        return await self._answer(pb.ListSessionsResponse, call)

    async def EndSession(
        self, request: pb.EndSessionRequest, context: Context
    ) -> pb.EndSessionResponse:
        async def call() -> pb.EndSessionResponse:
            await self._engine.session_admin.end_session(request.token, request.session_id)
            return pb.EndSessionResponse()

        return await self._answer(pb.EndSessionResponse, call)

    async def NewQueue(self, request: pb.NewQueueRequest, context: Context) -> pb.NewQueueResponse:
        async def call() -> pb.NewQueueResponse:
            change = settings_change(request.settings) if request.HasField("settings") else None
            await self._engine.new_queue(request.token, request.queue_name, change)
            return pb.NewQueueResponse()

        return await self._answer(pb.NewQueueResponse, call)

    async def Add(self, request: pb.AddRequest, context: Context) -> pb.AddResponse:
        async def call() -> pb.AddResponse:
            added = await self._engine.enqueue(
                request.token,
                request.queue_name,
                [request.element],
                request.delay_ms if request.HasField("delay_ms") else None,
                request.request_id,
            )
            return pb.AddResponse(message_id=added.ids[0], replayed=added.replayed)

        return await self._answer(pb.AddResponse, call)

    async def AddAll(self, request: pb.AddAllRequest, context: Context) -> pb.AddAllResponse:
        async def call() -> pb.AddAllResponse:
            # One list: every later pass (checks, the store) would otherwise convert each
            # element of the repeated field to a str again.
            elements = list(request.elements)
            added = await self._engine.enqueue(
                request.token,
                request.queue_name,
                elements,
                request.delay_ms if request.HasField("delay_ms") else None,
                request.request_id,
            )
            return pb.AddAllResponse(message_ids=added.ids, replayed=added.replayed)

        return await self._answer(pb.AddAllResponse, call)

    async def Poll(self, request: pb.PollRequest, context: Context) -> pb.PollResponse:
        async def call() -> pb.PollResponse:
            (d,) = await self._engine.take(
                request.token, request.queue_name, 1, request.wait_ms, _lease_of(request)
            )
            return pb.PollResponse(
                element=d.element,
                message_id=d.message_id,
                delivery_count=d.delivery_count,
                enqueued_at_ms=d.enqueued_at_ms,
                lease_expires_at_ms=d.lease_expires_at_ms,
            )

        return await self._answer(pb.PollResponse, call)

    async def PullElements(
        self, request: pb.PullElementsRequest, context: Context
    ) -> pb.PullElementsResponse:
        async def call() -> pb.PullElementsResponse:
            deliveries = await self._engine.take(
                request.token,
                request.queue_name,
                request.number,
                request.wait_ms,
                _lease_of(request),
            )
            response = pb.PullElementsResponse(number=len(deliveries))
            add_element_info(response.element_info, deliveries)
            return response

        return await self._answer(pb.PullElementsResponse, call)

    async def Ack(self, request: pb.AckRequest, context: Context) -> pb.AckResponse:
        async def call() -> pb.AckResponse:
            (code,) = await self._engine.ack(request.token, [request.message_id], request.ack_type)
            if code == errors.Code.LEASE_EXPIRED:
                raise errors.LeaseExpired(
                    f"the lease of message {request.message_id} ran out before this ack"
                )
            if code != errors.Code.OK:
                raise errors.MessageNotFound(
                    f"message {request.message_id} is not in flight for your session"
                )
            return pb.AckResponse()

        return await self._answer(pb.AckResponse, call)

    async def BatchAck(self, request: pb.BatchAckRequest, context: Context) -> pb.BatchAckResponse:
        async def call() -> pb.BatchAckResponse:
            message_ids = list(request.message_ids)  # one conversion for every pass below
            codes = await self._engine.ack(request.token, message_ids, request.ack_type)
            response = pb.BatchAckResponse()
            add_results(response.results, zip(message_ids, codes, strict=True))
            return response

        return await self._answer(pb.BatchAckResponse, call)

    async def Size(self, request: pb.SizeRequest, context: Context) -> pb.SizeResponse:
        async def call() -> pb.SizeResponse:
            ready, _ = await self._engine.counts(request.token, request.queue_name)
            return pb.SizeResponse(size=ready)

        return await self._answer(pb.SizeResponse, call)

    async def IsEmpty(self, request: pb.IsEmptyRequest, context: Context) -> pb.IsEmptyResponse:
        async def call() -> pb.IsEmptyResponse:
            ready, _ = await self._engine.counts(request.token, request.queue_name)
            return pb.IsEmptyResponse(empty=ready == 0)

        return await self._answer(pb.IsEmptyResponse, call)

    async def DestroyQueue(
        self, request: pb.DestroyQueueRequest, context: Context
    ) -> pb.DestroyQueueResponse:
        async def call() -> pb.DestroyQueueResponse:
            await self._engine.destroy_queue(request.token, request.queue_name, request.force)
            return pb.DestroyQueueResponse()

        return await self._answer(pb.DestroyQueueResponse, call)

    async def GetUncheckNum(
        self, request: pb.GetUncheckNumRequest, context: Context
    ) -> pb.GetUncheckNumResponse:
        async def call() -> pb.GetUncheckNumResponse:
            _, in_flight = await self._engine.counts(request.token, request.queue_name)
            return pb.GetUncheckNumResponse(ack_num=in_flight)

        return await self._answer(pb.GetUncheckNumResponse, call)

    async def MapPut(self, request: pb.MapPutRequest, context: Context) -> pb.MapPutResponse:
        async def call() -> pb.MapPutResponse:
            await self._engine.map_put(request.token, request.map, [(request.key, request.value)])
            return pb.MapPutResponse()

        return await self._answer(pb.MapPutResponse, call)

    async def MapRemove(
        self, request: pb.MapRemoveRequest, context: Context
    ) -> pb.MapRemoveResponse:
        async def call() -> pb.MapRemoveResponse:
            await self._engine.map_remove(request.token, request.map, request.key)
            return pb.MapRemoveResponse()

        return await self._answer(pb.MapRemoveResponse, call)

    async def MapGet(self, request: pb.MapGetRequest, context: Context) -> pb.MapGetResponse:
        async def call() -> pb.MapGetResponse:
            value = await self._engine.map_get(request.token, request.map, request.key)
            return pb.MapGetResponse(value=value)

        return await self._answer(pb.MapGetResponse, call)

    async def MapGetAll(
        self, request: pb.MapGetAllRequest, context: Context
    ) -> pb.MapGetAllResponse:
        async def call() -> pb.MapGetAllResponse:
            entries = await self._engine.map_get_all(request.token, request.map)
            return pb.MapGetAllResponse(map=entries)

        return await self._answer(pb.MapGetAllResponse, call)

    async def MapDestroy(
        self, request: pb.MapDestroyRequest, context: Context
    ) -> pb.MapDestroyResponse:
        async def call() -> pb.MapDestroyResponse:
            await self._engine.map_destroy(request.token, request.map)
            return pb.MapDestroyResponse()

        return await self._answer(pb.MapDestroyResponse, call)

    async def MapGetList(
        self, request: pb.MapGetListRequest, context: Context
    ) -> pb.MapGetListResponse:
        async def call() -> pb.MapGetListResponse:
            start_after = request.start_after if request.HasField("start_after") else None
            entries, next_key = await self._engine.map_page(
                request.token, request.map, request.offset, request.size, start_after
            )
            return pb.MapGetListResponse(
                offset=request.offset,
                size=len(entries),
                list=[pb.KeyValue(key=k, value=v) for k, v in entries],
                next_key=next_key,
            )

        return await self._answer(pb.MapGetListResponse, call)

    async def MapBatchPut(
        self, request: pb.MapBatchPutRequest, context: Context
    ) -> pb.MapBatchPutResponse:
        async def call() -> pb.MapBatchPutResponse:
            if request.size != len(request.list):
                raise errors.InvalidArgument(
                    f"size is {request.size} but list holds {len(request.list)} pairs"
                )
            pairs = [(kv.key, kv.value) for kv in request.list]
            await self._engine.map_put(request.token, request.map, pairs)
            return pb.MapBatchPutResponse()

        return await self._answer(pb.MapBatchPutResponse, call)

    # Lifecycle RPCs: the rules are the engine's (queue_admin.py for the admin ones).

    async def UpdateQueue(
        self, request: pb.UpdateQueueRequest, context: Context
    ) -> pb.UpdateQueueResponse:
        async def call() -> pb.UpdateQueueResponse:
            settings = await self._engine.admin.update_queue(
                request.token, request.queue_name, settings_change(request.settings)
            )
            response = pb.UpdateQueueResponse()
            settings_message(settings, response.settings)
            return response

        return await self._answer(pb.UpdateQueueResponse, call)

    async def GetQueueInfo(
        self, request: pb.GetQueueInfoRequest, context: Context
    ) -> pb.GetQueueInfoResponse:
        async def call() -> pb.GetQueueInfoResponse:
            report = await self._engine.admin.queue_info(request.token, request.queue_name)
            info = report.info
            response = pb.GetQueueInfoResponse(
                ready=info.counts.ready,
                delayed=info.counts.delayed,
                in_flight=info.counts.in_flight,
                dead_lettered=info.dead_lettered,
                oldest_ready_age_ms=report.oldest_ready_age_ms,
                holding_sessions=info.holding_sessions,
                subscriptions=report.subscriptions,
                dead_letters_held=info.dead_letters_held,
            )
            settings_message(info.settings, response.settings)
            return response

        return await self._answer(pb.GetQueueInfoResponse, call)

    async def ExtendLease(
        self, request: pb.ExtendLeaseRequest, context: Context
    ) -> pb.ExtendLeaseResponse:
        async def call() -> pb.ExtendLeaseResponse:
            message_ids = list(request.message_ids)
            outcomes = await self._engine.extend_lease(
                request.token, message_ids, request.ack_deadline_ms
            )
            response = pb.ExtendLeaseResponse()
            for message_id, outcome in zip(message_ids, outcomes, strict=True):
                response.results.add(
                    message_id=message_id,
                    code=cast(pb.Code, int(outcome.code)),
                    lease_expires_at_ms=outcome.lease_expires_at_ms,
                )
            return response

        return await self._answer(pb.ExtendLeaseResponse, call)

    async def Purge(self, request: pb.PurgeRequest, context: Context) -> pb.PurgeResponse:
        async def call() -> pb.PurgeResponse:
            purged = await self._engine.admin.purge(request.token, request.queue_name)
            return pb.PurgeResponse(purged=purged)

        return await self._answer(pb.PurgeResponse, call)

    async def Redrive(self, request: pb.RedriveRequest, context: Context) -> pb.RedriveResponse:
        async def call() -> pb.RedriveResponse:
            moved, results = await self._engine.admin.redrive(
                request.token, request.queue_name, list(request.message_ids)
            )
            response = pb.RedriveResponse(moved=moved)
            add_results(response.results, results)
            return response

        return await self._answer(pb.RedriveResponse, call)

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        async def call() -> pb.ListDeadLettersResponse:
            letters, next_after_id = await self._engine.admin.dead_letters(
                request.token, request.queue_name, request.after_id, request.limit
            )
            response = pb.ListDeadLettersResponse(next_after_id=next_after_id)
            add = response.dead_letters.add
            for letter in letters:
                add(
                    message_id=letter.message_id,
                    original_queue=letter.original_queue,
                    delivery_count=letter.delivery_count,
                    enqueued_at_ms=letter.enqueued_at_ms,
                    dead_lettered_at_ms=letter.dead_lettered_at_ms,
                    cause=letter.cause,
                    element=letter.element,
                )
            return response

        return await self._answer(pb.ListDeadLettersResponse, call)

    async def ListQueues(
        self, request: pb.ListQueuesRequest, context: Context
    ) -> pb.ListQueuesResponse:
        async def call() -> pb.ListQueuesResponse:
            queues, next_start_after = await self._engine.admin.list_queues(
                request.token, request.start_after, request.limit
            )
            response = pb.ListQueuesResponse(next_start_after=next_start_after)
            add = response.queues.add
            for name, counts in queues:
                add(
                    name=name,
                    ready=counts.ready,
                    in_flight=counts.in_flight,
                    delayed=counts.delayed,
                )
            return response

        return await self._answer(pb.ListQueuesResponse, call)

    async def ListMaps(self, request: pb.ListMapsRequest, context: Context) -> pb.ListMapsResponse:
        async def call() -> pb.ListMapsResponse:
            names, next_start_after = await self._engine.admin.list_maps(
                request.token, request.start_after, request.limit
            )
            return pb.ListMapsResponse(names=names, next_start_after=next_start_after)

        return await self._answer(pb.ListMapsResponse, call)

    async def Subscribe(
        self, request_iterator: AsyncIterator[pb.SubscribeRequest], context: Context
    ) -> AsyncIterator[pb.SubscribeResponse]:
        """The stream's work is SubscribeStream's (subscribe_stream.py); this only ties it
        to the call: its requests, and its end, which stops the stream."""
        stream = SubscribeStream(self._engine, handlers.checked(request_iterator, context))
        # The stubs type the callback as a class of their own; any callable is accepted.
        context.add_done_callback(cast(Any, lambda _: stream.call_ended()))
        calls = self._calls
        if calls is not None:  # counted at open and at end, however it ends
            calls.subscribe_opened.inc()
            context.add_done_callback(cast(Any, lambda _: calls.subscribe_ended.inc()))
        # Closing this generator closes the stream's at once, which stops the stream.
        async with contextlib.aclosing(stream.responses()) as responses:
            async for response in responses:
                yield response
