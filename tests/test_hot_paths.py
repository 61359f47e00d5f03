"""The batch paths (AddAll, PullElements, BatchAck, Subscribe acks) answer exactly as before
their responses were built in place: same codes, same order, same bytes on the wire.

The servicer is called directly (no network), on an engine over the SQLite store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from test_engine import until

from conftest import FAST_AUTH, encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.auth import KeyPair, PasswordHasher
from qm_server.config import Limits
from qm_server.engine import Engine
from qm_server.servicer import QueueManagerServicer
from qm_server.store.base import UserRecord
from qm_server.store.sqlite import SqliteStore
from qm_server.validation import check_text_size, check_texts_size

KEY = KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
NO_CONTEXT = cast(Any, None)  # the unary methods under test never touch their context


class StreamContext:
    """What Subscribe needs of grpc's context: done callbacks, run when the call ends."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        for callback in self.callbacks:
            callback(self)


Scenario = Callable[[Engine, QueueManagerServicer], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, limits: Limits | None = None) -> None:
    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        hashed = PasswordHasher.from_settings(FAST_AUTH).hash("pw")
        await store.create_user(UserRecord("admin", hashed, is_admin=True))
        engine = Engine(store, KEY, auth=FAST_AUTH, limits=limits)
        try:
            await scenario(engine, QueueManagerServicer(engine))
        finally:
            await engine.stop()
            await store.close()

    asyncio.run(main())


async def log_in(engine: Engine) -> str:
    challenge = engine.get_challenge()
    reply = pb.GetChallengeResponse(
        public_key_pem=challenge.public_key_pem, challenge=challenge.challenge
    )
    token, _ = await engine.login("admin", encrypt_password(reply, "pw"), "peer")
    return token


