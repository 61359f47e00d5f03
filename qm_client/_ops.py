"""Every client operation as data: the request to send and what its answer becomes.

Sans-IO, so the sync client and the asyncio one are the same code apart from how they
wait: each public method builds an :class:`Op` here and hands it to its session's
``run`` (``Session.run`` blocks, ``AsyncSession.run`` is awaited). The rules of each
operation (request fields, which codes are an answer rather than an error, what a
delivered message records, how a page leads to the next) live here once.

An operation that needs no call (an extension whose messages were all released, an
empty map update) is :class:`Done`; a listing answers a :class:`Page` that names the
call for the next page.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

from qm.v1 import queue_manager_pb2 as pb

from ._lifecycle import (
    AddedIds,
    DeadLetter,
    LeaseResult,
    QueueInfo,
    QueueSettings,
    QueueSummary,
    RedriveResult,
    dead_letter_from_pb,
    lease_result_from_pb,
    queue_info_from_pb,
    redrive_result_from_pb,
    settings_from_pb,
    settings_to_pb,
    summary_from_pb,
)
from ._message import Delivery, Login
from ._session_core import SessionCore
from ._sessions import (
    SessionStatus,
    SessionSummary,
    session_status_from_pb,
    session_summary_from_pb,
)
from .errors import LeaseLost, MessageNotFound, MessageReleased, QMError

_T = TypeVar("_T")
_D = TypeVar("_D", bound=Delivery)


def _reraise(error: QMError) -> NoReturn:
    raise error


@dataclass(frozen=True)
class Op(Generic[_T]):
    """One token call: ``rpc`` (named as in the proto) with ``request``; ``result`` turns
    the answer and the login that got it into what the method returns.

    ``accept``: codes besides OK that are answers, not errors. ``wait``: seconds the
    server may wait before answering, added to the call's deadline. ``bound_to``: the
    login the call only makes sense under (acks). ``failed``: what a failed call returns
    instead, or raises (by default the error itself).
    """

    rpc: str
    request: Any
    result: Callable[[Any, Login], _T]
    accept: tuple[int, ...] = ()
    wait: float = 0.0
    bound_to: Login | None = None
    failed: Callable[[QMError], _T] = field(default=_reraise)


@dataclass(frozen=True)
class Done(Generic[_T]):
    """An operation answered without a call."""

    value: _T


Plan = Op[_T] | Done[_T]


@dataclass(frozen=True)
class Page(Generic[_T]):
    """One page of a listing and the call for the next one (``None`` after the last)."""

    items: list[_T]
    next: Op[Page[_T]] | None


def _nothing(response: object, login: Login) -> None:
    return None


def millis(seconds: float) -> int:
    return round(seconds * 1000)


def optional_millis(seconds: float | None) -> int | None:
    return None if seconds is None else millis(seconds)


def request_id(given: str | None, idempotent: bool) -> str:
    """The request id to send: the caller's, one made up for ``idempotent``, or none."""
    if given:
        return given
    return uuid.uuid4().hex if idempotent else ""


# -- queues ----------------------------------------------------------------------------------


def new_queue(name: str, settings: QueueSettings | None, exist_ok: bool) -> Op[None]:
    request = pb.NewQueueRequest(queue_name=name)
    if settings is not None:
        request.settings.CopyFrom(settings_to_pb(settings))
    accept = (pb.CODE_QUEUE_ALREADY_EXISTS,) if exist_ok else ()
    return Op("NewQueue", request, _nothing, accept=accept)


def update_queue(name: str, settings: QueueSettings) -> Op[QueueSettings]:
    request = pb.UpdateQueueRequest(queue_name=name, settings=settings_to_pb(settings))
    return Op("UpdateQueue", request, lambda r, _: settings_from_pb(r.settings))


def queue_info(name: str) -> Op[QueueInfo]:
    request = pb.GetQueueInfoRequest(queue_name=name)
    return Op("GetQueueInfo", request, lambda r, _: queue_info_from_pb(name, r))


