"""Three qm-server processes on one PostgreSQL schema, under load, lose a node to SIGKILL
and have another paused (SIGSTOP) for longer than the session TTL.

Producers and consumers (the Python client, one channel each) are spread over the nodes
and move to another node when theirs stops answering. Besides the load on `q`, three
holders take messages of `held` and keep them unacked: one on the node that is killed,
two on the node that is paused (one idle, one with a long poll parked on the server).
Sessions live in the database, so the killed node's holder carries its session on at
another node with the same token; what the lost sessions held comes back once they
expire, to a witness on the surviving node, which holds those messages while the paused
node resumes and its holders try to ack them.

What must hold (the issue's proof of scale-out):
- no add answered OK is lost: each is acked done with an OK answer, or its done-ack's
  answer was lost on its last delivery;
- no message is held by two sessions at once: no delivery of an id happens between
  another delivery of it and that delivery's ack, when that ack succeeded; and no
  done-ack is refused unless the client was told its session had ended;
- the killed node's holder acks at another node in its session, and the message it
  left comes back to the witness (delivered again, delivery_count 2), as do the paused
  node's holders' messages;
- the resumed node acks none of what was delivered again meanwhile (an ack it held in
  its socket through the pause included: acks name the holding session), its holders
  are told their sessions ended, with what they held, and the witness's acks of those
  messages all succeed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest
from pg_fixtures import pg_config
from server_process import ServerProcess

from conftest import ADMIN_PASSWORD
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client import Message, QueueManagerClient, SessionLoss
from qm_client.errors import (
    DeadlineExceeded,
    MessageNotFound,
    TransportError,
    Unavailable,
)

NODES = 3
KILLED, PAUSED, SURVIVOR = 0, 1, 2
SESSION_TTL_S = 3.0
# Short, so that a call to the paused node gives up and its client moves (the pause lasts
# a session TTL and more); a call given up on a live node only moves its client too.
CALL_TIMEOUT_S = 2.0
# What the lost nodes' sessions held is released once those sessions expire: no activity
# for the TTL (a node writes its sessions' activity every TTL/4), then a live node's
# sweep (every TTL/4) deletes them. Generous: a wait for it ends when it happens.
RELEASE_WITHIN_S = 2 * SESSION_TTL_S + 15
HELD_EACH = 2
LOAD_ACKS_BEFORE_FAULTS = 40  # the load is under way before the faults
MAX_ADDS_PER_PRODUCER = 5_000  # every loop is bounded, besides its stop event
WORK_S = 0.005
LOST = (Unavailable, TransportError, DeadlineExceeded)  # no answer from that node


@dataclass
class Delivered:
    """One delivery of one message to one session, with the ack that followed it."""

    message_id: int
    count: int
    sent_at: float  # the claim was sent
    got_at: float  # its answer arrived
    acked_sent_at: float | None = None  # the done-ack was sent, and answered OK
    ack_unknown: bool = False  # the done-ack's answer was lost


@dataclass
class Ledger:
    """What the load saw, shared by its threads (list appends and dict sets are atomic)."""

    added: dict[int, str] = field(default_factory=dict)  # adds answered OK
    deliveries: list[Delivered] = field(default_factory=list)
    reconnects: list[tuple[int, int]] = field(default_factory=list)  # (from node, to node)
    # Deliveries (id, delivery_count) whose session the client was told had ended, and
    # done-acks refused although the client was told no such thing.
    released: set[tuple[int, int]] = field(default_factory=set)
    refused: list[tuple[int, int]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    acked = 0

    def session_lost(self, loss: SessionLoss) -> None:
        self.released |= {(m.message_id, m.delivery_count) for m in loss.released}


class Cluster:
    """The nodes, and which of them the test has taken down (killed or paused)."""

    def __init__(self, tmp_path: Path) -> None:
        config = pg_config(tmp_path / "cluster")
        assert config.store and config.store_schema
        args = ("--store", config.store, "--store-schema", config.store_schema,
                "--session-ttl", str(SESSION_TTL_S), "--rsa-bits", "2048")  # fmt: skip
        env = {"QM_ADMIN_PASSWORD": ADMIN_PASSWORD}
        self.nodes = [ServerProcess(tmp_path / f"node{i}", *args, env=env) for i in range(NODES)]
        self.down: set[int] = set()

    def start(self) -> None:
        self.nodes[0].start()  # the first creates the schema, the key and the admin
        starting = [threading.Thread(target=n.start) for n in self.nodes[1:]]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
            node.stop()

    def client(
        self, node: int, on_session_lost: Callable[[SessionLoss], None] | None = None
    ) -> QueueManagerClient:
        return QueueManagerClient(
            self.nodes[node].target,
            "admin",
            ADMIN_PASSWORD,
            timeout=CALL_TIMEOUT_S,
            on_session_lost=on_session_lost,
        )

    def connect(
        self, home: int, ledger: Ledger, left: int | None = None
    ) -> tuple[int, QueueManagerClient]:
        """A client on `home`, or on the next node up that answers a login; `left`: the
        node that stopped answering (the move is recorded)."""
        for step in range(NODES):
            node = (home + step) % NODES
            if node in self.down:
                continue
            try:
                client = self.client(node, on_session_lost=ledger.session_lost)
            except LOST:
                continue
            if left is not None:
                ledger.reconnects.append((left, node))
            return node, client
        raise RuntimeError("no node answers a login")

    def signal(self, node: int, signum: signal.Signals) -> None:
        proc = self.nodes[node].proc
        assert proc is not None
        os.kill(proc.pid, signum)


def guarded(ledger: Ledger, run: Callable[..., object], *args: object) -> threading.Thread:
    """A thread running run(*args); what it raises is kept in ledger.errors."""

    def body() -> None:
        try:
            run(*args)
        except BaseException as exc:
            ledger.errors.append(exc)

    return threading.Thread(target=body, daemon=True)


def produce(cluster: Cluster, home: int, ledger: Ledger, stop: threading.Event) -> None:
    """Add one message at a time; move to another node when this one stops answering."""
    node, client = cluster.connect(home, ledger)
    for n in range(MAX_ADDS_PER_PRODUCER):
        if stop.is_set():
            break
        element = f"p{home}-{n}"
        try:
            ledger.added[client.add("q", element)] = element
        except LOST:
            client.close(logout=False)
            node, client = cluster.connect(node + 1, ledger, left=node)
    client.close()


def consume(cluster: Cluster, home: int, ledger: Ledger, stop: threading.Event) -> None:
    """Pull a few, ack them done in one BatchAck; every delivery and ack is recorded."""
    node, client = cluster.connect(home, ledger)
    while not stop.is_set():
        sent_at = time.monotonic()
        try:
            messages = client.pull("q", 8, wait=0.2)
        except LOST:
            client.close(logout=False)
            node, client = cluster.connect(node + 1, ledger, left=node)
            continue
        got_at = time.monotonic()
        records = [Delivered(m.message_id, m.delivery_count, sent_at, got_at) for m in messages]
        ledger.deliveries.extend(records)
        if not messages:
            continue
        time.sleep(WORK_S)  # the work: messages are held a moment before their ack
        ack_sent_at = time.monotonic()
        try:
            failed = {id(m) for m in client.ack_many(messages)}
        except LOST:
            for record in records:
                record.ack_unknown = True
            client.close(logout=False)
            node, client = cluster.connect(node + 1, ledger, left=node)
            continue
        for message, record in zip(messages, records, strict=True):
            if id(message) not in failed:
                record.acked_sent_at = ack_sent_at
                ledger.acked += 1
            elif (message.message_id, message.delivery_count) not in ledger.released:
                ledger.refused.append((message.message_id, message.delivery_count))
    client.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def take(client: QueueManagerClient, queue: str, count: int, timeout_s: float) -> list[Message]:
    """Pull until `count` messages are held (long polls, bounded by `timeout_s`)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += client.pull(queue, count - len(got), wait=min(2.0, timeout_s))
    return got


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    try:
        made.start()
        yield made
    finally:
        made.stop()


