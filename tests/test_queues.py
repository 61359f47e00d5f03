"""Every queue RPC and every code it can answer, through a real channel."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.answer_size import ENVELOPE_BYTES, FRAME_BYTES, element_info_size
from qm_server.store.sqlite import SqliteStore

Stub = pb_grpc.QueueManagerServiceStub


@pytest.fixture
def queue(stub: Stub, token: str) -> str:
    assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="jobs")).code == pb.CODE_OK
    return "jobs"


def add(stub: Stub, token: str, queue: str, *elements: str) -> list[int]:
    reply = stub.AddAll(pb.AddAllRequest(token=token, queue_name=queue, elements=elements))
    assert reply.code == pb.CODE_OK, reply.message
    return list(reply.message_ids)


def size(stub: Stub, token: str, queue: str) -> tuple[int, int]:
    ready = stub.Size(pb.SizeRequest(token=token, queue_name=queue))
    in_flight = stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name=queue))
    assert ready.code == in_flight.code == pb.CODE_OK
    return ready.size, in_flight.ack_num


def test_new_queue_codes(stub: Stub, token: str) -> None:
    ok = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="a.b:c-d_9"))
    assert (ok.code, ok.message) == (pb.CODE_OK, "")
    again = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="a.b:c-d_9"))
    assert again.code == pb.CODE_QUEUE_ALREADY_EXISTS
    assert "already exists" in again.message


@pytest.mark.parametrize("name", ["", "x" * 256, "has space", "slash/", "ü"])
def test_bad_queue_names_are_invalid_argument(stub: Stub, token: str, name: str) -> None:
    reply = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name))
    assert reply.code == pb.CODE_INVALID_ARGUMENT
    assert "queue_name" in reply.message
    assert stub.Add(pb.AddRequest(token=token, queue_name=name, element="e")).code == (
        pb.CODE_INVALID_ARGUMENT
    )


def test_longest_name_is_accepted(stub: Stub, token: str) -> None:
    reply = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q" * 255))
    assert reply.code == pb.CODE_OK


def test_add_poll_ack_in_fifo_order(stub: Stub, token: str, queue: str) -> None:
    first = stub.Add(pb.AddRequest(token=token, queue_name=queue, element="one"))
    assert first.code == pb.CODE_OK
    ids = add(stub, token, queue, "two", "three")
    assert ids == [first.message_id + 1, first.message_id + 2]
    assert size(stub, token, queue) == (3, 0)
    polled = stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    assert (polled.code, polled.element, polled.message_id, polled.delivery_count) == (
        pb.CODE_OK,
        "one",
        first.message_id,
        1,
    )
    assert size(stub, token, queue) == (2, 1)
    ack = stub.Ack(pb.AckRequest(token=token, message_id=polled.message_id))
    assert ack.code == pb.CODE_OK
    assert size(stub, token, queue) == (2, 0)
    again = stub.Ack(pb.AckRequest(token=token, message_id=polled.message_id))
    assert again.code == pb.CODE_MESSAGE_NOT_FOUND


def test_missing_queue_is_queue_not_found(stub: Stub, token: str) -> None:
    name = "nope"
    calls: list[Any] = [
        stub.Add(pb.AddRequest(token=token, queue_name=name, element="e")),
        stub.AddAll(pb.AddAllRequest(token=token, queue_name=name, elements=["e"])),
        stub.Poll(pb.PollRequest(token=token, queue_name=name)),
        stub.PullElements(pb.PullElementsRequest(token=token, queue_name=name, number=1)),
        stub.Size(pb.SizeRequest(token=token, queue_name=name)),
        stub.IsEmpty(pb.IsEmptyRequest(token=token, queue_name=name)),
        stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name=name)),
        stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name=name)),
    ]
    assert [c.code for c in calls] == [pb.CODE_QUEUE_NOT_FOUND] * len(calls)


def test_empty_queue(stub: Stub, token: str, queue: str) -> None:
    poll = stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    assert poll.code == pb.CODE_QUEUE_EMPTY
    pull = stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=5))
    assert (pull.code, pull.number, len(pull.element_info)) == (pb.CODE_QUEUE_EMPTY, 0, 0)
    empty = stub.IsEmpty(pb.IsEmptyRequest(token=token, queue_name=queue))
    assert (empty.code, empty.empty) == (pb.CODE_OK, True)
    add(stub, token, queue, "x")
    assert stub.IsEmpty(pb.IsEmptyRequest(token=token, queue_name=queue)).empty is False


def test_pull_elements_takes_oldest_up_to_number(stub: Stub, token: str, queue: str) -> None:
    ids = add(stub, token, queue, *[f"e{i}" for i in range(5)])
    pull = stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=3))
    assert pull.code == pb.CODE_OK
    assert pull.number == 3
    assert [(e.element, e.message_id, e.delivery_count) for e in pull.element_info] == [
        ("e0", ids[0], 1),
        ("e1", ids[1], 1),
        ("e2", ids[2], 1),
    ]
    rest = stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=10))
    assert (rest.code, rest.number) == (pb.CODE_OK, 2)
    assert size(stub, token, queue) == (0, 5)


@pytest.mark.parametrize("number", [0, -1, 1001])
def test_pull_number_out_of_range(stub: Stub, token: str, queue: str, number: int) -> None:
    reply = stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=number))
    assert reply.code == pb.CODE_INVALID_ARGUMENT
    assert "number" in reply.message


def test_nack_returns_message_to_its_place(stub: Stub, token: str, queue: str) -> None:
    ids = add(stub, token, queue, "a", "b")
    first = stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    nack = stub.Ack(
        pb.AckRequest(token=token, message_id=first.message_id, ack_type=pb.ACK_TYPE_ERROR)
    )
    assert nack.code == pb.CODE_OK
    again = stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    assert (again.element, again.message_id, again.delivery_count) == ("a", ids[0], 2)


def test_ack_unknown_or_other_sessions_message(
    server: ServerHandle, stub: Stub, token: str, queue: str
) -> None:
    add(stub, token, queue, "a")
    polled = stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    other = login(stub, "admin", server.admin_password)
    theirs = stub.Ack(pb.AckRequest(token=other, message_id=polled.message_id))
    assert theirs.code == pb.CODE_MESSAGE_NOT_FOUND
    unknown = stub.Ack(pb.AckRequest(token=token, message_id=999_999))
    assert unknown.code == pb.CODE_MESSAGE_NOT_FOUND
    bad_type = stub.Ack(pb.AckRequest(token=token, message_id=polled.message_id, ack_type=7))  # type: ignore[arg-type]
    assert bad_type.code == pb.CODE_INVALID_ARGUMENT
    assert size(stub, token, queue) == (0, 1)


def test_batch_ack_reports_per_id(stub: Stub, token: str, queue: str) -> None:
    add(stub, token, queue, "a", "b", "c")
    pulled = stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=2))
    ids = [e.message_id for e in pulled.element_info]
    reply = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=[*ids, 424242]))
    assert reply.code == pb.CODE_OK
    assert [(r.message_id, r.code) for r in reply.results] == [
        (ids[0], pb.CODE_OK),
        (ids[1], pb.CODE_OK),
        (424242, pb.CODE_MESSAGE_NOT_FOUND),
    ]
    assert size(stub, token, queue) == (1, 0)
    repeated = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=[1, 1]))
    assert repeated.code == pb.CODE_INVALID_ARGUMENT
    empty = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=[]))
    assert empty.code == pb.CODE_INVALID_ARGUMENT


def test_batch_ack_deletes_only_its_own_ids_between_others(
    server: ServerHandle, stub: Stub, token: str, queue: str
) -> None:
    """Acks delete runs of consecutive ids as ranges: a message in the gap, held by
    another session or ready, or of another queue, must survive."""
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="other"))
    ids = add(stub, token, queue, "a", "b")  # ids 1, 2
    elsewhere = add(stub, token, "other", "x")  # id 3, another queue
    ids += add(stub, token, queue, "c", "d", "e", "f")  # ids 4..7
    other = login(stub, "admin", server.admin_password)

    def pull(session: str, number: int) -> list[int]:
        reply = stub.PullElements(
            pb.PullElementsRequest(token=session, queue_name=queue, number=number)
        )
        return [e.message_id for e in reply.element_info]

    mine = pull(token, 3)  # 1, 2, 4
    theirs = pull(other, 1)  # 5
    mine += pull(token, 1)  # 6; 7 stays ready
    assert (mine, theirs) == ([ids[0], ids[1], ids[2], ids[4]], [ids[3]])
    reply = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=mine))
    assert [r.code for r in reply.results] == [pb.CODE_OK] * 4
    assert size(stub, token, queue) == (1, 1)
    assert size(stub, token, "other") == (1, 0)
    assert stub.Ack(pb.AckRequest(token=other, message_id=theirs[0])).code == pb.CODE_OK
    last = stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    assert (last.element, last.message_id) == ("f", ids[5])
    assert stub.Poll(pb.PollRequest(token=token, queue_name="other")).message_id == elsewhere[0]


def test_concurrent_adds_to_two_queues_keep_ids_elements_and_order(
    server: ServerHandle, stub: Stub, token: str
) -> None:
    """Adds that share one transaction are inserted together: every element must still
    land in its own queue under the id its answer gave, NUL characters included."""
    for name in ("left", "right"):
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name))

    def produce(worker: int) -> list[tuple[str, int, str]]:
        answered: list[tuple[str, int, str]] = []
        with grpc.insecure_channel(server.target) as channel:
            s = Stub(channel)
            t = login(s, "admin", server.admin_password)
            for i in range(30):
                name = ("left", "right")[(worker + i) % 2]
                elements = [f"{worker}-{i}-{j}" + "\0" * (j % 3 == 0) for j in range(i % 4 + 1)]
                reply = s.AddAll(pb.AddAllRequest(token=t, queue_name=name, elements=elements))
                assert reply.code == pb.CODE_OK, reply.message
                answered += zip([name] * len(elements), reply.message_ids, elements, strict=True)
        return answered

    with ThreadPoolExecutor(6) as pool:
        answered = [row for rows in pool.map(produce, range(6)) for row in rows]

    for name in ("left", "right"):
        expected = sorted((i, e) for q, i, e in answered if q == name)
        pulled = stub.PullElements(
            pb.PullElementsRequest(token=token, queue_name=name, number=1000)
        )
        assert [(e.message_id, e.element) for e in pulled.element_info] == expected


def test_destroy_queue(stub: Stub, token: str, queue: str) -> None:
    add(stub, token, queue, "a", "b")
    stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    refused = stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name=queue))
    assert refused.code == pb.CODE_QUEUE_NOT_EMPTY
    forced = stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name=queue, force=True))
    assert forced.code == pb.CODE_OK
    assert stub.Size(pb.SizeRequest(token=token, queue_name=queue)).code == (
        pb.CODE_QUEUE_NOT_FOUND
    )
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=queue))
    assert size(stub, token, queue) == (0, 0)
    plain = stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name=queue))
    assert plain.code == pb.CODE_OK


def test_in_flight_only_queue_is_not_empty_for_destroy(stub: Stub, token: str, queue: str) -> None:
    add(stub, token, queue, "a")
    stub.Poll(pb.PollRequest(token=token, queue_name=queue))
    assert size(stub, token, queue) == (0, 1)
    refused = stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name=queue))
    assert refused.code == pb.CODE_QUEUE_NOT_EMPTY


def test_ids_are_unique_across_queues_and_never_reused(
    make_server: Callable[..., ServerHandle],
) -> None:
    handle = make_server()
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        for name in ("q1", "q2"):
            stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name))
        a = add(stub, token, "q1", "x")
        b = add(stub, token, "q2", "y")
        assert b[0] > a[0]
        polled = stub.Poll(pb.PollRequest(token=token, queue_name="q2"))
        stub.Ack(pb.AckRequest(token=token, message_id=polled.message_id))
    handle.stop()
    again = make_server(data_dir=handle.data_dir)
    with grpc.insecure_channel(again.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", again.admin_password)
        c = add(stub, token, "q2", "z")
        assert c[0] > b[0]  # the acked newest id is not handed out again


def test_element_size_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_element_bytes=10, max_batch=3)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        fits = stub.Add(pb.AddRequest(token=token, queue_name="q", element="é" * 5))
        assert fits.code == pb.CODE_OK
        big = stub.Add(pb.AddRequest(token=token, queue_name="q", element="é" * 6))
        assert big.code == pb.CODE_INVALID_ARGUMENT
        assert "10 bytes" in big.message
        mixed = stub.AddAll(
            pb.AddAllRequest(token=token, queue_name="q", elements=["ok", "x" * 11])
        )
        assert mixed.code == pb.CODE_INVALID_ARGUMENT
        many = stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a"] * 4))
        assert many.code == pb.CODE_INVALID_ARGUMENT
        none = stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=[]))
        assert none.code == pb.CODE_INVALID_ARGUMENT
        assert size(stub, token, "q") == (1, 0)  # nothing of the refused batches landed


def test_queue_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_queues=2)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        codes = [
            stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=f"q{i}")).code
            for i in range(3)
        ]
        assert codes == [pb.CODE_OK, pb.CODE_OK, pb.CODE_RESOURCE_EXHAUSTED]


def test_transport_size_limit_is_grpc_status(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_request_bytes=64 * 1024)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Add(pb.AddRequest(token=token, queue_name="q", element="x" * 70_000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_pull_stops_at_response_byte_budget(make_server: Callable[..., ServerHandle]) -> None:
    entry = element_info_size(100, 1, 1)  # ids below 128, first delivery
    room = 2 * entry + entry // 2  # two elements fit, three do not
    handle = make_server(
        max_element_bytes=100,
        max_batch=8,
        max_response_bytes=FRAME_BYTES + ENVELOPE_BYTES + room,
    )
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        add(stub, token, "q", *["x" * 100] * 5)
        pull = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="q", number=5))
        assert (pull.code, pull.number) == (pb.CODE_OK, 2)
        assert size(stub, token, "q") == (3, 2)
        rest = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="q", number=5))
        assert [e.delivery_count for e in rest.element_info] == [1, 1]


@pytest.mark.parametrize("batch", [1, 3])
def test_any_text_round_trips(stub: Stub, token: str, queue: str, batch: int) -> None:
    """NUL, emoji, quotes, backslashes and empty strings come back exactly as added."""
    samples = ["a\x00b", "😀 é", "\\u0041", '"q"', "\n\t", "", "\x00"]
    for start in range(0, len(samples), batch):
        add(stub, token, queue, *samples[start : start + batch])
    pulled = stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=50))
    assert [e.element for e in pulled.element_info] == samples


def test_process_crash_durability_mode_serves_and_keeps_data(
    make_server: Callable[..., ServerHandle],
) -> None:
    handle = make_server(durability="process-crash")
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        ids = add(stub, token, "q", "a", "b")
    handle.stop()
    again = make_server(data_dir=handle.data_dir, durability="process-crash")
    with grpc.insecure_channel(again.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", again.admin_password)
        pulled = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="q", number=5))
        assert [e.message_id for e in pulled.element_info] == ids


def test_unknown_durability_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability must be one of full, process-crash"):
        SqliteStore(tmp_path, durability="fast")
