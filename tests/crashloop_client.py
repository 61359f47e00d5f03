"""The load of one crash-loop client process (its command line: tests/crashloop_proc.py).

It logs in (as the admin, or as `worker`, a user with grants only), says `ready` on
stdout, and runs a random mix of operations until the server dies under it: Add, AddAll,
Poll, PullElements, Ack done and error, BatchAck, MapPut, MapBatchPut, Subscribe (a
stream that takes a push, acks part of it and closes), Logout and a new login, an idle
pause that lets the session expire, a scratch queue created, filled and destroyed, and
calls the worker is not allowed to make. Some calls get a deadline too short for their
answer, so answers are lost while the server lives on.

The lifecycle queue `cl-l` (LIFECYCLE_SETTINGS: a one-second ack deadline, two deliveries
then the dead-letter queue `cl-dlq`) gets a load of its own, logged under op names of its
own (`ladd`, `lpoll`, `lack`, `lextend`) and proved apart (crashloop_checker.check_lifecycle):
a worker that acks at once, nacks, or hangs past its lease and acks late, and extends the
lease of what it hangs on, or gives it back (ExtendLease to 0).

Each operation is one JSON line: `ok` (answered with an expected code), `failed`
(another code), `expired` (answered CODE_UNAUTHENTICATED: the session lapsed; the
client logs in again), `unavailable` (answered CODE_UNAVAILABLE, which applied nothing:
the database was out of reach; only the cluster's client, crashloop_failover, logs it)
or `unknown` (no answer). The client stops at an unknown outcome
that is not its own short deadline: the server is gone.
"""

from __future__ import annotations

import json
import queue
import random
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import IO, Any

import grpc

from conftest import encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub
Record = dict[str, Any]

QUEUES = ("cl-a", "cl-b")
LIFECYCLE_QUEUE = "cl-l"
DEAD_LETTER_QUEUE = "cl-dlq"
LEASE_S = 1.0  # the shortest ack deadline the server allows
LATE_ACK_S = 0.3  # a protected hang is acked late within about this after its lease
PROTECTED_HANGS = 0.5  # the share of hangs whose session is not ended on purpose
LIFECYCLE_SETTINGS = pb.QueueSettings(
    ack_deadline_ms=int(LEASE_S * 1000), max_deliveries=2, dead_letter_queue=DEAD_LETTER_QUEUE
)
MAPS = ("clm-0", "clm-1")
USERS = {"admin": "crash-loop-pw", "worker": "crash-loop-worker-pw"}
# The worker's grants (`qm-server user grant worker ...`): no manage on the shared queues.
WORKER_GRANTS = (
    ("read,write", "queue", "cl-*"),
    ("read,write", "map", "clm-*"),
    ("manage", "queue", "cl-x*"),
)
KEYS_PER_CLIENT = 6
CALL_TIMEOUT_S = 15.0
SUBSCRIBE_TIMEOUT_S = 0.5
IMPATIENT = 0.06  # the share of calls sent with a deadline too short for the answer
MIX = {
    "add": 20,
    "add_all": 8,
    "poll": 12,
    "pull": 10,
    "ack": 12,
    "nack": 5,
    "batch_ack": 8,
    "map_put": 10,
    "map_batch_put": 5,
    "subscribe": 6,
    "relogin": 2,
    "expire": 1,
    "scratch": 2,
    "denied": 3,
    "ladd": 6,
    "lwork": 10,
    "llate": 4,
    "lextend": 2,
}
# Codes that are a correct answer to a well-formed call of this load, per operation.
EXPECTED = {
    "poll": {pb.CODE_OK, pb.CODE_QUEUE_EMPTY},
    "pull": {pb.CODE_OK, pb.CODE_QUEUE_EMPTY},
    "new_queue": {pb.CODE_OK, pb.CODE_QUEUE_ALREADY_EXISTS},
    "destroy_not_empty": {pb.CODE_QUEUE_NOT_EMPTY},
    "ack_destroyed": {pb.CODE_MESSAGE_NOT_FOUND},
    "denied": {pb.CODE_PERMISSION_DENIED},
    "expire": {pb.CODE_UNAUTHENTICATED},
    "lpoll": {pb.CODE_OK, pb.CODE_QUEUE_EMPTY},
    # In time, or not: the lease may run out under load, and once it did, another session
    # may have finished the message (then it is unknown to this one).
    "lack": {pb.CODE_OK, pb.CODE_LEASE_EXPIRED, pb.CODE_MESSAGE_NOT_FOUND},
}


