"""A node on a database that crashes and comes back (a private PostgreSQL instance,
tests/pg_instance.py: the machine's shared one is never restarted).

While the database is down, calls answer CODE_UNAVAILABLE, never INTERNAL or a hang; once
it is back, the same session carries on and everything answered OK before the crash is
there, and the nodes' notifications wake each other again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
from pg_instance import PgInstance, pg_instance  # noqa: F401 (the fixture)
from test_pg_cluster import Node, cross_node_latency

from conftest import ADMIN_PASSWORD, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.store.pg_store import DUE_POLL_S

BACK_WITHIN_S = 30.0
# The listener reconnects RECONNECT_S after its connection failed; each try below takes
# up to a fallback period while it is not back. Woken by notification means several
# wakes in a row each well within that period: one by the recheck may be quick by chance,
# three in a row are not.
RECONNECT_TRIES = 12
WOKEN_IN_A_ROW = 3


def test_a_database_crash_answers_unavailable_then_the_session_carries_on_losing_nothing(
    pg_instance: PgInstance,  # noqa: F811
    make_server: Callable[..., ServerHandle],
    tmp_path: Path,
) -> None:
    server = make_server(tmp_path / "node", store=pg_instance.url, store_schema="qm")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q")).code == 0
        before = stub.AddAll(
            pb.AddAllRequest(token=token, queue_name="q", elements=[f"m{i}" for i in range(20)])
        )
        assert before.code == pb.CODE_OK
        held = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
        assert held.message_id == before.message_ids[0]

        pg_instance.halt("immediate")  # a crash: no checkpoint, every connection cut
        down = stub.Add(pb.AddRequest(token=token, queue_name="q", element="lost"), timeout=30)
        assert down.code == pb.CODE_UNAVAILABLE, down
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q"), timeout=30).code == (
            pb.CODE_UNAVAILABLE
        )

        pg_instance.start()  # recovery from the WAL
        deadline = time.monotonic() + BACK_WITHIN_S
        while True:
            after = stub.Add(pb.AddRequest(token=token, queue_name="q", element="after"))
            if after.code == pb.CODE_OK:
                break
            assert after.code == pb.CODE_UNAVAILABLE, after
            assert time.monotonic() < deadline, "the node did not serve again"
            time.sleep(0.1)
        # The session outlived the outage: it still holds what it polled before.
        acked = stub.Ack(pb.AckRequest(token=token, message_id=held.message_id))
        assert acked.code == pb.CODE_OK
        rest = stub.PullElements(pb.PullElementsRequest(token=token, queue_name="q", number=100))
        assert [e.message_id for e in rest.element_info] == [
            *before.message_ids[1:],
            after.message_id,
        ]
        assert [e.element for e in rest.element_info][-1] == "after"


def test_after_a_database_crash_nodes_wake_each_other_within_milliseconds_again(
    pg_instance: PgInstance,  # noqa: F811
    make_server: Callable[..., ServerHandle],
    tmp_path: Path,
) -> None:
    """Each node's listening connection dies with the database and must come back: an add
    on one node then wakes a long poll on the other by notification again, not only by
    the fallback's recheck (DUE_POLL_S)."""
    a, b = (
        Node(make_server(tmp_path / f"node{i}", store=pg_instance.url, store_schema="qm"))
        for i in range(2)
    )
    assert a.stub.NewQueue(pb.NewQueueRequest(token=a.token, queue_name="q")).code == 0
    pg_instance.restart("immediate")
    for node in (a, b):
        serving_again(node.stub, node.token)
    latencies: list[float] = []
    fast_in_a_row = 0
    while fast_in_a_row < WOKEN_IN_A_ROW:
        assert len(latencies) < RECONNECT_TRIES, latencies
        polled, latency = cross_node_latency(a, b, "q", wait_ms=10_000)
        assert (polled.code, polled.element) == (pb.CODE_OK, "across")
        latencies.append(latency)
        fast_in_a_row = fast_in_a_row + 1 if latency < DUE_POLL_S / 10 else 0


def serving_again(stub: pb_grpc.QueueManagerServiceStub, token: str) -> None:
    """Wait until the node's calls work again after an outage (UNAVAILABLE meanwhile)."""
    deadline = time.monotonic() + BACK_WITHIN_S
    while (code := stub.Size(pb.SizeRequest(token=token, queue_name="q")).code) != 0:
        assert code == pb.CODE_UNAVAILABLE, code
        assert time.monotonic() < deadline, "the node did not serve again"
        time.sleep(0.1)