def test_a_killed_and_a_paused_node_lose_nothing_and_hold_nothing_twice(
    cluster: Cluster,
) -> None:
    ledger = Ledger()
    stop = threading.Event()
    admin = cluster.client(SURVIVOR)
    for name in ("q", "held", "idle"):
        admin.new_queue(name)
    held_ids = admin.add_all("held", [f"h{i}" for i in range(3 * HELD_EACH)])

    # The holders: on the node to be killed, and two on the node to be paused.
    killed_holder = cluster.client(KILLED)
    losses: dict[str, list[SessionLoss]] = {"idle": [], "polling": []}
    idle_holder = cluster.client(PAUSED, on_session_lost=losses["idle"].append)
    polling_holder = cluster.client(PAUSED, on_session_lost=losses["polling"].append)
    held = {
        "killed": take(killed_holder, "held", HELD_EACH, 10),
        "idle": take(idle_holder, "held", HELD_EACH, 10),
        "polling": take(polling_holder, "held", HELD_EACH, 10),
    }
    assert sorted(m.message_id for ms in held.values() for m in ms) == sorted(held_ids)
    parked: list[Message | None] = []
    long_poll = guarded(ledger, lambda: parked.append(polling_holder.poll("idle", wait=20)))
    long_poll.start()

    workers = [
        guarded(ledger, work, cluster, n, ledger, stop)
        for work in (produce, consume)
        for n in range(NODES)
    ]
    for worker in workers:
        worker.start()
    late_acks: list[int] = []
    try:
        wait_for(lambda: ledger.acked >= LOAD_ACKS_BEFORE_FAULTS or bool(ledger.errors), 30,
                 "the load to get going")  # fmt: skip
        assert not ledger.errors, ledger.errors

        # The faults, mid-load.
        cluster.down |= {KILLED, PAUSED}
        cluster.signal(PAUSED, signal.SIGSTOP)
        cluster.nodes[KILLED].kill()
        paused_at = time.monotonic()
        # An ack the paused node holds in its socket, to answer as it resumes.
        stale = held["polling"][0]
        late_ack = guarded(
            ledger,
            record_ack,
            late_acks,
            cluster.nodes[PAUSED].target,
            polling_holder.token,
            stale.message_id,
        )
        late_ack.start()

        # The killed node's holder carries on its session from another node: its token
        # acks one message there, and the other is left to come back.
        with pytest.raises(LOST):
            killed_holder.size("held")
        token = killed_holder.token
        killed_holder.close(logout=False)
        carried = held["killed"][0].message_id
        assert raw_ack(cluster.nodes[SURVIVOR].target, token, carried) == pb.CODE_OK

        # What the lost sessions held comes back, once, to the witness on the survivor.
        witness = cluster.client(SURVIVOR)
        left = sorted(set(held_ids) - {carried})
        back = take(witness, "held", len(left), RELEASE_WITHIN_S)
        released_after = time.monotonic() - paused_at
        assert sorted(m.message_id for m in back) == left
        assert {m.delivery_count for m in back} == {2}
        assert witness.pull("held", 10) == []

        # The paused node resumes: its holders ack nothing the witness now holds, and
        # are told that their sessions ended, with what they held.
        cluster.signal(PAUSED, signal.SIGCONT)
        cluster.down.discard(PAUSED)
        late_ack.join(timeout=30)
        # Refused by the session check, or by the store's fence if the node took the
        # ack before it learnt that the session ended.
        assert late_acks in ([pb.CODE_UNAUTHENTICATED], [pb.CODE_MESSAGE_NOT_FOUND]), late_acks
        for message in held["idle"] + held["polling"]:
            with pytest.raises(MessageNotFound):
                message.ack()
        for name, lost in losses.items():
            wait_for(partial(bool, lost), 4 * SESSION_TTL_S, f"the {name} holder's session loss")
            assert {m.message_id for m in lost[0].released} == {m.message_id for m in held[name]}
        assert witness.ack_many(back) == []  # every one still the witness's
        # The parked poll went on in a new session; an add ends it.
        admin.add("idle", "wake")
        long_poll.join(timeout=30)
        assert [m.element if m else None for m in parked] == ["wake"]

        # The load carries on over the two live nodes for a moment.
        acked_then = ledger.acked
        wait_for(lambda: ledger.acked >= acked_then + 20 or bool(ledger.errors), 30,
                 "the load to carry on after the resume")  # fmt: skip
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert not ledger.errors, ledger.errors
    assert not any(w.is_alive() for w in workers)
    assert {origin for origin, _ in ledger.reconnects} >= {KILLED, PAUSED}

    # Drain what is left (the lost sessions' load messages came back with the held ones).
    wait_for(lambda: admin.unacked("q") == 0, RELEASE_WITHIN_S, "nothing in flight")
    while messages := admin.pull("q", 500):
        now = time.monotonic()
        records = [Delivered(m.message_id, m.delivery_count, now, now) for m in messages]
        assert admin.ack_many(messages) == []
        for record in records:
            record.acked_sent_at = time.monotonic()
        ledger.deliveries.extend(records)
    for client in (admin, witness, idle_holder, polling_holder):
        client.close()

    assert lost_adds(ledger) == []
    assert double_holds(ledger.deliveries) == []
    # A done-ack of a live session's message is never refused: no other session took it.
    assert ledger.refused == []
    redelivered = sum(1 for d in ledger.deliveries if d.count > 1)
    print(
        f"{len(ledger.added)} adds answered OK, {len(ledger.deliveries)} deliveries "
        f"({redelivered} redeliveries), {len(ledger.reconnects)} reconnects; the lost "
        f"sessions' messages came back {released_after:.1f} s after the kill and pause; "
        f"the ack queued on the paused node answered {pb.Code.Name(late_acks[0])}"
    )