def login(stub: Stub, user: str = "admin") -> str:
    challenge = stub.GetChallenge(pb.GetChallengeRequest(), timeout=CALL_TIMEOUT_S)
    reply = stub.Auth(
        pb.AuthRequest(username=user, password=encrypt_password(challenge, USERS[user])),
        timeout=CALL_TIMEOUT_S,
    )
    if reply.code != pb.CODE_OK:
        raise LoginRefused(reply.code, reply.message)
    return reply.token


class LoginRefused(RuntimeError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"login failed: {code} {message}")
        self.code = code


class ServerGone(Exception):
    """A call got no answer and it was not the client's own short deadline."""


class LoadClient:
    """One client process's load: random operations, each logged with its outcome."""

    def __init__(
        self,
        stub: Stub,
        user: str,
        rng: random.Random,
        out: IO[str],
        round_no: int,
        client: int,
        session_ttl_s: float,
    ) -> None:
        self.stub = stub
        self.user = user
        self.rng = rng
        self.out = out
        self.round = round_no
        self.client = client
        self.session_ttl_s = session_ttl_s
        self.seq = 0
        self.session = 0
        self.token = ""
        self.held: dict[int, int] = {}  # id -> delivery count, delivered to the session
        # cl-l deliveries left to hang: id -> (delivery count, when its lease began at the
        # earliest: its poll or its last extension was sent)
        self.hanging: dict[int, tuple[int, float]] = {}
        # Until then the session is not ended on purpose (a hang's lease must run out
        # while its session lives, or its end would release the message first).
        self.keep_session_until = -1.0
        self.protected = 0  # the hang that is left to run out (never extended)
        self._ops: dict[str, Callable[[], object]] = {
            "add": self.add,
            "add_all": self.add_all,
            "poll": self.poll,
            "pull": self.pull,
            "ack": lambda: self.ack_one(done=True),
            "nack": lambda: self.ack_one(done=False),
            "batch_ack": self.batch_ack,
            "map_put": self.map_put,
            "map_batch_put": self.map_batch_put,
            "subscribe": self.subscribe,
            "relogin": self.relogin,
            "expire": self.expire,
            "scratch": self.scratch,
            "denied": self.denied,
            "ladd": self.lifecycle_add,
            "lwork": self.lifecycle_work,
            "llate": self.lifecycle_late_ack,
            "lextend": self.lifecycle_extend,
        }

    # Sessions ---------------------------------------------------------------------------

    def login(self) -> None:
        """A new session; what the old one held is released by its end."""
        self.seq += 1
        record: Record = {"op": "login", "user": self.user}
        self._stamp(record)
        try:
            self.token = login(self.stub, self.user)
        except grpc.RpcError as exc:
            record.update(st="unknown", grpc=exc.code().name, t1=time.monotonic())
            self._write(record)
            raise ServerGone from exc
        self.session += 1
        self.held.clear()
        self.hanging.clear()
        record.update(st="ok", t1=time.monotonic(), session=self.session)
        self._write(record)

    def run(self, max_ops: int, until: float) -> int:
        """Run until the server is gone, max_ops or the time is up; returns ops done."""
        kinds, weights = list(MIX), list(MIX.values())
        # A hang from the start of the round: its lease runs out before the kill in most
        # rounds longer than the lease.
        try:
            self.lifecycle_hang()
        except ServerGone:
            return 1
        for done in range(max_ops):
            if time.monotonic() > until:
                return done
            kind = self.rng.choices(kinds, weights)[0]
            if kind in ("ack", "nack", "batch_ack") and not self.held:
                kind = "pull"
            if kind in ("relogin", "expire") and time.monotonic() < self.keep_session_until:
                kind = "llate"  # the session must outlive the hang's lease
            try:
                self._ops[kind]()
            except ServerGone:
                return done + 1
        return max_ops

    # Calls ------------------------------------------------------------------------------

    def _stamp(self, record: Record) -> None:
        record.update(seq=self.seq, session=self.session, t0=time.monotonic())

    def _call(self, record: Record, send: Callable[[float], Any], patient: bool = False) -> Any:
        """Send with a deadline (sometimes too short); complete the record's outcome.

        The reply, or None when the outcome is unknown. Raises ServerGone once written
        when the answer was lost and the deadline was not the cause.
        """
        self.seq += 1
        impatient = not patient and self.rng.random() < IMPATIENT
        timeout = self.rng.choice((0.0005, 0.002, 0.01)) if impatient else CALL_TIMEOUT_S
        self._stamp(record)
        try:
            reply = send(timeout)
        except grpc.RpcError as exc:
            record.update(st="unknown", grpc=exc.code().name, t1=time.monotonic())
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                record["detail"] = exc.details()  # a node gone, or its commit's answer lost
            if not (impatient and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                self._write(record)
                raise ServerGone from exc
            return None
        expected = EXPECTED.get(record["op"], {pb.CODE_OK})
        status = "ok" if reply.code in expected else "failed"
        if reply.code == pb.CODE_UNAUTHENTICATED and record["op"] != "expire":
            status = "expired"
        record.update(t1=time.monotonic(), code=int(reply.code), st=status)
        return reply

    def _write(self, record: Record) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.out.flush()
        if record["st"] == "expired":
            self.login()

    def _tag(self) -> str:
        return f"r{self.round}-c{self.client}-{self.seq + 1}"

    def add(self, queue_name: str | None = None) -> None:
        queue = queue_name or self.rng.choice(QUEUES)
        element = self._tag()
        record: Record = {"op": "add", "q": queue, "elements": [element]}
        reply = self._call(
            record,
            lambda timeout: self.stub.Add(
                pb.AddRequest(token=self.token, queue_name=queue, element=element),
                timeout=timeout,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["ids"] = [reply.message_id]
        self._write(record)

    def add_all(self, queue_name: str | None = None, patient: bool = False) -> bool:
        queue = queue_name or self.rng.choice(QUEUES)
        elements = [f"{self._tag()}.{j}" for j in range(self.rng.randint(2, 8))]
        record: Record = {"op": "add_all", "q": queue, "elements": elements}
        reply = self._call(
            record,
            lambda timeout: self.stub.AddAll(
                pb.AddAllRequest(token=self.token, queue_name=queue, elements=elements),
                timeout=timeout,
            ),
            patient,
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["ids"] = list(reply.message_ids)
        self._write(record)
        return bool(record["st"] == "ok")

    def poll(self, queue_name: str | None = None, patient: bool = False) -> int | None:
        queue, wait_ms = queue_name or self.rng.choice(QUEUES), self.rng.choice((0, 0, 50))
        record: Record = {"op": "poll", "q": queue}
        reply = self._call(
            record,
            lambda timeout: self.stub.Poll(
                pb.PollRequest(token=self.token, queue_name=queue, wait_ms=wait_ms),
                timeout=timeout,
            ),
            patient,
        )
        got = None
        if reply is not None and reply.code == pb.CODE_OK:
            record["got"] = [[reply.message_id, reply.element, reply.delivery_count]]
            self.held[reply.message_id] = reply.delivery_count
            got = reply.message_id
        self._write(record)
        return got

    def pull(self) -> None:
        queue, number = self.rng.choice(QUEUES), self.rng.randint(1, 8)
        wait_ms = self.rng.choice((0, 0, 50))
        record: Record = {"op": "pull", "q": queue, "number": number}
        reply = self._call(
            record,
            lambda timeout: self.stub.PullElements(
                pb.PullElementsRequest(
                    token=self.token, queue_name=queue, number=number, wait_ms=wait_ms
                ),
                timeout=timeout,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["got"] = [
                [e.message_id, e.element, e.delivery_count] for e in reply.element_info
            ]
            for e in reply.element_info:
                self.held[e.message_id] = e.delivery_count
        self._write(record)

    def _ack_record(self, op: str, ids: list[int], done: bool) -> Record:
        counts = [self.held.pop(i) for i in ids]
        return {"op": op, "ids": ids, "counts": counts, "done": done}

    def ack_one(self, done: bool) -> None:
        message_id = self.rng.choice(list(self.held))
        record = self._ack_record("ack", [message_id], done)
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        reply = self._call(
            record,
            lambda timeout: self.stub.Ack(
                pb.AckRequest(token=self.token, message_id=message_id, ack_type=ack_type),
                timeout=timeout,
            ),
        )
        if reply is not None:
            record["results"] = [int(reply.code)]
        self._write(record)

    def batch_ack(self) -> None:
        ids = self.rng.sample(sorted(self.held), self.rng.randint(1, min(6, len(self.held))))
        done = self.rng.random() < 0.7
        record = self._ack_record("batch_ack", ids, done)
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        reply = self._call(
            record,
            lambda timeout: self.stub.BatchAck(
                pb.BatchAckRequest(token=self.token, message_ids=ids, ack_type=ack_type),
                timeout=timeout,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            if [r.message_id for r in reply.results] != ids:
                record["st"] = "failed"  # results not in request order
            record["results"] = [int(r.code) for r in reply.results]
        self._write(record)

    def _key(self, j: int) -> str:
        return f"c{self.client}-k{j}"

    def map_put(self) -> None:
        name, key = MAPS[self.client % len(MAPS)], self._key(self.rng.randrange(KEYS_PER_CLIENT))
        value = self._tag()
        record: Record = {"op": "map_put", "map": name, "pairs": [[key, value]]}
        self._call(
            record,
            lambda timeout: self.stub.MapPut(
                pb.MapPutRequest(token=self.token, map=name, key=key, value=value),
                timeout=timeout,
            ),
        )
        self._write(record)

    def map_batch_put(self) -> None:
        name = MAPS[self.client % len(MAPS)]
        keys = [
            self._key(j) for j in self.rng.sample(range(KEYS_PER_CLIENT), self.rng.randint(2, 4))
        ]
        pairs = [[key, f"{self._tag()}.{n}"] for n, key in enumerate(keys)]
        record: Record = {"op": "map_batch_put", "map": name, "pairs": pairs}
        self._call(
            record,
            lambda timeout: self.stub.MapBatchPut(
                pb.MapBatchPutRequest(
                    token=self.token,
                    map=name,
                    size=len(pairs),
                    list=[pb.KeyValue(key=k, value=v) for k, v in pairs],
                ),
                timeout=timeout,
            ),
        )
        self._write(record)

    # Subscribe, sessions, destroyed queues, grants ----------------------------------------

    def subscribe(self) -> None:
        """Open a stream, take its first push, ack part of it done on the stream, close.

        `got` holds each element with the time it arrived; closing releases the rest.
        """
        queue_name = self.rng.choice(QUEUES)
        window = self.rng.randint(1, 4)
        self.seq += 1
        record: Record = {"op": "subscribe", "q": queue_name, "got": [], "acked": []}
        outbox: queue.SimpleQueue[pb.SubscribeRequest | None] = queue.SimpleQueue()
        outbox.put(
            pb.SubscribeRequest(
                open=pb.SubscribeOpen(token=self.token, queue_name=queue_name, max_unacked=window)
            )
        )

        def requests() -> Iterator[pb.SubscribeRequest]:
            while (item := outbox.get()) is not None:
                yield item

        self._stamp(record)
        codes: list[int] = []
        try:
            for response in self.stub.Subscribe(requests(), timeout=SUBSCRIBE_TIMEOUT_S):
                now = time.monotonic()
                codes.append(int(response.code))
                record["got"] += [
                    [e.message_id, e.element, e.delivery_count, now] for e in response.element_info
                ]
                record.setdefault("ack_results", []).extend(
                    [r.message_id, int(r.code)] for r in response.ack_results
                )
                if record["got"] and "t_close" not in record:
                    ids = [g[0] for g in record["got"]]
                    record["acked"] = self.rng.sample(ids, self.rng.randint(0, len(ids)))
                    record["t_ack"] = time.monotonic()
                    acks = pb.SubscribeAck(message_ids=record["acked"], ack_type=pb.ACK_TYPE_DONE)
                    if record["acked"]:
                        outbox.put(pb.SubscribeRequest(ack=acks))
                    record["t_close"] = time.monotonic()
                    outbox.put(None)
        except grpc.RpcError as exc:
            outbox.put(None)
            record.update(st="unknown", grpc=exc.code().name, t1=time.monotonic(), codes=codes)
            # With nothing pushed, the stream waited for a message and hit its deadline:
            # the server lives on (the claim it may have made was given back).
            if not (exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not record["got"]):
                self._write(record)
                raise ServerGone from exc
            self._write(record)
            return
        bad = [c for c in codes if c != pb.CODE_OK]
        status = "ok" if not bad else "expired" if bad == [pb.CODE_UNAUTHENTICATED] else "failed"
        record.update(st=status, t1=time.monotonic(), codes=codes)
        self._write(record)

    def relogin(self) -> None:
        """Logout (releasing what the session holds) and log in again."""
        record: Record = {"op": "logout", "released": sorted(self.held)}
        self._call(
            record,
            lambda timeout: self.stub.Logout(pb.LogoutRequest(token=self.token), timeout=timeout),
            patient=True,
        )
        self._write(record)
        if record["st"] == "ok":
            self.login()

    def expire(self) -> None:
        """Idle past the session TTL: the next call must find the session gone."""
        time.sleep(self.session_ttl_s * 1.5)  # the sweep runs every TTL/4
        record: Record = {"op": "expire", "released": sorted(self.held)}
        self._call(
            record,
            lambda timeout: self.stub.HeartBeat(
                pb.HeartBeatRequest(token=self.token), timeout=timeout
            ),
            patient=True,
        )
        self._write(record)
        if record["st"] == "ok":
            self.login()

    def scratch(self) -> None:
        """A queue of this client's own: fill it, hold one, destroy it, find it gone."""
        name = f"cl-x{self.client}"
        record: Record = {"op": "new_queue", "q": name}
        self._call(
            record,
            lambda timeout: self.stub.NewQueue(
                pb.NewQueueRequest(token=self.token, queue_name=name), timeout=timeout
            ),
            patient=True,
        )
        self._write(record)
        if record["st"] != "ok" or not self.add_all(name, patient=True):
            return
        held = self.poll(name, patient=True)
        if held is not None:
            # Not for the load's acks: its queue is destroyed next, or, when that answer is
            # lost, may be (an ack of it would then find nothing).
            self.held.pop(held, None)
        for op, force in (("destroy_not_empty", False), ("destroy", True)):
            record = {"op": op, "q": name}
            request = pb.DestroyQueueRequest(token=self.token, queue_name=name, force=force)
            self._call(record, partial(self.stub.DestroyQueue, request), patient=True)
            self._write(record)
        if held is not None and record["st"] == "ok":
            record = {"op": "ack_destroyed", "ids": [held]}
            self._call(
                record,
                lambda timeout: self.stub.Ack(
                    pb.AckRequest(token=self.token, message_id=held), timeout=timeout
                ),
                patient=True,
            )
            self._write(record)

    # The lifecycle queue ---------------------------------------------------------------

    def lifecycle_add(self) -> None:
        elements = [f"{self._tag()}.{j}" for j in range(self.rng.randint(1, 3))]
        record: Record = {"op": "ladd", "q": LIFECYCLE_QUEUE, "elements": elements}
        reply = self._call(
            record,
            lambda timeout: self.stub.AddAll(
                pb.AddAllRequest(token=self.token, queue_name=LIFECYCLE_QUEUE, elements=elements),
                timeout=timeout,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["ids"] = list(reply.message_ids)
        self._write(record)

    def lifecycle_work(self) -> None:
        """Take one message on its lease; ack it done at once, nack it, or hang past the
        lease (kept in `hanging`, acked late by lifecycle_late_ack, or never)."""
        got = self._lifecycle_poll()
        if got is None:
            return
        message_id, count, polled = got
        fate = self.rng.choice(("done", "done", "nack", "hang"))
        if fate == "hang":
            self.hanging[message_id] = (count, polled)
        else:
            self._lifecycle_ack(message_id, count, polled, fate)

    def lifecycle_hang(self) -> None:
        """Take a message (adding one to an empty queue first) and hang on it: the load
        goes on meanwhile, which keeps the session alive, as a worker's client heartbeats
        while its handler hangs; lifecycle_late_ack acks it once its lease ran out."""
        got = self._lifecycle_poll()
        if got is None:
            self.lifecycle_add()
            got = self._lifecycle_poll()
        if got is not None:
            message_id, count, polled = got
            self.hanging[message_id] = (count, polled)
            if self.rng.random() < PROTECTED_HANGS:
                self.keep_session_until = polled + LEASE_S + LATE_ACK_S
                self.protected = message_id

    def _lifecycle_poll(self) -> tuple[int, int, float] | None:
        """Poll the lifecycle queue: (id, delivery count, when the poll was sent)."""
        record: Record = {"op": "lpoll", "q": LIFECYCLE_QUEUE}
        reply = self._call(
            record,
            lambda timeout: self.stub.Poll(
                pb.PollRequest(token=self.token, queue_name=LIFECYCLE_QUEUE), timeout=timeout
            ),
        )
        got = reply is not None and reply.code == pb.CODE_OK
        if got:
            record["got"] = [[reply.message_id, reply.element, reply.delivery_count]]
            record["lease_ms"] = reply.lease_expires_at_ms
        self._write(record)
        if not got or record["st"] != "ok":
            return None
        return reply.message_id, reply.delivery_count, record["t0"]

    def lifecycle_late_ack(self) -> None:
        """Ack done a message held past its lease (if one is): LEASE_EXPIRED, mostly."""
        late = [i for i, (_, t) in self.hanging.items() if time.monotonic() - t > LEASE_S]
        if late:
            message_id = self.rng.choice(late)
            count, polled = self.hanging.pop(message_id)
            self._lifecycle_ack(message_id, count, polled, "done")

    def lifecycle_extend(self) -> None:
        """ExtendLease on a message hung on: a new lease (it hangs on from now), or 0,
        which gives it back (a delivery spent: past max_deliveries, a dead letter)."""
        hanging = sorted(i for i in self.hanging if i != self.protected)
        if not hanging:
            return
        message_id = self.rng.choice(hanging)
        lease_ms = self.rng.choice((0, int(LEASE_S * 1000)))
        record: Record = {
            "op": "lextend",
            "ids": [message_id],
            "lease_ms": lease_ms,
            "polled": self.hanging[message_id][1],
        }
        reply = self._call(
            record,
            lambda timeout: self.stub.ExtendLease(
                pb.ExtendLeaseRequest(
                    token=self.token, message_ids=[message_id], ack_deadline_ms=lease_ms
                ),
                timeout=timeout,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["results"] = [int(r.code) for r in reply.results]
            if [r.message_id for r in reply.results] != [message_id] or not set(
                record["results"]
            ) <= set(EXPECTED["lack"]):
                record["st"] = "failed"
            elif record["results"] == [pb.CODE_OK] and lease_ms:
                self.hanging[message_id] = (self.hanging[message_id][0], record["t0"])
            elif record["results"] == [pb.CODE_OK]:
                del self.hanging[message_id]
        self._write(record)

    def _lifecycle_ack(self, message_id: int, count: int, polled: float, fate: str) -> None:
        done = fate == "done"
        record: Record = {
            "op": "lack",
            "ids": [message_id],
            "counts": [count],
            "done": done,
            "polled": polled,
        }
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        reply = self._call(
            record,
            lambda timeout: self.stub.Ack(
                pb.AckRequest(token=self.token, message_id=message_id, ack_type=ack_type),
                timeout=timeout,
            ),
        )
        if reply is not None:
            record["results"] = [int(reply.code)]
        self._write(record)

    def denied(self) -> None:
        """The worker may not create the shared queues nor destroy maps (no manage)."""
        if self.user != "worker":
            return
        record: Record = {"op": "denied", "q": QUEUES[0]}
        self._call(
            record,
            lambda timeout: self.stub.DestroyQueue(
                pb.DestroyQueueRequest(token=self.token, queue_name=QUEUES[0], force=True),
                timeout=timeout,
            ),
            patient=True,
        )
        self._write(record)