def _listing(
    rpc: str,
    request_for: Callable[[Any], Any],
    items: Callable[[Any], Iterable[_T]],
    cursor_of: Callable[[Any], Any],
    cursor: Any,
) -> Op[Page[_T]]:
    """A paged listing: the call for the page after ``cursor``, whose answer names the
    cursor of the next page (empty or 0 after the last)."""

    def page(response: Any, _: Login) -> Page[_T]:
        after = cursor_of(response)
        more = _listing(rpc, request_for, items, cursor_of, after) if after else None
        return Page(list(items(response)), more)

    return Op(rpc, request_for(cursor), page)


def list_queues(page_size: int) -> Op[Page[QueueSummary]]:
    return _listing(
        "ListQueues",
        lambda cursor: pb.ListQueuesRequest(start_after=cursor, limit=page_size),
        lambda response: map(summary_from_pb, response.queues),
        lambda response: response.next_start_after,
        "",
    )


def list_maps(page_size: int) -> Op[Page[str]]:
    return _listing(
        "ListMaps",
        lambda cursor: pb.ListMapsRequest(start_after=cursor, limit=page_size),
        lambda response: response.names,
        lambda response: response.next_start_after,
        "",
    )


def purge(queue: str) -> Op[int]:
    return Op("Purge", pb.PurgeRequest(queue_name=queue), lambda r, _: r.purged)


def dead_letters(queue: str, page_size: int) -> Op[Page[DeadLetter]]:
    return _listing(
        "ListDeadLetters",
        lambda after: pb.ListDeadLettersRequest(queue_name=queue, after_id=after, limit=page_size),
        lambda response: map(dead_letter_from_pb, response.dead_letters),
        lambda response: response.next_after_id,
        0,
    )


def redrive(queue: str, ids: Iterable[int] | None) -> Op[RedriveResult]:
    request = pb.RedriveRequest(queue_name=queue, message_ids=list(ids or ()))
    return Op("Redrive", request, lambda r, _: redrive_result_from_pb(r))


def size(queue: str) -> Op[int]:
    return Op("Size", pb.SizeRequest(queue_name=queue), lambda r, _: r.size)


def is_empty(queue: str) -> Op[bool]:
    return Op("IsEmpty", pb.IsEmptyRequest(queue_name=queue), lambda r, _: r.empty)


def unacked(queue: str) -> Op[int]:
    return Op("GetUncheckNum", pb.GetUncheckNumRequest(queue_name=queue), lambda r, _: r.ack_num)


def destroy_queue(queue: str, force: bool) -> Op[None]:
    request = pb.DestroyQueueRequest(queue_name=queue, force=force)
    return Op("DestroyQueue", request, _nothing)


# -- messages ---------------------------------------------------------------------------------


def add(
    queue: str, element: str, delay: float | None, given_id: str | None, idempotent: bool
) -> Op[int]:
    request = pb.AddRequest(
        queue_name=queue,
        element=element,
        delay_ms=optional_millis(delay),
        request_id=request_id(given_id, idempotent),
    )
    return Op("Add", request, lambda r, _: r.message_id)


def add_all(
    queue: str,
    elements: Iterable[str],
    delay: float | None,
    given_id: str | None,
    idempotent: bool,
) -> Op[AddedIds]:
    request = pb.AddAllRequest(
        queue_name=queue,
        elements=list(elements),
        delay_ms=optional_millis(delay),
        request_id=request_id(given_id, idempotent),
    )

    def added(response: pb.AddAllResponse, _: Login) -> AddedIds:
        ids = list(response.message_ids)
        return AddedIds(ids, replayed=response.replayed, request_id=request.request_id)

    return Op("AddAll", request, added)


def poll(
    core: SessionCore[_D], queue: str, wait: float, ack_deadline: float | None
) -> Op[_D | None]:
    lease_ms = optional_millis(ack_deadline)
    request = pb.PollRequest(queue_name=queue, wait_ms=millis(wait), ack_deadline_ms=lease_ms)

    def delivered(response: pb.PollResponse, login: Login) -> _D | None:
        if response.code == pb.CODE_QUEUE_EMPTY:
            return None
        return core.hold(login, queue, response, lease_ms=lease_ms)

    return Op("Poll", request, delivered, accept=(pb.CODE_QUEUE_EMPTY,), wait=wait)


