"""The streaming consumer: flow control, acks on the stream, release on close."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub


class Stream:
    """A Subscribe call whose requests the test sends one by one."""

    def __init__(self, stub: Stub, token: str, queue_name: str, max_unacked: int) -> None:
        self._outgoing: queue.Queue[pb.SubscribeRequest | None] = queue.Queue()
        self._outgoing.put(
            pb.SubscribeRequest(
                open=pb.SubscribeOpen(token=token, queue_name=queue_name, max_unacked=max_unacked)
            )
        )
        self.responses = stub.Subscribe(self._requests(), timeout=30)

    def _requests(self) -> Iterator[pb.SubscribeRequest]:
        while (request := self._outgoing.get()) is not None:
            yield request

    def ack(self, ids: list[int], ack_type: pb.AckType = pb.ACK_TYPE_DONE) -> None:
        self._outgoing.put(
            pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids, ack_type=ack_type))
        )

    def next(self) -> pb.SubscribeResponse:
        return next(self.responses)

    def close(self) -> None:
        self._outgoing.put(None)


def counts(stub: Stub, token: str) -> tuple[int, int]:
    ready = stub.Size(pb.SizeRequest(token=token, queue_name="q")).size
    return ready, stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name="q")).ack_num


def test_flow_control_and_acks(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=[str(i) for i in range(5)]))
    stream = Stream(stub, token, "q", max_unacked=3)
    first = stream.next()
    assert first.code == pb.CODE_OK
    assert [e.element for e in first.element_info] == ["0", "1", "2"]  # several per message
    assert counts(stub, token) == (2, 3)  # no more than max_unacked held
    stream.ack([first.element_info[0].message_id, 999_999])
    pushed = stream.next()  # one slot freed: refilled in the ack's own answer
    assert [(r.message_id, r.code) for r in pushed.ack_results] == [
        (999_999, pb.CODE_MESSAGE_NOT_FOUND)
    ]
    assert [e.element for e in pushed.element_info] == ["3"]
    stream.ack([e.message_id for e in first.element_info[1:]], pb.ACK_TYPE_DONE)
    later = stream.next()
    assert [e.element for e in later.element_info] == ["4"]
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="late"))
    stream.ack([pushed.element_info[0].message_id, later.element_info[0].message_id])
    arrived = stream.next()  # pushed as it arrives
    assert [e.element for e in arrived.element_info] == ["late"]
    stream.close()
    assert list(stream.responses) == []
    # Closing released what the stream held.
    assert counts(stub, token) == (1, 0)
    again = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
    assert (again.element, again.delivery_count) == ("late", 2)


def test_cancelled_stream_releases_held(server: ServerHandle, stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b"]))
    other = login(stub, "admin", server.admin_password)
    stream = Stream(stub, other, "q", max_unacked=10)
    assert len(stream.next().element_info) == 2
    stream.responses.cancel()
    # Release happens on the server after it notices the cancel: follow it by long-polling.
    reply = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
    assert (reply.code, reply.element, reply.delivery_count) == (pb.CODE_OK, "a", 2)


def test_open_errors_come_back_as_one_response(stub: Stub, token: str) -> None:
    bad_token = Stream(stub, "nope", "q", max_unacked=1)
    reply = bad_token.next()
    assert reply.code == pb.CODE_UNAUTHENTICATED
    assert list(bad_token.responses) == []
    missing = Stream(stub, token, "absent", max_unacked=1)
    assert missing.next().code == pb.CODE_QUEUE_NOT_FOUND
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    zero = Stream(stub, token, "q", max_unacked=0)
    assert zero.next().code == pb.CODE_INVALID_ARGUMENT


def test_ack_first_is_invalid(stub: Stub, token: str) -> None:
    responses = stub.Subscribe(
        iter([pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=[1]))]), timeout=30
    )
    replies = list(responses)
    assert [r.code for r in replies] == [pb.CODE_INVALID_ARGUMENT]


def test_logout_ends_the_stream(stub: Stub, token: str, server: ServerHandle) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    consumer = login(stub, "admin", server.admin_password)
    stream = Stream(stub, consumer, "q", max_unacked=5)
    stub.Logout(pb.LogoutRequest(token=consumer))
    assert stream.next().code == pb.CODE_UNAUTHENTICATED
    assert list(stream.responses) == []
    stream.close()


def test_refills_wait_for_a_quarter_of_the_window(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=[str(i) for i in range(12)]))
    stream = Stream(stub, token, "q", max_unacked=8)
    first = stream.next()
    ids = [e.message_id for e in first.element_info]
    assert len(ids) == 8
    stream.ack(ids[:1])  # one free slot of eight: below the low-water mark, no refill
    stream.ack(ids[1:2])  # two free slots: a quarter of the window, refill both
    refill = stream.next()
    assert [e.element for e in refill.element_info] == ["8", "9"]
    assert counts(stub, token) == (2, 8)
    stream.close()


def test_a_little_room_is_refilled_after_a_moment(stub: Stub, token: str) -> None:
    """Regression: below the low-water mark the stream used to wait for more acks forever,
    stalling a consumer that waits for more messages before it acks the ones it holds."""
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=[str(i) for i in range(9)]))
    stream = Stream(stub, token, "q", max_unacked=8)
    first = stream.next()
    assert len(first.element_info) == 8
    stream.ack([first.element_info[0].message_id])  # one slot: below a quarter of eight
    late = stream.next()
    assert [e.element for e in late.element_info] == ["8"]
    stream.close()