async def fill(s: QueueManagerServicer, token: str, elements: list[str]) -> list[int]:
    assert (await s.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"), NO_CONTEXT)).code == 0
    added = await s.AddAll(
        pb.AddAllRequest(token=token, queue_name="q", elements=elements), NO_CONTEXT
    )
    assert added.code == pb.CODE_OK, added.message
    return list(added.message_ids)


def test_pull_elements_answers_every_delivery_in_order(tmp_path: Path) -> None:
    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        elements = [f"element {i} é" for i in range(100)]
        before_ms = int(time.time() * 1000)
        ids = await fill(s, token, elements)
        added_ms = int(time.time() * 1000)
        pulled = await s.PullElements(
            pb.PullElementsRequest(token=token, queue_name="q", number=100), NO_CONTEXT
        )
        times = [e.enqueued_at_ms for e in pulled.element_info]
        assert all(before_ms <= t <= added_ms for t in times)
        expected = pb.PullElementsResponse(
            element_info=[
                pb.ElementInfo(element=e, message_id=i, delivery_count=1, enqueued_at_ms=t)
                for e, i, t in zip(elements, ids, times, strict=True)
            ],
            number=100,
        )
        assert pulled == expected
        assert pulled.SerializeToString() == expected.SerializeToString()

    run(tmp_path, scenario)


def test_batch_ack_answers_a_code_per_id_in_request_order(tmp_path: Path) -> None:
    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        other = await log_in(engine)
        ids = await fill(s, token, ["a", "b", "c", "d"])
        mine = await s.PullElements(
            pb.PullElementsRequest(token=token, queue_name="q", number=2), NO_CONTEXT
        )
        theirs = await s.PullElements(
            pb.PullElementsRequest(token=other, queue_name="q", number=2), NO_CONTEXT
        )
        assert [e.message_id for e in mine.element_info] == ids[:2]
        assert [e.message_id for e in theirs.element_info] == ids[2:]
        asked = [ids[3], ids[0], 424242, ids[1], ids[2]]
        acked = await s.BatchAck(pb.BatchAckRequest(token=token, message_ids=asked), NO_CONTEXT)
        nf = pb.CODE_MESSAGE_NOT_FOUND
        expected = pb.BatchAckResponse(
            results=[
                pb.AckResult(message_id=ids[3], code=nf),
                pb.AckResult(message_id=ids[0], code=pb.CODE_OK),
                pb.AckResult(message_id=424242, code=nf),
                pb.AckResult(message_id=ids[1], code=pb.CODE_OK),
                pb.AckResult(message_id=ids[2], code=nf),
            ]
        )
        assert acked == expected
        assert acked.SerializeToString() == expected.SerializeToString()
        repeated = await s.BatchAck(
            pb.BatchAckRequest(token=token, message_ids=[ids[3], ids[3]]), NO_CONTEXT
        )
        assert (repeated.code, repeated.message) == (
            pb.CODE_INVALID_ARGUMENT,
            "message_ids repeats an id",
        )

    run(tmp_path, scenario)


def test_add_all_checks_every_element_in_utf8_bytes(tmp_path: Path) -> None:
    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        # 4 characters, 8 bytes: the cheap length test cannot clear it, the bytes can.
        ids = await fill(s, token, ["ok", "éééé", "x" * 10])
        assert len(ids) == 3
        too_big = await s.AddAll(
            pb.AddAllRequest(token=token, queue_name="q", elements=["ok", "ééééé!", "ok"]),
            NO_CONTEXT,
        )
        assert (too_big.code, too_big.message) == (
            pb.CODE_INVALID_ARGUMENT,
            "element is larger than 10 bytes",
        )
        assert not too_big.message_ids
        size = await s.Size(pb.SizeRequest(token=token, queue_name="q"), NO_CONTEXT)
        assert size.size == 3  # nothing of the refused batch was applied

    run(tmp_path, scenario, Limits(max_element_bytes=10))


def test_check_texts_size_is_check_text_size_for_each() -> None:
    for texts in (["a" * 10], ["é" * 5, "a"], ["a", "é" * 6], ["😀" * 3], [""]):
        single: list[bool] = []
        for text in texts:
            try:
                check_text_size("element", text, 10)
                single.append(True)
            except errors.InvalidArgument:
                single.append(False)
        if all(single):
            check_texts_size("element", texts, 10)
        else:
            with pytest.raises(errors.InvalidArgument, match="element is larger than 10 bytes"):
                check_texts_size("element", texts, 10)
    with pytest.raises(errors.InvalidArgument):
        check_text_size("value", "😀" * 3, 10)  # 12 bytes


def test_subscribe_ack_results_follow_the_request_order(tmp_path: Path) -> None:
    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        ids = await fill(s, token, [f"m{i}" for i in range(6)])
        requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        requests.put_nowait(
            pb.SubscribeRequest(open=pb.SubscribeOpen(token=token, queue_name="q", max_unacked=4))
        )

        async def stream() -> AsyncIterator[pb.SubscribeRequest]:
            while (request := await requests.get()) is not None:
                yield request

        responses = s.Subscribe(stream(), cast(Any, StreamContext()))
        first = await anext(responses)
        assert [e.message_id for e in first.element_info] == ids[:4]
        # Two held ids among one unknown and one never delivered on this stream.
        requests.put_nowait(
            pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=[ids[1], 424242, ids[0], ids[5]]))
        )
        second = await anext(responses)
        assert list(second.ack_results) == [
            pb.AckResult(message_id=424242, code=pb.CODE_MESSAGE_NOT_FOUND),
            pb.AckResult(message_id=ids[5], code=pb.CODE_MESSAGE_NOT_FOUND),
        ]
        assert [e.message_id for e in second.element_info] == ids[4:6]
        # Every id held: no ack result, nothing left to refill with.
        requests.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids[2:6])))
        requests.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids[2:3])))
        third = await anext(responses)
        assert list(third.ack_results) == [
            pb.AckResult(message_id=ids[2], code=pb.CODE_MESSAGE_NOT_FOUND)
        ]
        requests.put_nowait(None)
        assert [r async for r in responses] == []
        counts = await engine.store.queue_counts("q")
        assert (counts.ready, counts.in_flight) == (0, 0)

    run(tmp_path, scenario)


