"""Several nodes on one PostgreSQL schema behave as one server: an add on one node wakes
long polls and streams on the others within milliseconds (LISTEN/NOTIFY), or within the
fallback's period when notifications are off; a destroy on one node ends streams on the
others.

Each test takes a schema of its own (tests/pg_fixtures.py); the nodes are in-process
servers (tests/conftest.py) that share it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from pg_fixtures import pg_config, pg_store

from conftest import ADMIN_PASSWORD, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.auth import KEY_FILE, KeyPair
from qm_server.challenges import SignedChallenges
from qm_server.quotas import Room
from qm_server.store.pg_store import DUE_POLL_S

ROOM = Room.server_wide("queues", 100)
Stub = pb_grpc.QueueManagerServiceStub


class Node:
    """One server of the cluster, with a channel, a stub and an admin token."""

    def __init__(self, handle: ServerHandle) -> None:
        self.handle = handle
        self.channel = grpc.insecure_channel(handle.target)
        self.stub = Stub(self.channel)
        self.token = login(self.stub, "admin", ADMIN_PASSWORD)

    def waiting(self) -> int:
        """Long polls and streams parked on this node (read from the test's thread)."""
        server = self.handle.thread.server
        assert server is not None
        engine = server.engine
        assert engine is not None
        return engine.signals.waiting()


def start_nodes(
    make_server: Callable[..., ServerHandle], tmp_path: Path, count: int = 2, **overrides: Any
) -> list[Node]:
    config = pg_config(tmp_path / "cluster")
    nodes = []
    for index in range(count):
        handle = make_server(
            tmp_path / f"node{index}",
            store=config.store,
            store_schema=config.store_schema,
            **overrides,
        )
        nodes.append(Node(handle))
    return nodes


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def cross_node_latency(a: Node, b: Node, name: str, wait_ms: int) -> tuple[pb.PollResponse, float]:
    """Park a long poll on b, add on a; what b's poll got and the seconds from the add's
    answer to the poll's."""
    answer: list[pb.PollResponse] = []
    at: list[float] = []

    def run() -> None:
        request = pb.PollRequest(token=b.token, queue_name=name, wait_ms=wait_ms)
        answer.append(b.stub.Poll(request))
        at.append(time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: b.waiting() == 1)
    added = a.stub.Add(pb.AddRequest(token=a.token, queue_name=name, element="across"))
    added_at = time.monotonic()
    assert added.code == pb.CODE_OK
    thread.join()
    assert answer[0].message_id == added.message_id
    return answer[0], at[0] - added_at


def test_an_add_on_one_node_wakes_a_long_poll_on_another_within_milliseconds(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    assert a.stub.NewQueue(pb.NewQueueRequest(token=a.token, queue_name="q")).code == 0
    latencies = []
    for _ in range(5):
        polled, latency = cross_node_latency(a, b, "q", wait_ms=10_000)
        assert (polled.code, polled.element) == (pb.CODE_OK, "across")
        latencies.append(latency)
    # Well within the fallback's period: the notification woke it, not the recheck.
    assert max(latencies) < DUE_POLL_S / 4, latencies
    print(f"cross-node wake-up latencies (ms): {[round(x * 1000, 1) for x in latencies]}")


def test_without_notify_the_fallback_still_delivers_within_its_period(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path, store_no_notify=True)
    assert a.stub.NewQueue(pb.NewQueueRequest(token=a.token, queue_name="q")).code == 0
    polled, latency = cross_node_latency(a, b, "q", wait_ms=10_000)
    assert (polled.code, polled.element) == (pb.CODE_OK, "across")
    # The recheck runs once per DUE_POLL_S; a claim and an answer on top.
    assert latency < DUE_POLL_S + 0.5, latency
    print(f"cross-node wake-up latency without notify (ms): {latency * 1000:.1f}")


def test_a_nack_on_one_node_wakes_a_long_poll_on_another_within_milliseconds(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    assert a.stub.NewQueue(pb.NewQueueRequest(token=a.token, queue_name="q")).code == 0
    added = a.stub.Add(pb.AddRequest(token=a.token, queue_name="q", element="again"))
    taken = a.stub.Poll(pb.PollRequest(token=a.token, queue_name="q", wait_ms=1000))
    assert taken.message_id == added.message_id
    answer: list[pb.PollResponse] = []
    at: list[float] = []

    def run() -> None:
        answer.append(b.stub.Poll(pb.PollRequest(token=b.token, queue_name="q", wait_ms=10_000)))
        at.append(time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: b.waiting() == 1)
    nack = pb.AckRequest(token=a.token, message_id=added.message_id, ack_type=pb.ACK_TYPE_ERROR)
    assert a.stub.Ack(nack).code == pb.CODE_OK
    nacked_at = time.monotonic()
    thread.join()
    assert (answer[0].message_id, answer[0].delivery_count) == (added.message_id, 2)
    assert at[0] - nacked_at < DUE_POLL_S / 4, at[0] - nacked_at


class Stream:
    """A Subscribe stream: responses read in a thread, acks sent from the test."""

    def __init__(self, node: Node, name: str, max_unacked: int) -> None:
        self._requests: queue.Queue[pb.SubscribeRequest | None] = queue.Queue()
        self._requests.put(
            pb.SubscribeRequest(
                open=pb.SubscribeOpen(token=node.token, queue_name=name, max_unacked=max_unacked)
            )
        )
        self.responses: queue.Queue[pb.SubscribeResponse | None] = queue.Queue()
        self._call = node.stub.Subscribe(self._outgoing())
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _outgoing(self) -> Iterator[pb.SubscribeRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(response)
        except grpc.RpcError:
            pass
        self.responses.put(None)

    def next(self, timeout_s: float = 5.0) -> pb.SubscribeResponse | None:
        return self.responses.get(timeout=timeout_s)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join()


def test_streams_on_another_node_get_its_adds_and_end_with_its_destroy(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    assert a.stub.NewQueue(pb.NewQueueRequest(token=a.token, queue_name="q")).code == 0
    stream = Stream(b, "q", max_unacked=1)
    try:
        wait_until(lambda: b.waiting() == 1)
        added = a.stub.Add(pb.AddRequest(token=a.token, queue_name="q", element="pushed"))
        added_at = time.monotonic()
        pushed = stream.next()
        assert time.monotonic() - added_at < DUE_POLL_S / 4  # woken, not rechecked
        assert pushed is not None
        assert [e.message_id for e in pushed.element_info] == [added.message_id]
        # The stream's window is full: it waits for an ack, not on the queue. A destroy
        # on the other node ends it all the same, without waiting for the fallback.
        destroy = pb.DestroyQueueRequest(token=a.token, queue_name="q", force=True)
        assert a.stub.DestroyQueue(destroy).code == pb.CODE_OK
        destroyed_at = time.monotonic()
        ended = stream.next()
        latency = time.monotonic() - destroyed_at
        assert ended is not None
        assert ended.code == pb.CODE_QUEUE_NOT_FOUND
        assert stream.next() is None  # and the stream is over
        assert latency < DUE_POLL_S / 2, latency
    finally:
        stream.close()


def test_a_burst_of_adds_to_one_queue_sends_few_notifications(tmp_path: Path) -> None:
    asyncio.run(burst_of_adds(tmp_path))


async def burst_of_adds(tmp_path: Path) -> None:
    a = pg_store(tmp_path / "s")
    b = pg_store(tmp_path / "s")
    await a.open()
    await b.open()
    try:
        woken: list[str] = []
        b.set_ready_listener(woken.append)
        await a.create_queue("q", ROOM)
        assert a._signals is not None
        # Adds in parallel: 200 commits, far fewer notifications.
        await asyncio.gather(*(a.enqueue("q", [f"m{i}"]) for i in range(200)))
        deadline = time.monotonic() + 5
        while not woken:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        assert set(woken) == {"q"}
        assert 1 <= a._signals.sent < 50, a._signals.sent
        print(f"200 parallel adds to one queue: {a._signals.sent} notifications")
    finally:
        await a.close()
        await b.close()


def test_every_node_shows_the_same_server_key(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    nodes = start_nodes(make_server, tmp_path, count=3)
    challenges = [n.stub.GetChallenge(pb.GetChallengeRequest()) for n in nodes]
    assert len({c.fingerprint for c in challenges}) == 1
    assert len({c.public_key_pem for c in challenges}) == 1
    # The key is the store's: no node made one of its own in its data directory.
    assert not any((n.handle.data_dir / KEY_FILE).exists() for n in nodes)


def test_the_first_node_carries_its_data_directorys_key_into_the_store(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    own = KeyPair.load_or_create(ensure_dir_of(tmp_path / "node0"), 1024)
    a, b = start_nodes(make_server, tmp_path)
    for node in (a, b):
        assert node.stub.GetChallenge(pb.GetChallengeRequest()).fingerprint == own.fingerprint


def ensure_dir_of(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_nodes_starting_together_create_one_shared_secret(tmp_path: Path) -> None:
    async def main() -> None:
        stores = [pg_store(tmp_path / "s", timed=False, notify=False) for _ in range(5)]
        for store in stores:
            await store.open()
        try:
            values = await asyncio.gather(
                *(
                    s.shared_secret("k", lambda i=i: f"made by {i}".encode())
                    for i, s in enumerate(stores)
                )
            )
            assert len(set(values)) == 1
            again = await stores[0].shared_secret("k", lambda: b"never")
            assert again == values[0]
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())


def test_a_challenge_from_one_node_logs_in_on_another_once(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    challenge = a.stub.GetChallenge(pb.GetChallengeRequest())
    assert len(challenge.challenge) == 32
    request = pb.AuthRequest(username="admin", password=encrypt_password(challenge, ADMIN_PASSWORD))
    reply = b.stub.Auth(request)
    assert reply.code == pb.CODE_OK, reply.message
    # The token works on the node that logged it in.
    made = b.stub.NewQueue(pb.NewQueueRequest(token=reply.token, queue_name="q"))
    assert made.code == pb.CODE_OK
    # Burnt: the same answer is refused on every node, the one that issued it included.
    for node in (a, b):
        assert node.stub.Auth(request).code == pb.CODE_UNAUTHENTICATED


def test_signed_challenges_are_one_use_bounded_in_time_and_unforgeable(tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        stores = [
            pg_store(tmp_path / "s", clock=clock, timed=False, notify=False) for _ in range(4)
        ]
        for store in stores:
            await store.open()
        try:
            key = b"k" * 32
            nodes = [SignedChallenges(key, 60.0, s, clock) for s in stores]
            challenge = nodes[0].issue()
            assert len(challenge) == 32
            # Every node tries it at once: exactly one login gets it.
            burnt = await asyncio.gather(*(n.burn(challenge) for n in nodes))
            assert sorted(burnt) == [False, False, False, True]
            # Altered, another cluster's, or cut short: refused, and nothing is stored.
            fresh = nodes[1].issue()
            altered = fresh[:12] + bytes([fresh[12] ^ 1]) + fresh[13:]
            assert not await nodes[2].burn(altered)
            assert not await SignedChallenges(b"x" * 32, 60.0, stores[0], clock).burn(fresh)
            assert not await nodes[2].burn(fresh[:31])
            assert await nodes[2].burn(fresh)
            # Expired by the store's clock: refused although never used.
            late = nodes[3].issue()
            clock.ms += 60_000
            assert not await nodes[0].burn(late)
            # Used ones are forgotten once expired (their expiry alone refuses them).
            await stores[0]._prune_challenges()
            async with stores[0]._conn() as conn:
                cursor = await conn.execute("SELECT count(*) FROM used_challenges")
                assert await cursor.fetchone() == (0,)
            assert not await nodes[0].burn(challenge)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> float:
        return self.ms / 1000
