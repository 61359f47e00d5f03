"""Long polls and concurrent producers and consumers against one real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub


def test_long_poll_wakes_on_add(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    waiting = stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
    started = time.monotonic()
    assert not waiting.done()
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="late"))
    reply = waiting.result(timeout=10)
    assert (reply.code, reply.element) == (pb.CODE_OK, "late")
    assert time.monotonic() - started < 5


def test_long_poll_times_out_with_queue_empty(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    started = time.monotonic()
    reply = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=200))
    elapsed = time.monotonic() - started
    assert reply.code == pb.CODE_QUEUE_EMPTY
    assert 0.19 <= elapsed < 3


def test_negative_wait_is_invalid(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    reply = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=-1))
    assert reply.code == pb.CODE_INVALID_ARGUMENT


def test_wait_is_capped(make_server: Callable[..., ServerHandle]) -> None:
    handle = make_server(max_wait_ms=100)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        started = time.monotonic()
        reply = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=60_000))
        assert reply.code == pb.CODE_QUEUE_EMPTY
        assert time.monotonic() - started < 5


def test_many_waiters_each_get_one_message(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    waiters = [
        stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
        for _ in range(20)
    ]
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=[str(i) for i in range(20)]))
    got = sorted(int(w.result(timeout=10).element) for w in waiters)
    assert got == list(range(20))


def test_destroy_wakes_waiters_with_queue_not_found(stub: Stub, token: str) -> None:
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    waiting = stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
    stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name="q"))
    assert waiting.result(timeout=10).code == pb.CODE_QUEUE_NOT_FOUND


def test_concurrent_producers_and_consumers_lose_and_repeat_nothing(
    server: ServerHandle, stub: Stub, token: str
) -> None:
    producers, consumers, per_producer = 4, 4, 250
    stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="work"))
    added: list[int] = []
    consumed: list[tuple[str, int]] = []
    lock = threading.Lock()
    producing_done = threading.Event()

    def produce(n: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            s = Stub(channel)
            t = login(s, "admin", server.admin_password)
            for i in range(per_producer):
                if i % 2:
                    reply = s.Add(pb.AddRequest(token=t, queue_name="work", element=f"{n}-{i}"))
                    ids = [reply.message_id]
                else:
                    batch = s.AddAll(
                        pb.AddAllRequest(token=t, queue_name="work", elements=[f"{n}-{i}"])
                    )
                    ids = list(batch.message_ids)
                with lock:
                    added.extend(ids)

    def consume() -> None:
        with grpc.insecure_channel(server.target) as channel:
            s = Stub(channel)
            t = login(s, "admin", server.admin_password)
            while True:
                pulled = s.PullElements(
                    pb.PullElementsRequest(token=t, queue_name="work", number=7, wait_ms=200)
                )
                if pulled.code == pb.CODE_QUEUE_EMPTY:
                    if producing_done.is_set():
                        return
                    continue
                assert pulled.code == pb.CODE_OK
                ids = [e.message_id for e in pulled.element_info]
                acked = s.BatchAck(pb.BatchAckRequest(token=t, message_ids=ids))
                assert [r.code for r in acked.results] == [pb.CODE_OK] * len(ids)
                with lock:
                    consumed.extend((e.element, e.message_id) for e in pulled.element_info)

    with ThreadPoolExecutor(producers + consumers) as pool:
        consumer_jobs = [pool.submit(consume) for _ in range(consumers)]
        producer_jobs = [pool.submit(produce, n) for n in range(producers)]
        for job in producer_jobs:
            job.result(timeout=60)
        producing_done.set()
        for job in consumer_jobs:
            job.result(timeout=60)

    consumed_ids = [message_id for _, message_id in consumed]
    assert len(consumed_ids) == len(set(consumed_ids))  # no duplicate delivery
    assert sorted(consumed_ids) == sorted(added)  # nothing lost
    assert len(added) == producers * per_producer
    sizes = stub.Size(pb.SizeRequest(token=token, queue_name="work"))
    in_flight = stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name="work"))
    assert (sizes.size, in_flight.ack_num) == (0, 0)


def test_long_poll_longer_than_ttl_keeps_session(
    make_server: Callable[..., ServerHandle],
) -> None:
    """Regression: a session whose only activity is a long wait must not expire under it."""
    handle = make_server(session_ttl_s=0.5)
    with grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", handle.admin_password)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        reply = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=1500))
        assert reply.code == pb.CODE_QUEUE_EMPTY
        assert stub.HeartBeat(pb.HeartBeatRequest(token=token)).code == pb.CODE_OK
