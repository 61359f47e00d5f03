"""The client's ``subscribe``: against the real server, and against a scripted stream.

The real server shows the behaviour end to end. The scripted servicer plays the proto's
rules exactly where the real one cannot be steered: the order of pushes under flow
control, a failed ack, and a session ending while the stream is open. It follows the
proto: a failed open answers one response and ends the stream; the server pushes while
fewer than ``max_unacked`` are held; acks on the stream free room; failed acks come back in
``ack_results``; a session that ends answers CODE_UNAUTHENTICATED and releases what the
stream held.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import pytest
from client_fixtures import LossRecorder, ScriptedServicer, connect, raw_stub, scripted_server

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import (
    InvalidArgument,
    MessageNotFound,
    MessageReleased,
    QueueManagerClient,
    QueueNotFound,
)


class SubscribeServicer(ScriptedServicer):
    def __init__(self, elements: Iterable[str]) -> None:
        super().__init__()
        # Ready messages as (id, element, deliveries so far), oldest first.
        self.ready: deque[tuple[int, str, int]] = deque(
            (i, e, 0) for i, e in enumerate(elements, start=1)
        )
        self.acks: list[tuple[int, int]] = []
        self.opens: list[pb.SubscribeOpen] = []
        self.fail_acks: set[int] = set()
        self.fail_code: int = pb.CODE_MESSAGE_NOT_FOUND  # what a failed ack answers
        self.end_session_of: str | None = None
        self.changed = threading.Condition(self._lock)

    def wait_for_acks(self, count: int) -> list[tuple[int, int]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.acks) >= count, timeout=30)
            return list(self.acks)

    def Subscribe(
        self, request_iterator: Iterator[pb.SubscribeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SubscribeResponse]:
        opening = next(request_iterator).open
        with self._lock:
            self.opens.append(opening)
        if opening.queue_name != "jobs":
            yield pb.SubscribeResponse(code=pb.CODE_QUEUE_NOT_FOUND, message="no such queue")
            return
        held: dict[int, tuple[str, int]] = {}

        def push(results: list[pb.AckResult]) -> pb.SubscribeResponse:
            infos = []
            with self._lock:
                while self.ready and len(held) < opening.max_unacked:
                    message_id, element, deliveries = self.ready.popleft()
                    held[message_id] = (element, deliveries + 1)
                    infos.append(
                        pb.ElementInfo(
                            element=element, message_id=message_id, delivery_count=deliveries + 1
                        )
                    )
            return pb.SubscribeResponse(element_info=infos, ack_results=results)

        def release() -> None:
            with self._lock:
                for message_id in sorted(held, reverse=True):
                    element, deliveries = held.pop(message_id)
                    self.ready.appendleft((message_id, element, deliveries))

        yield push([])
        if self.end_session_of == opening.token:
            release()
            yield pb.SubscribeResponse(code=pb.CODE_UNAUTHENTICATED, message="session expired")
            return
        try:
            for request in request_iterator:
                results = []
                for message_id in request.ack.message_ids:
                    if message_id in self.fail_acks or message_id not in held:
                        held.pop(message_id, None)  # "not found": not held any more
                        results.append(
                            pb.AckResult(message_id=message_id, code=self.fail_code)  # type: ignore[arg-type]
                        )
                        continue
                    element, deliveries = held.pop(message_id)
                    with self.changed:
                        self.acks.append((message_id, request.ack.ack_type))
                        if request.ack.ack_type == pb.ACK_TYPE_ERROR:
                            self.ready.appendleft((message_id, element, deliveries))
                        self.changed.notify_all()
                yield push(results)
        finally:
            release()  # a closed stream releases what it held


def serve(servicer: SubscribeServicer) -> Iterator[tuple[SubscribeServicer, str]]:
    with scripted_server(servicer) as target:
        yield servicer, target


@pytest.fixture
def five() -> Iterator[tuple[SubscribeServicer, str]]:
    yield from serve(SubscribeServicer(["a", "bad", "c", "d", "e"]))  # type: ignore[abstract]


def test_subscription_pushes_with_flow_control_and_acks_on_the_stream(
    five: tuple[SubscribeServicer, str],
) -> None:
    servicer, target = five
    seen = []
    with (
        QueueManagerClient(target, "u", "p", heartbeat=False) as qm,
        qm.subscribe("jobs", max_unacked=2) as subscription,
    ):
        for message in subscription:
            seen.append((message.element, message.delivery_count))
            if message.element == "bad" and message.delivery_count == 1:
                message.nack()
            else:
                message.ack()
            if len(seen) == 6:
                break
        acks = servicer.wait_for_acks(6)
    # "bad" goes back to the front when nacked, after "c" filled the room "a" freed.
    assert seen == [("a", 1), ("bad", 1), ("c", 1), ("bad", 2), ("d", 1), ("e", 1)]
    assert acks == [
        (1, pb.ACK_TYPE_DONE),
        (2, pb.ACK_TYPE_ERROR),
        (3, pb.ACK_TYPE_DONE),
        (2, pb.ACK_TYPE_DONE),
        (4, pb.ACK_TYPE_DONE),
        (5, pb.ACK_TYPE_DONE),
    ]
    assert [(o.token, o.queue_name, o.max_unacked) for o in servicer.opens] == [("t1", "jobs", 2)]
    assert subscription.failed_acks == []


def test_a_message_is_finished_once(five: tuple[SubscribeServicer, str]) -> None:
    _, target = five
    with (
        QueueManagerClient(target, "u", "p", heartbeat=False) as qm,
        qm.subscribe("jobs", max_unacked=1) as subscription,
    ):
        message = next(iter(subscription))
        message.ack()
        with pytest.raises(MessageNotFound):
            message.ack()
    with pytest.raises(MessageReleased):
        message.nack()  # closed: whatever it held was released


def test_failed_acks_are_reported(five: tuple[SubscribeServicer, str]) -> None:
    servicer, target = five
    servicer.fail_acks.add(1)
    with (
        QueueManagerClient(target, "u", "p", heartbeat=False) as qm,
        qm.subscribe("jobs", max_unacked=1) as subscription,
    ):
        first = next(subscription)
        first.ack()
        assert subscription.failed_acks == []
        # The failure comes back with the next push.
        second = next(subscription)
    assert (first.message_id, second.message_id) == (1, 2)
    assert subscription.failed_acks == [1]


def test_a_failed_open_raises_its_code(five: tuple[SubscribeServicer, str]) -> None:
    _, target = five
    with QueueManagerClient(target, "u", "p", heartbeat=False) as qm:
        subscription = qm.subscribe("nope")
        with pytest.raises(QueueNotFound) as caught:
            next(subscription)
        assert caught.value.code == pb.CODE_QUEUE_NOT_FOUND
        assert list(subscription) == []  # closed


def test_a_lost_session_resumes_on_a_new_stream_and_reports_the_loss(
    five: tuple[SubscribeServicer, str],
) -> None:
    servicer, target = five
    servicer.end_session_of = "t1"
    lost = LossRecorder()
    with (
        QueueManagerClient(target, "u", "p", heartbeat=False, on_session_lost=lost) as qm,
        qm.subscribe("jobs", max_unacked=2) as subscription,
    ):
        stream = iter(subscription)
        first, second = next(stream), next(stream)
        again = next(stream)  # reads CODE_UNAUTHENTICATED, logs in again, reopens
        assert [loss.released for loss in lost.losses] == [(first, second)]
        assert (again.element, again.message_id, again.delivery_count) == ("a", 1, 2)
        with pytest.raises(MessageReleased):
            first.ack()
        again.ack()
        assert servicer.wait_for_acks(1) == [(1, pb.ACK_TYPE_DONE)]
        assert qm.token == "t2"
    assert [o.token for o in servicer.opens] == ["t1", "t2"]


# -- against the real server ---------------------------------------------------------------


@pytest.fixture
def pair(server: ServerHandle) -> Iterator[tuple[QueueManagerClient, QueueManagerClient]]:
    """A consumer and, beside it, a producer that also checks the queue from outside."""
    with connect(server) as consumer, connect(server) as producer:
        producer.new_queue("jobs")
        yield consumer, producer


def test_real_subscription_delivers_acks_and_nacks(
    pair: tuple[QueueManagerClient, QueueManagerClient],
) -> None:
    consumer, producer = pair
    ids = producer.add_all("jobs", ["a", "b"])
    with consumer.subscribe("jobs", max_unacked=2) as subscription:
        stream = iter(subscription)
        first, second = next(stream), next(stream)
        assert [(m.element, m.message_id, m.delivery_count) for m in (first, second)] == [
            ("a", ids[0], 1),
            ("b", ids[1], 1),
        ]
        assert (producer.size("jobs"), producer.unacked("jobs")) == (0, 2)
        later = producer.add("jobs", "c")  # pushed as soon as there is room
        first.ack()
        third = next(stream)
        assert (third.element, third.message_id) == ("c", later)
        second.nack()
        again = next(stream)
        assert (again.element, again.message_id, again.delivery_count) == ("b", ids[1], 2)
        again.ack()
        third.ack()
    # Closing waits until the server has applied the acks sent on the stream.
    assert (producer.size("jobs"), producer.unacked("jobs")) == (0, 0)
    assert subscription.failed_acks == []


def test_closing_a_real_subscription_releases_what_it_holds(
    pair: tuple[QueueManagerClient, QueueManagerClient],
) -> None:
    consumer, producer = pair
    ids = producer.add_all("jobs", ["a", "b", "c"])
    with consumer.subscribe("jobs", max_unacked=2) as subscription:
        held = [next(subscription), next(subscription)]
        held[0].ack()
        next(subscription)  # "c" fills the room
    back = producer.pull("jobs", 3, wait=10)
    assert [(m.message_id, m.delivery_count) for m in back] == [(ids[1], 2), (ids[2], 2)]
    with pytest.raises(MessageReleased):
        held[1].ack()


def test_a_real_subscription_resumes_after_its_session_ends(
    server: ServerHandle, pair: tuple[QueueManagerClient, QueueManagerClient]
) -> None:
    _, producer = pair
    lost = LossRecorder()
    with connect(server, on_session_lost=lost) as consumer:
        (message_id,) = producer.add_all("jobs", ["a"])
        with consumer.subscribe("jobs", max_unacked=1) as subscription:
            first = next(subscription)
            with raw_stub(server) as stub:  # the session ends behind the client's back
                reply = stub.Logout(pb.LogoutRequest(token=consumer.token))
                assert reply.code == pb.CODE_OK
            again = next(subscription)
            assert (again.message_id, again.delivery_count) == (message_id, 2)
            assert [loss.released for loss in lost.losses] == [(first,)]
            with pytest.raises(MessageReleased):
                first.ack()
            again.ack()
    assert (producer.size("jobs"), producer.unacked("jobs")) == (0, 0)


def test_real_subscription_open_failures_raise_their_code(
    pair: tuple[QueueManagerClient, QueueManagerClient],
) -> None:
    consumer, _ = pair
    with pytest.raises(QueueNotFound):
        next(consumer.subscribe("nope"))
    with pytest.raises(InvalidArgument):
        next(consumer.subscribe("jobs", max_unacked=0))


def test_ack_many_finishes_subscription_messages_on_their_stream(
    pair: tuple[QueueManagerClient, QueueManagerClient],
) -> None:
    consumer, producer = pair
    producer.add_all("jobs", ["a", "b", "c"])
    with consumer.subscribe("jobs", max_unacked=2) as subscription:
        batch = [next(subscription), next(subscription)]
        assert consumer.ack_many(batch) == []
        last = next(subscription)  # room again: the stream learnt of the acks
        assert consumer.ack_many([last, batch[0]]) == [batch[0]]
    assert (producer.size("jobs"), producer.unacked("jobs")) == (0, 0)


def test_a_failed_ack_with_a_code_newer_than_the_client_is_reported(
    five: tuple[SubscribeServicer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: naming the unknown code raised ValueError and broke the iteration."""
    servicer, target = five
    servicer.fail_acks.add(1)
    servicer.fail_code = 999
    with (
        QueueManagerClient(target, "u", "p", heartbeat=False) as qm,
        qm.subscribe("jobs", max_unacked=1) as subscription,
    ):
        first = next(subscription)
        first.ack()
        second = next(subscription)
        assert subscription.failed_acks == [1]
    assert (first.message_id, second.message_id) == (1, 2)
    assert "failed: CODE_999" in caplog.text


