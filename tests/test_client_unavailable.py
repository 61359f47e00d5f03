"""A CODE_UNAVAILABLE answer is made again with backoff; Add and AddAll are not.

Against a real server whose store refuses writes for a moment (its connection swapped for
one whose writes fail, as a failing disk does), so the CODE_UNAVAILABLE answers are the
store's own; each store operation the calls reach is counted. And against a server that
drains under a long poll or a subscription: the client raises Unavailable, never reports
an empty queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from client_fixtures import connect, raw_stub
from test_store_faults import FailingWrites

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import KeyNotFound, QueueManagerClient, Unavailable
from qm_client._channel import RETRY_POLICY
from qm_client._retry import (
    NOT_RETRIED_ON_UNAVAILABLE_ANSWER,
    RETRIED_ON_UNAVAILABLE_ANSWER,
    RETRIED_WITH_REQUEST_ID,
)
from qm_server.store.sqlite import SqliteStore

MAX_ATTEMPTS = RETRY_POLICY["maxAttempts"]


class Outage:
    """The server's store with writes that fail until `recover_at` says otherwise."""

    def __init__(self, server: ServerHandle) -> None:
        running = server.thread.server
        assert running is not None and server.thread._loop is not None
        self.store = running.store
        assert isinstance(self.store, SqliteStore) and self.store._writer._conn is not None
        self.writes = FailingWrites(self.store._writer._conn)
        self.attempts: Counter[str] = Counter()
        store, writes = self.store, self.writes

        async def swap() -> None:
            await store._submit(lambda: setattr(store._writer, "_conn", writes))  # on the writer

        asyncio.run_coroutine_threadsafe(swap(), server.thread._loop).result(10)

    def recover_at(self, operation: str, attempt: int) -> None:
        """Count the store's `operation`; writes fail from now until its `attempt`-th
        call, which finds the store writable again (0: they keep failing)."""
        original = getattr(self.store, operation)

        async def counted(*args: Any) -> Any:
            self.attempts[operation] += 1
            if self.attempts[operation] == attempt:
                self.writes.failing = False
            return await original(*args)

        setattr(self.store, operation, counted)
        self.writes.failing = True


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    with connect(server, heartbeat=False) as client:
        client.new_queue("q")
        yield client


@pytest.fixture
def outage(server: ServerHandle, qm: QueueManagerClient) -> Iterator[Outage]:
    failing = Outage(server)
    yield failing
    failing.writes.failing = False  # the server stops after this test


def test_every_rpc_is_classed_as_retried_on_an_unavailable_answer_or_not() -> None:
    rpcs = set(pb.DESCRIPTOR.services_by_name["QueueManagerService"].methods_by_name)
    classes = (
        RETRIED_ON_UNAVAILABLE_ANSWER,
        RETRIED_WITH_REQUEST_ID,
        NOT_RETRIED_ON_UNAVAILABLE_ANSWER,
    )
    assert sum(len(c) for c in classes) == len(rpcs)
    assert rpcs == set().union(*classes)


def test_a_poll_answered_unavailable_claimed_nothing_and_is_made_again(
    qm: QueueManagerClient, outage: Outage
) -> None:
    outage.writes.failing = False
    qm.add("q", "a")
    outage.recover_at("claim", 3)
    message = qm.poll("q")
    assert outage.attempts["claim"] == 3
    assert message is not None
    # The failed claims took nothing: this is the message's first delivery, and the only
    # message in flight.
    assert (message.element, message.delivery_count) == ("a", 1)
    assert (qm.size("q"), qm.unacked("q")) == (0, 1)
    outage.recover_at("ack", 2)
    message.ack()
    assert outage.attempts["ack"] == 2
    assert (qm.size("q"), qm.unacked("q")) == (0, 0)