def pull(
    core: SessionCore[_D], queue: str, max_count: int, wait: float, ack_deadline: float | None
) -> Op[list[_D]]:
    lease_ms = optional_millis(ack_deadline)
    request = pb.PullElementsRequest(
        queue_name=queue, number=max_count, wait_ms=millis(wait), ack_deadline_ms=lease_ms
    )

    def delivered(response: pb.PullElementsResponse, login: Login) -> list[_D]:
        return [core.hold(login, queue, info, lease_ms=lease_ms) for info in response.element_info]

    return Op("PullElements", request, delivered, accept=(pb.CODE_QUEUE_EMPTY,), wait=wait)


def ack(core: SessionCore[_D], message: Delivery, ack_type: pb.AckType) -> Op[None]:
    """The unary ack or nack of a message the session itself delivered."""
    request, login = core.ack_request(message, ack_type)

    def finished(response: object, _: Login) -> None:
        core.unhold(login, [message.message_id])

    def failed(error: QMError) -> None:
        if isinstance(error, MessageNotFound):
            # Already finished or released: either way no longer held here.
            core.unhold(login, [message.message_id])
        raise error

    return Op("Ack", request, finished, bound_to=login, failed=failed)


def extend_lease(
    core: SessionCore[Any], messages: Iterable[Delivery | int], deadline: float
) -> Plan[list[LeaseResult]]:
    """A result per message, in order; a message whose session ended fails without a call
    (:class:`MessageReleased`). A deadline of 0 gives the messages back, so they are no
    longer the session's to lose."""
    login = core.current()
    order: list[int] = []
    stale: dict[int, LeaseResult] = {}
    for item in messages:
        if isinstance(item, Delivery):
            order.append(item.message_id)
            if item._login is not login:
                released = MessageReleased(
                    f"message {item.message_id}: the session it was delivered to has ended"
                )
                stale[item.message_id] = LeaseResult(item.message_id, released, None)
        else:
            order.append(item)
    ids = [i for i in order if i not in stale]
    if not ids:
        return Done([stale[i] for i in order])
    request = pb.ExtendLeaseRequest(message_ids=ids, ack_deadline_ms=millis(deadline))

    def results(response: pb.ExtendLeaseResponse, _: Login) -> list[LeaseResult]:
        found = dict(stale)
        found.update((r.message_id, lease_result_from_pb(r)) for r in response.results)
        if request.ack_deadline_ms == 0:
            core.unhold(login, [i for i in ids if found[i].ok])
        return [found[i] for i in order]

    return Op("ExtendLease", request, results, bound_to=login)


def split_by_owner(messages: Iterable[_D], owner: object) -> tuple[list[_D], list[_D]]:
    """Messages ``owner`` (the session) delivered, and the others: a subscription's are
    finished on its stream, which must learn that it has room again."""
    batch = list(messages)
    return [m for m in batch if m._owner is owner], [m for m in batch if m._owner is not owner]


def batch_ack(core: SessionCore[_D], batch: list[_D], nack: bool) -> Plan[list[_D]]:
    """Finish messages the session delivered in one BatchAck; answers those that failed
    (released with an ended session, lease lost, or refused by the server)."""
    if not batch:
        return Done([])
    login = core.current()
    failed: list[_D] = []
    current: list[_D] = []
    for message in batch:
        try:
            if message._login is login:
                core.check_lease(message)
                current.append(message)
                continue
        except LeaseLost:
            pass
        failed.append(message)
    if not current:
        return Done(failed)
    by_id = {m.message_id: m for m in current}
    ack_type = pb.ACK_TYPE_ERROR if nack else pb.ACK_TYPE_DONE
    request = pb.BatchAckRequest(message_ids=[m.message_id for m in current], ack_type=ack_type)

    def results(response: pb.BatchAckResponse, _: Login) -> list[_D]:
        core.unhold(login, by_id)
        refused = [r.message_id for r in response.results if r.code != pb.CODE_OK]
        return failed + [by_id[i] for i in refused if i in by_id]

    def released(error: QMError) -> list[_D]:
        if isinstance(error, MessageReleased):
            return failed + current
        raise error

    return Op("BatchAck", request, results, bound_to=login, failed=released)