def test_the_clients_ack_and_nack_finish_a_subscription_message_on_its_stream(
    five: tuple[SubscribeServicer, str],
) -> None:
    """Regression: ``qm.ack(message)`` sent the unary Ack for a message of a stream.

    The server finished the message, but the stream still counted it as held, so once
    ``max_unacked`` messages were finished that way it pushed nothing more and the
    iteration hung. (The scripted servicer has no unary Ack: that call fails.)
    """
    servicer, target = five
    with (
        QueueManagerClient(target, "u", "p", heartbeat=False) as qm,
        qm.subscribe("jobs", max_unacked=1) as subscription,
    ):
        first = next(subscription)
        qm.nack(first)
        again = next(subscription)  # room again: the stream learnt of the nack
        assert (again.message_id, again.delivery_count) == (1, 2)
        qm.ack(again)
        assert next(subscription).message_id == 2
        assert servicer.wait_for_acks(2) == [(1, pb.ACK_TYPE_ERROR), (1, pb.ACK_TYPE_DONE)]
        with pytest.raises(MessageNotFound):
            qm.ack(again)  # finished once, on its stream


def test_closing_ends_the_iteration_with_pushed_messages_not_yet_handed_out(
    five: tuple[SubscribeServicer, str],
) -> None:
    """Regression: after ``close()`` the iteration went on through the rest of a push.

    Closing releases every message of the stream, so those were handed out already back
    in the queue (possibly in another consumer's hands), and their acks raised
    MessageReleased. The iteration ends when ``close()`` is called, from any thread.
    """
    _, target = five
    with QueueManagerClient(target, "u", "p", heartbeat=False) as qm:
        subscription = qm.subscribe("jobs", max_unacked=2)
        first = next(subscription)  # "a" and "bad" come in one push
        subscription.close()
        assert list(subscription) == []
    assert first.element == "a"