def test_a_full_window_refilled_by_its_ack_keeps_pushing_later(tmp_path: Path) -> None:
    """The pusher is not woken when an ack refills a full window, and still pushes after."""

    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        ids = await fill(s, token, ["m0", "m1", "m2", "m3"])
        requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        requests.put_nowait(
            pb.SubscribeRequest(open=pb.SubscribeOpen(token=token, queue_name="q", max_unacked=2))
        )

        async def stream() -> AsyncIterator[pb.SubscribeRequest]:
            while (request := await requests.get()) is not None:
                yield request

        responses = s.Subscribe(stream(), cast(Any, StreamContext()))
        first = await anext(responses)
        assert [e.message_id for e in first.element_info] == ids[:2]
        session = await engine.session(token)
        await until(engine, lambda: session.waiting == 1)  # the pusher waits for room
        requests.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids[:2])))
        refill = await anext(responses)
        assert [e.message_id for e in refill.element_info] == ids[2:]
        requests.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids[2:])))
        # Nothing to refill with: the pusher parks on the queue.
        await until(engine, lambda: engine.signals.waiting() == 1)
        later = await s.Add(pb.AddRequest(token=token, queue_name="q", element="m4"), NO_CONTEXT)
        pushed = await asyncio.wait_for(anext(responses), 5)
        assert [(e.message_id, e.element) for e in pushed.element_info] == [
            (later.message_id, "m4")
        ]
        requests.put_nowait(None)
        assert [r async for r in responses] == []

    run(tmp_path, scenario)


async def opens_then_waits(token: str) -> AsyncIterator[pb.SubscribeRequest]:
    """A Subscribe request stream that opens on queue q, then sends nothing more."""
    yield pb.SubscribeRequest(open=pb.SubscribeOpen(token=token, queue_name="q", max_unacked=10))
    await asyncio.Event().wait()


def test_a_stream_whose_call_ends_releases_its_messages_unclosed(tmp_path: Path) -> None:
    """grpc ends a call cancelled while it was sending without closing the response
    generator, which stays suspended at its yield until it is collected (in CI, later than
    a 10 s long poll). The end of the call alone must release what the stream held."""

    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        ids = await fill(s, token, ["a", "b"])
        other = await log_in(engine)

        context = StreamContext()
        responses = s.Subscribe(opens_then_waits(other), cast(Any, context))
        first = await anext(responses)
        assert [e.message_id for e in first.element_info] == ids
        context.end()  # the generator stays suspended at its yield
        poll = pb.PollRequest(token=token, queue_name="q", wait_ms=5_000)
        reply = await s.Poll(poll, NO_CONTEXT)
        assert (reply.code, reply.element, reply.delivery_count) == (pb.CODE_OK, "a", 2)
        await cast(AsyncGenerator[Any, None], responses).aclose()

    run(tmp_path, scenario)


def test_closing_the_subscribe_handler_stops_its_stream_at_once(tmp_path: Path) -> None:
    """The handler hands the stream's work to a SubscribeStream generator of its own;
    closing the handler's generator (grpc ending the call, or its collection) must close
    that one too, releasing what the stream held then, not at the inner one's collection."""

    async def scenario(engine: Engine, s: QueueManagerServicer) -> None:
        token = await log_in(engine)
        ids = await fill(s, token, ["a", "b"])
        other = await log_in(engine)

        responses = s.Subscribe(
            opens_then_waits(other), cast(Any, StreamContext())
        )  # the call never ends
        first = await anext(responses)
        assert [e.message_id for e in first.element_info] == ids
        await cast(AsyncGenerator[Any, None], responses).aclose()
        assert engine._streams() == []  # closed by the time aclose returned
        poll = pb.PollRequest(token=token, queue_name="q", wait_ms=0)
        reply = await s.Poll(poll, NO_CONTEXT)
        assert (reply.code, reply.element, reply.delivery_count) == (pb.CODE_OK, "a", 2)

    run(tmp_path, scenario)