# -- sessions -----------------------------------------------------------------------------------


def heartbeat() -> Op[SessionStatus]:
    """Renew the session now; answers its status."""
    return Op("HeartBeat", pb.HeartBeatRequest(), lambda r, _: session_status_from_pb(r.session))


def list_sessions(username: str, page_size: int) -> Op[Page[SessionSummary]]:
    return _listing(
        "ListSessions",
        lambda after: pb.ListSessionsRequest(start_after=after, limit=page_size, username=username),
        lambda response: map(session_summary_from_pb, response.sessions),
        lambda response: response.next_start_after,
        0,
    )


def end_session(session_id: int) -> Op[None]:
    return Op("EndSession", pb.EndSessionRequest(session_id=session_id), _nothing)


# -- maps -------------------------------------------------------------------------------------


def map_get(name: str, key: str) -> Op[str]:
    return Op("MapGet", pb.MapGetRequest(map=name, key=key), lambda r, _: r.value)


def map_put(name: str, key: str, value: str) -> Op[None]:
    return Op("MapPut", pb.MapPutRequest(map=name, key=key, value=value), _nothing)


def map_remove(name: str, key: str) -> Op[None]:
    return Op("MapRemove", pb.MapRemoveRequest(map=name, key=key), _nothing)


def map_put_all(name: str, pairs: Mapping[str, str]) -> Plan[None]:
    """One atomic MapBatchPut; nothing to set makes no call (the server refuses an empty
    batch)."""
    if not pairs:
        return Done(None)
    entries = [pb.KeyValue(key=k, value=v) for k, v in pairs.items()]
    request = pb.MapBatchPutRequest(map=name, size=len(entries), list=entries)
    return Op("MapBatchPut", request, _nothing)


def map_get_all(name: str) -> Op[dict[str, str]]:
    return Op("MapGetAll", pb.MapGetAllRequest(map=name), lambda r, _: dict(r.map))


def map_page(name: str, offset: int, size: int) -> Op[list[tuple[str, str]]]:
    request = pb.MapGetListRequest(map=name, offset=offset, size=size)
    return Op("MapGetList", request, lambda r, _: [(kv.key, kv.value) for kv in r.list])


def map_page_after(
    name: str, key: str | None, size: int
) -> Op[tuple[list[tuple[str, str]], str | None]]:
    # "" is a key like any other, so the first page is asked for by offset 0 (an unset
    # cursor) rather than after "".
    request = pb.MapGetListRequest(map=name, size=size, start_after=key)

    def page(response: pb.MapGetListResponse, _: Login) -> tuple[list[tuple[str, str]], str | None]:
        entries = [(kv.key, kv.value) for kv in response.list]
        return entries, response.next_key if response.HasField("next_key") else None

    return Op("MapGetList", request, page)


def map_entries(name: str, size: int, key: str | None = None) -> Op[Page[tuple[str, str]]]:
    """Every entry by key cursor. The server's next_key ends the map, not a short page:
    it returns fewer entries than asked whenever they would not fit in one answer."""
    inner = map_page_after(name, key, size)

    def page(response: pb.MapGetListResponse, login: Login) -> Page[tuple[str, str]]:
        entries, cursor = inner.result(response, login)
        return Page(entries, None if cursor is None else map_entries(name, size, cursor))

    return Op("MapGetList", inner.request, page)


def map_destroy(name: str) -> Op[None]:
    return Op("MapDestroy", pb.MapDestroyRequest(map=name), _nothing)