def record_ack(codes: list[int], target: str, token: str, message_id: int) -> None:
    codes.append(raw_ack(target, token, message_id))


def raw_ack(target: str, token: str, message_id: int) -> int:
    """An Ack with a given token on a given node, through a channel of its own: its code."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        request = pb.AckRequest(token=token, message_id=message_id)
        return int(stub.Ack(request, timeout=RELEASE_WITHIN_S + 30).code)


def lost_adds(ledger: Ledger) -> list[int]:
    """Adds answered OK that were neither acked done (OK) nor possibly acked (answer lost
    on their last delivery)."""
    last: dict[int, Delivered] = {}
    acked: set[int] = set()
    for d in ledger.deliveries:
        if d.acked_sent_at is not None:
            acked.add(d.message_id)
        if d.message_id not in last or d.count > last[d.message_id].count:
            last[d.message_id] = d
    return sorted(
        i for i in ledger.added if i not in acked and not (i in last and last[i].ack_unknown)
    )


def double_holds(deliveries: list[Delivered]) -> list[str]:
    """Deliveries of an id made wholly while another delivery of it was held: from its
    answer until its done-ack was sent, an ack that then succeeded."""
    by_id: dict[int, list[Delivered]] = {}
    for d in deliveries:
        by_id.setdefault(d.message_id, []).append(d)
    found = []
    for message_id, ds in by_id.items():
        for a in ds:
            if a.acked_sent_at is None:
                continue
            for b in ds:
                if b is not a and a.got_at <= b.sent_at and b.got_at <= a.acked_sent_at:
                    found.append(f"id {message_id}: count {b.count} delivered while "
                                 f"count {a.count} was held")  # fmt: skip
    return found