def test_a_read_answered_unavailable_is_made_again(
    server: ServerHandle, qm: QueueManagerClient, outage: Outage
) -> None:
    outage.recover_at("queue_counts", 3)
    with raw_stub(server) as stub:  # a failed write first: the store is now unhealthy
        failed = stub.Add(pb.AddRequest(token=qm.token, queue_name="q", element="lost"))
    assert failed.code == pb.CODE_UNAVAILABLE
    assert qm.size("q") == 0
    assert outage.attempts["queue_counts"] == 3


def test_map_writes_answered_unavailable_are_made_again(
    qm: QueueManagerClient, outage: Outage
) -> None:
    m = qm.map("m")
    outage.recover_at("map_put", 3)
    m["k"] = "v"
    assert outage.attempts["map_put"] == 3
    assert m["k"] == "v"
    outage.recover_at("map_remove", 2)
    del m["k"]  # its first attempt removed nothing, so the second finds the key
    assert outage.attempts["map_remove"] == 2
    with pytest.raises(KeyNotFound):
        m["k"]


def test_adds_answered_unavailable_are_not_made_again(
    qm: QueueManagerClient, outage: Outage
) -> None:
    outage.recover_at("enqueue", 3)
    with pytest.raises(Unavailable) as caught:
        qm.add("q", "a")
    assert caught.value.code == pb.CODE_UNAVAILABLE
    with pytest.raises(Unavailable):
        qm.add_all("q", ["b", "c"])
    assert outage.attempts["enqueue"] == 2  # once each
    assert qm.add("q", "d") > 0  # the store recovers at the next attempt
    assert qm.size("q") == 1


def test_an_add_with_a_request_id_answered_unavailable_is_made_again(
    qm: QueueManagerClient, outage: Outage
) -> None:
    outage.recover_at("enqueue", 3)
    first = qm.add("q", "a", request_id="add-1")
    assert outage.attempts["enqueue"] == 3
    assert qm.size("q") == 1  # added once
    assert qm.add("q", "a", request_id="add-1") == first  # and its first id is kept
    assert qm.size("q") == 1


def test_an_idempotent_add_all_answered_unavailable_is_made_again(
    qm: QueueManagerClient, outage: Outage
) -> None:
    outage.recover_at("enqueue", 2)
    batch = qm.add_all("q", ["b", "c"], idempotent=True)
    assert outage.attempts["enqueue"] == 2
    assert not batch.replayed
    assert qm.size("q") == 2


def test_repeats_stop_at_the_policy_limit(qm: QueueManagerClient, outage: Outage) -> None:
    outage.recover_at("map_put", 0)
    with pytest.raises(Unavailable) as caught:
        qm.map("m")["k"] = "v"
    assert caught.value.code == pb.CODE_UNAVAILABLE
    assert caught.value.grpc_status is None
    assert outage.attempts["map_put"] == MAX_ATTEMPTS


def parked(server: ServerHandle) -> threading.Event:
    """Set once a long poll or a subscription parks on its queue in the server."""
    engine = server.thread.server.engine if server.thread.server else None
    assert engine is not None
    event = threading.Event()
    park = engine.signals.park

    def park_and_tell(name: str, waiter: asyncio.Future[None]) -> None:
        park(name, waiter)
        event.set()

    engine.signals.park = park_and_tell  # type: ignore[method-assign]
    return event


def test_a_long_poll_cut_short_by_the_drain_raises_unavailable(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    """A worker loop that stops when poll returns None must not stop because the server
    restarts: poll raises Unavailable instead."""
    waiting = parked(server)
    outcome: list[object] = []

    def poll() -> None:
        try:
            outcome.append(qm.poll("q", wait=20))
        except Unavailable as error:
            outcome.append(error)

    poller = threading.Thread(target=poll)
    poller.start()
    assert waiting.wait(10)
    server.stop()
    poller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome


def test_a_subscription_ended_by_the_drain_raises_unavailable(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    waiting = parked(server)
    with qm.subscribe("q") as subscription:
        assert waiting.wait(10)  # the stream waits on the empty queue
        server.stop()
        with pytest.raises(Unavailable) as caught:
            next(subscription)
    assert caught.value.code == pb.CODE_UNAVAILABLE