class _WatchedCall:
    """A stream's call that tells when a thread goes in to read it."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.reading = threading.Event()

    def __iter__(self) -> _WatchedCall:
        return self

    def __next__(self) -> pb.SubscribeResponse:
        self.reading.set()
        response: pb.SubscribeResponse = next(self._call)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def test_closing_from_another_thread_while_the_consumer_waits(
    pair: tuple[QueueManagerClient, QueueManagerClient],
) -> None:
    """Regression: close() read the stream to its end while the consumer's thread read it.

    gRPC allows one read at a time on a call; the second failed with ValueError
    ("Internal gRPC call error 8") in one of the two threads, so close() raised without
    waiting for the acks sent, or the consumer's loop died instead of ending.
    """
    consumer, producer = pair
    producer.add_all("jobs", ["a"])
    subscription = consumer.subscribe("jobs", max_unacked=1)
    first = next(subscription)
    watched = _WatchedCall(subscription._core.stream.call)
    subscription._core.stream.call = watched
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            assert list(subscription) == []
        except BaseException as error:  # the test reports it from its own thread
            failures.append(error)

    thread = threading.Thread(target=consume)
    thread.start()
    assert watched.reading.wait(30)
    first.ack()
    subscription.close()  # ends the iteration; returns once the server applied the ack
    thread.join(30)
    assert not thread.is_alive()
    assert failures == []
    assert (producer.size("jobs"), producer.unacked("jobs")) == (0, 0)


def test_an_ack_racing_close_is_sent_before_the_half_close_or_refused(
    five: tuple[SubscribeServicer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an ack checked before close() was queued after its half-close.

    ``ack()`` returned as if sent, but nothing was read after the half-close: the ack
    never reached the server, which released the message for redelivery. The acking
    thread is held between its check and its send while another thread closes.
    """
    servicer, target = five
    with QueueManagerClient(target, "u", "p", heartbeat=False) as qm:
        subscription = qm.subscribe("jobs", max_unacked=1)
        message = next(subscription)
        in_ack, go_on = threading.Event(), threading.Event()
        unhold = qm._session.unhold

        def held_up(session: Any, message_ids: Iterable[int]) -> None:
            if threading.current_thread() is acker:
                in_ack.set()
                assert go_on.wait(30)
            unhold(session, message_ids)

        monkeypatch.setattr(qm._session, "unhold", held_up)
        outcome: list[str] = []

        def ack() -> None:
            try:
                message.ack()
            except MessageReleased:
                outcome.append("released")
            else:
                outcome.append("acked")

        acker = threading.Thread(target=ack)
        acker.start()
        assert in_ack.wait(30)
        subscription.close()  # returns once the server applied every ack sent
        go_on.set()
        acker.join(30)
        assert not acker.is_alive()
    if outcome == ["acked"]:
        assert servicer.acks == [(1, pb.ACK_TYPE_DONE)]
    else:
        assert (outcome, servicer.acks) == (["released"], [])
