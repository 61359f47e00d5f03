"""Every map RPC and every code it can answer, through a real channel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.answer_size import ENVELOPE_BYTES, FRAME_BYTES, key_value_size

Stub = pb_grpc.QueueManagerServiceStub


def kv(key: str, value: str) -> pb.KeyValue:
    return pb.KeyValue(key=key, value=value)


def test_put_get_remove(stub: Stub, token: str) -> None:
    assert stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v")).code == 0
    got = stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k"))
    assert (got.code, got.HasField("value"), got.value) == (pb.CODE_OK, True, "v")
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v2"))
    assert stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k")).value == "v2"
    assert stub.MapRemove(pb.MapRemoveRequest(token=token, map="m", key="k")).code == 0
    missing = stub.MapGet(pb.MapGetRequest(token=token, map="m", key="k"))
    assert (missing.code, missing.HasField("value")) == (pb.CODE_KEY_NOT_FOUND, False)
    removed_twice = stub.MapRemove(pb.MapRemoveRequest(token=token, map="m", key="k"))
    assert removed_twice.code == pb.CODE_KEY_NOT_FOUND
    # The map survives losing its last key.
    assert stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m")).code == pb.CODE_OK


def test_empty_string_value_is_present(stub: Stub, token: str) -> None:
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="", value=""))
    got = stub.MapGet(pb.MapGetRequest(token=token, map="m", key=""))
    assert (got.code, got.HasField("value"), got.value) == (pb.CODE_OK, True, "")


def test_missing_map_codes(stub: Stub, token: str) -> None:
    replies: list[Any] = [
        stub.MapGet(pb.MapGetRequest(token=token, map="none", key="k")),
        stub.MapRemove(pb.MapRemoveRequest(token=token, map="none", key="k")),
        stub.MapGetAll(pb.MapGetAllRequest(token=token, map="none")),
        stub.MapGetList(pb.MapGetListRequest(token=token, map="none", offset=0, size=1)),
        stub.MapDestroy(pb.MapDestroyRequest(token=token, map="none")),
    ]
    assert [r.code for r in replies] == [pb.CODE_MAP_NOT_FOUND] * len(replies)


def test_bad_map_name(stub: Stub, token: str) -> None:
    reply = stub.MapPut(pb.MapPutRequest(token=token, map="bad name", key="k", value="v"))
    assert reply.code == pb.CODE_INVALID_ARGUMENT
    assert "map" in reply.message


def test_maps_and_queues_are_separate_namespaces(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="same"))
    assert stub.MapGetAll(pb.MapGetAllRequest(token=token, map="same")).code == (
        pb.CODE_MAP_NOT_FOUND
    )
    stub.MapPut(pb.MapPutRequest(token=token, map="same", key="k", value="v"))
    assert stub.Size(pb.SizeRequest(token=token, queue_name="same")).code == pb.CODE_OK


def test_batch_put_get_all_and_destroy(stub: Stub, token: str) -> None:
    pairs = [kv("b", "2"), kv("a", "1"), kv("b", "3")]
    reply = stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map="m", size=3, list=pairs))
    assert reply.code == pb.CODE_OK
    everything = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
    assert (everything.code, dict(everything.map)) == (pb.CODE_OK, {"a": "1", "b": "3"})
    assert stub.MapDestroy(pb.MapDestroyRequest(token=token, map="m")).code == pb.CODE_OK
    gone = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
    assert gone.code == pb.CODE_MAP_NOT_FOUND


@pytest.mark.parametrize(("size", "count"), [(2, 3), (4, 3), (0, 0)])
def test_batch_put_size_must_match(stub: Stub, token: str, size: int, count: int) -> None:
    pairs = [kv(f"k{i}", "v") for i in range(count)]
    reply = stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map="m", size=size, list=pairs))
    assert reply.code == pb.CODE_INVALID_ARGUMENT
    assert stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m")).code == (pb.CODE_MAP_NOT_FOUND)


def test_batch_put_is_atomic(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_element_bytes=4)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.MapPut(pb.MapPutRequest(token=token, map="m", key="a", value="old"))
        pairs = [kv("a", "new"), kv("b", "too long")]
        reply = stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map="m", size=2, list=pairs))
        assert reply.code == pb.CODE_INVALID_ARGUMENT
        everything = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
        assert dict(everything.map) == {"a": "old"}


def test_get_list_pages_in_utf8_byte_order(stub: Stub, token: str) -> None:
    keys = ["b", "a", "é", "Z", "aa", "z"]
    stub.MapBatchPut(
        pb.MapBatchPutRequest(
            token=token, map="m", size=len(keys), list=[kv(k, k.upper()) for k in keys]
        )
    )
    expected = sorted(keys, key=lambda k: k.encode())
    pages: list[str] = []
    for offset in range(0, 8, 2):
        page = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", offset=offset, size=2))
        assert (page.code, page.offset) == (pb.CODE_OK, offset)
        assert page.size == len(page.list)
        pages.extend(e.key for e in page.list)
    assert pages == expected
    past = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", offset=100, size=5))
    assert (past.code, past.size, list(past.list)) == (pb.CODE_OK, 0, [])


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (0, 0), (0, 1001)])
def test_get_list_bounds(stub: Stub, token: str, offset: int, size: int) -> None:
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v"))
    page = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", offset=offset, size=size))
    assert page.code == pb.CODE_INVALID_ARGUMENT


def test_map_limit(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_maps=1)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        assert stub.MapPut(pb.MapPutRequest(token=token, map="a", key="k", value="v")).code == 0
        refused = stub.MapPut(pb.MapPutRequest(token=token, map="b", key="k", value="v"))
        assert refused.code == pb.CODE_RESOURCE_EXHAUSTED
        # Writing to the existing map is still fine.
        assert stub.MapPut(pb.MapPutRequest(token=token, map="a", key="j", value="v")).code == 0


def test_answers_stay_within_byte_limits(make_server: Callable[..., ServerHandle]) -> None:
    entry = key_value_size(2, 99)  # key "k0", a value of 99 bytes, encoded
    room = 2 * entry + entry // 2  # two entries fit, three do not
    handle = make_server(
        max_element_bytes=100,
        max_batch=8,
        max_response_bytes=FRAME_BYTES + ENVELOPE_BYTES + room,
    )
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        pairs = [kv(f"k{i}", "v" * 99) for i in range(2)]
        stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map="m", size=2, list=pairs))
        assert len(stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m")).map) == 2
        pairs = [kv(f"k{i}", "v" * 99) for i in range(2, 9)]
        stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map="m", size=7, list=pairs))
        page = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", offset=0, size=9))
        assert (page.code, page.size, [e.key for e in page.list]) == (pb.CODE_OK, 2, ["k0", "k1"])
        too_big = stub.MapGetAll(pb.MapGetAllRequest(token=token, map="m"))
        assert too_big.code == pb.CODE_RESOURCE_EXHAUSTED
        assert "MapGetList" in too_big.message
