"""Every answer fits a client with gRPC's default settings (4 MiB, framing included), and
nothing is put in flight in an answer that could not be delivered."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from client_fixtures import connect
from test_subscribe import Stream

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client import ResourceExhausted
from qm_client._channel import MAX_ANSWER_BYTES
from qm_server.__main__ import main as server_main
from qm_server.answer_size import (
    ENVELOPE_BYTES,
    FRAME_BYTES,
    MAX_ENTRY_OVERHEAD,
    element_info_size,
    entries_room,
    key_value_size,
)
from qm_server.config import MIB, Limits

Stub = pb_grpc.QueueManagerServiceStub
ROOM = entries_room(Limits().max_response_bytes)


def in_flight(stub: Stub, token: str, queue: str) -> int:
    return stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name=queue)).ack_num


def add_each(stub: Stub, token: str, queue: str, elements: list[str]) -> None:
    for element in elements:
        assert stub.Add(pb.AddRequest(token=token, queue_name=queue, element=element)).code == 0


def test_sizes_are_the_protobuf_encoding() -> None:
    rng = random.Random(7)
    times = random.Random(8)  # apart, so that the other draws stay as they were
    for _ in range(200):
        entries = [
            (
                "é" * rng.choice([0, 1, 60, 200, 20_000]),
                rng.choice([0, 1, 127, 128, 2**40, 2**62]),
                rng.choice([0, 1, 300]),
                times.choice([0, 1_700_000_000_000]),
                times.choice([0, 1_700_000_030_000, 2**63 - 1]),
            )
            for _ in range(rng.randint(1, 4))
        ]
        pull = pb.PullElementsResponse()
        for element, message_id, count, enqueued, lease in entries:
            pull.element_info.add(
                element=element,
                message_id=message_id,
                delivery_count=count,
                enqueued_at_ms=enqueued,
                lease_expires_at_ms=lease,
            )
        expected = sum(element_info_size(len(e.encode()), *numbers) for e, *numbers in entries)
        assert pull.ByteSize() == expected
        for e, *numbers in entries:  # the store's quick check counts at most this
            assert element_info_size(len(e.encode()), *numbers) <= (
                len(e.encode()) + MAX_ENTRY_OVERHEAD
            )
        pairs = {f"k{i}" * rng.choice([0, 1, 90]): "v" * rng.choice([0, 200]) for i in range(4)}
        whole = pb.MapGetAllResponse(map=pairs)
        assert whole.ByteSize() == sum(key_value_size(len(k), len(v)) for k, v in pairs.items())
        page = pb.MapGetListResponse(list=[pb.KeyValue(key=k, value=v) for k, v in pairs.items()])
        over = whole.ByteSize() - page.ByteSize()  # KeyValue omits empty strings
        assert 0 <= over <= 3 * len(pairs)
    # The answer's own fields fit in what is kept aside for them.
    envelope = pb.MapGetListResponse(code=pb.CODE_OK, offset=2**31 - 1, size=1000)
    assert envelope.ByteSize() + FRAME_BYTES <= ENVELOPE_BYTES + FRAME_BYTES
    assert pb.PullElementsResponse(number=1000).ByteSize() <= ENVELOPE_BYTES


def test_the_bundled_client_receives_what_the_server_may_send() -> None:
    assert MAX_ANSWER_BYTES == Limits().max_response_bytes == 4 * MIB


def test_pull_of_max_size_elements_is_all_delivered(stub: Stub, token: str) -> None:
    # Regression: 4 elements of 1 MiB were taken (4 MiB of payload), the answer was a few
    # bytes over 4 MiB, the client dropped it, and they stayed in flight, unseen.
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="big"))
    add_each(stub, token, "big", [str(i) * MIB for i in range(5)])
    seen: list[str] = []
    for expected in (3, 2):
        pull = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="big", number=5))
        assert (pull.code, pull.number) == (pb.CODE_OK, expected)
        seen += [e.element[0] for e in pull.element_info]
        assert in_flight(stub, token, "big") == len(seen)  # exactly what was delivered
    assert seen == ["0", "1", "2", "3", "4"]


def test_an_answer_filled_to_the_byte_reaches_a_default_client(stub: Stub, token: str) -> None:
    # Ids 1..5, delivery count 1 and an enqueue time of this century (a 6-byte varint):
    # each entry's overhead is the same, so 4 elements of this size fill the room
    # exactly, and a fifth byte each would not fit.
    now = int(time.time() * 1000)
    size = ROOM // 4 - (element_info_size(ROOM // 4, 1, 1, now) - ROOM // 4)
    assert 4 * element_info_size(size, 1, 1, now) <= ROOM
    assert 4 * element_info_size(size + 1, 1, 1, now) > ROOM
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="edge"))
    add_each(stub, token, "edge", ["x" * size] * 5)
    pull = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="edge", number=5))
    assert (pull.code, pull.number) == (pb.CODE_OK, 4)
    assert pull.ByteSize() + FRAME_BYTES <= MAX_ANSWER_BYTES
    assert in_flight(stub, token, "edge") == 4


def test_many_leased_deliveries_fit_a_default_client(stub: Stub, token: str) -> None:
    # Each delivery carries its enqueue time and lease end (about 14 bytes): elements
    # sized so that 200 entries fill the room without them would overshoot by 2.8 KB.
    count = 200
    size = ROOM // count - (element_info_size(ROOM // count, 255, 1) - ROOM // count)
    assert count * element_info_size(size, 255, 1) <= ROOM
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="leased"))
    for half in range(2):
        elements = ["x" * size] * (count // 2 + half)
        added = stub.AddAll(pb.AddAllRequest(token=token, queue_name="leased", elements=elements))
        assert added.code == pb.CODE_OK, added.message
    pull = stub.PullElements(
        pb.PullElementsRequest(
            token=token, queue_name="leased", number=count + 1, ack_deadline_ms=60_000
        )
    )
    assert pull.code == pb.CODE_OK
    assert all(e.enqueued_at_ms and e.lease_expires_at_ms for e in pull.element_info)
    assert pull.ByteSize() + FRAME_BYTES <= MAX_ANSWER_BYTES
    assert 0 < pull.number < count  # the times took the room of a few
    assert in_flight(stub, token, "leased") == pull.number


def test_subscribe_pushes_of_max_size_elements_are_all_delivered(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    add_each(stub, token, "q", [str(i) * MIB for i in range(5)])
    stream = Stream(stub, token, "q", max_unacked=5)
    try:
        first = stream.next()
        assert (first.code, len(first.element_info)) == (pb.CODE_OK, 3)
        # The rest were not put in flight for lack of room in that answer: they come next.
        second = stream.next()
        assert len(second.element_info) == 2
        ids = [e.message_id for e in [*first.element_info, *second.element_info]]
        assert [e.element[0] for e in [*first.element_info, *second.element_info]] == list("01234")
        assert in_flight(stub, token, "q") == 5
        stream.ack(ids)
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 0
    finally:
        stream.close()


def test_map_answers_fit_a_default_client(stub: Stub, token: str) -> None:
    for i in range(5):
        put = pb.MapPutRequest(token=token, map="m", key=f"k{i}", value=str(i) * MIB)
        assert stub.MapPut(put).code == pb.CODE_OK
    page = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", offset=0, size=10))
    assert (page.code, page.size, [kv.key for kv in page.list]) == (0, 3, ["k0", "k1", "k2"])
    rest = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", offset=3, size=10))
    assert [kv.key for kv in rest.list] == ["k3", "k4"]
    whole = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
    assert whole.code == pb.CODE_RESOURCE_EXHAUSTED
    assert "MapGetList" in whole.message
    # One entry of the largest size (key and value of 1 MiB each) always comes.
    big = pb.MapPutRequest(token=token, map="one", key="k" * MIB, value="v" * MIB)
    assert stub.MapPut(big).code == pb.CODE_OK
    alone = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="one"))
    assert (alone.code, len(alone.map["k" * MIB])) == (pb.CODE_OK, MIB)
    stub.MapPut(pb.MapPutRequest(token=token, map="one", key="l" * MIB, value="w" * MIB))
    first = stub.MapGetList(pb.MapGetListRequest(token=token, map="one", offset=0, size=2))
    assert [len(kv.key) for kv in first.list] == [MIB]


def test_the_map_view_pages_to_the_end(server: ServerHandle) -> None:
    # Regression: the view stopped at the first page shorter than page_size, and so
    # returned 3 of these 7 entries without a word.
    values = {f"k{i}": str(i) * MIB for i in range(5)} | {"small1": "a", "small2": "b"}
    with connect(server) as qm:
        m = qm.map("m")
        for key, value in values.items():
            m[key] = value
        assert len(m) == 7
        assert list(m) == sorted(values)
        assert list(m.keys()) == sorted(values)
        assert [len(v) for v in m.values()] == [len(values[k]) for k in sorted(values)]
        assert dict(m.items()) == values
        with pytest.raises(ResourceExhausted):
            m.to_dict()
        m.clear()  # paged too: a map too big for one MapGetAll
        assert (len(m), m.exists()) == (0, True)


def test_limits_that_cannot_carry_one_entry_are_refused(
    make_server: Callable[..., ServerHandle], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="cannot hold one entry"):
        Limits(max_response_bytes=2 * MIB)
    with pytest.raises(SystemExit) as exited:
        server_main(["--data-dir", str(tmp_path), "--max-element-bytes", str(3 * MIB)])
    assert exited.value.code == 2
    assert "cannot hold one entry" in capsys.readouterr().err
    # A server with a larger answer limit serves larger entries, for clients that raise
    # their receive limit too.
    handle = make_server(max_element_bytes=3 * MIB, max_response_bytes=8 * MIB)
    options = [("grpc.max_receive_message_length", 8 * MIB)]
    with grpc.insecure_channel(handle.target, options=options) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        put = pb.MapPutRequest(token=token, map="m", key="k", value="v" * 3 * MIB)
        assert stub.MapPut(put).code == pb.CODE_OK
        got = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
        assert (got.code, len(got.map["k"])) == (pb.CODE_OK, 3 * MIB)
