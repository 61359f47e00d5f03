"""The crash loop: mixed load from client processes while qm-server is SIGKILLed, then proofs.

Shared by tests/test_crash_loop.py (a few rounds) and scripts/crash_loop (as many as asked).

Each round starts `qm-server` on the same data directory, starts client processes (each
with its own channel and session) that run a random mix of Add, AddAll, Poll,
PullElements, Ack done, Ack error, BatchAck, MapPut and MapBatchPut, and SIGKILLs the
server at a random moment. Every client writes each operation to a JSON-lines file as
`ok` (answered, with an expected code), `failed` (answered with an unexpected code) or
`unknown` (no answer: the server died under the call). A client stops at its first
unknown outcome.

After each restart the checker compares the server's state with every log so far (no
message in flight, queue sizes within what the logs allow, map values), and after the
last round it drains every queue and proves:

- no message whose add answered OK is lost, unless a done-ack of it answered OK or had
  an unknown outcome;
- ids are unique, increase in add order within a client, within an AddAll, and across
  clients and restarts (an add answered before another was sent has the smaller id);
- a message acked done with an OK answer is never delivered again;
- a message is never delivered twice with the same delivery_count (never in flight for
  two sessions at once), and a message held at a crash comes back with a higher count;
- every delivered element was added (by an add answered OK, or one whose answer was
  lost), into that queue, under the id its add answered; an AddAll whose answer was lost
  took effect entirely or not at all;
- each map key holds the value of its last write answered OK, or of a later write whose
  answer was lost (absent if there was none), and a MapBatchPut whose answer was lost
  took effect for all its keys or for none.

Work directory: `data/` (the server's, the same every round), `data-server.log`,
`logs/rRRR-cC.jsonl` (one client process in one round) and `logs/rRRR-cC.err`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import grpc
from server_process import ServerProcess

from conftest import encrypt_password
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub
Record = dict[str, Any]

QUEUES = ("cl-a", "cl-b")
MAPS = ("clm-0", "clm-1")
USER = "admin"
PASSWORD = "crash-loop-pw"
KEYS_PER_CLIENT = 6
CALL_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 60.0
CLIENT_EXIT_TIMEOUT_S = 60.0
# The weights of the client's operations.
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
}
# Codes that are a correct answer to a well-formed call of this load, per operation.
EXPECTED = {"poll": {pb.CODE_OK, pb.CODE_QUEUE_EMPTY}, "pull": {pb.CODE_OK, pb.CODE_QUEUE_EMPTY}}


# Logging in ---------------------------------------------------------------------------


def login(stub: Stub, user: str = USER, password: str = PASSWORD) -> str:
    challenge = stub.GetChallenge(pb.GetChallengeRequest(), timeout=CALL_TIMEOUT_S)
    reply = stub.Auth(
        pb.AuthRequest(username=user, password=encrypt_password(challenge, password)),
        timeout=CALL_TIMEOUT_S,
    )
    if reply.code != pb.CODE_OK:
        raise RuntimeError(f"login failed: {reply.code} {reply.message}")
    return reply.token


# The client process --------------------------------------------------------------------


class LoadClient:
    """One client process's load: random operations, each logged with its outcome."""

    def __init__(
        self, stub: Stub, token: str, rng: random.Random, out: IO[str], round_no: int, client: int
    ) -> None:
        self.stub = stub
        self.token = token
        self.rng = rng
        self.out = out
        self.round = round_no
        self.client = client
        self.seq = 0
        self.held: dict[int, int] = {}  # id -> delivery count, delivered to this session
        self._ops: dict[str, Callable[[], bool]] = {
            "add": self.add,
            "add_all": self.add_all,
            "poll": self.poll,
            "pull": self.pull,
            "ack": lambda: self.ack_one(done=True),
            "nack": lambda: self.ack_one(done=False),
            "batch_ack": self.batch_ack,
            "map_put": self.map_put,
            "map_batch_put": self.map_batch_put,
        }

    def run(self, max_ops: int, until: float) -> int:
        """Run until an outcome is unknown, max_ops or the time is up; returns ops done."""
        kinds, weights = list(MIX), list(MIX.values())
        for done in range(max_ops):
            if time.monotonic() > until:
                return done
            self.seq += 1
            kind = self.rng.choices(kinds, weights)[0]
            if kind in ("ack", "nack", "batch_ack") and not self.held:
                kind = "pull"
            if not self._ops[kind]():
                return done + 1
        return max_ops

    def _tag(self) -> str:
        return f"r{self.round}-c{self.client}-{self.seq}"

    def _call(self, record: Record, send: Callable[[], Any]) -> Any:
        """Send; complete the record's outcome; the reply, or None when it is unknown."""
        record.update(seq=self.seq, t0=time.monotonic())
        try:
            reply = send()
        except grpc.RpcError as exc:
            record.update(st="unknown", grpc=exc.code().name, t1=time.monotonic())
            return None
        expected = EXPECTED.get(record["op"], {pb.CODE_OK})
        record.update(
            t1=time.monotonic(),
            code=int(reply.code),
            st="ok" if reply.code in expected else "failed",
        )
        return reply

    def _write(self, record: Record) -> bool:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.out.flush()
        return bool(record["st"] != "unknown")

    def add(self) -> bool:
        queue, element = self.rng.choice(QUEUES), self._tag()
        record: Record = {"op": "add", "q": queue, "elements": [element]}
        reply = self._call(
            record,
            lambda: self.stub.Add(
                pb.AddRequest(token=self.token, queue_name=queue, element=element),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["ids"] = [reply.message_id]
        return self._write(record)

    def add_all(self) -> bool:
        queue = self.rng.choice(QUEUES)
        elements = [f"{self._tag()}.{j}" for j in range(self.rng.randint(2, 8))]
        record: Record = {"op": "add_all", "q": queue, "elements": elements}
        reply = self._call(
            record,
            lambda: self.stub.AddAll(
                pb.AddAllRequest(token=self.token, queue_name=queue, elements=elements),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["ids"] = list(reply.message_ids)
        return self._write(record)

    def poll(self) -> bool:
        queue, wait_ms = self.rng.choice(QUEUES), self.rng.choice((0, 0, 50))
        record: Record = {"op": "poll", "q": queue}
        reply = self._call(
            record,
            lambda: self.stub.Poll(
                pb.PollRequest(token=self.token, queue_name=queue, wait_ms=wait_ms),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["got"] = [[reply.message_id, reply.element, reply.delivery_count]]
            self.held[reply.message_id] = reply.delivery_count
        return self._write(record)

    def pull(self) -> bool:
        queue, number = self.rng.choice(QUEUES), self.rng.randint(1, 8)
        wait_ms = self.rng.choice((0, 0, 50))
        record: Record = {"op": "pull", "q": queue, "number": number}
        reply = self._call(
            record,
            lambda: self.stub.PullElements(
                pb.PullElementsRequest(
                    token=self.token, queue_name=queue, number=number, wait_ms=wait_ms
                ),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            record["got"] = [
                [e.message_id, e.element, e.delivery_count] for e in reply.element_info
            ]
            for e in reply.element_info:
                self.held[e.message_id] = e.delivery_count
        return self._write(record)

    def _ack_record(self, op: str, ids: list[int], done: bool) -> Record:
        counts = [self.held.pop(i) for i in ids]
        return {"op": op, "ids": ids, "counts": counts, "done": done}

    def ack_one(self, done: bool) -> bool:
        message_id = self.rng.choice(list(self.held))
        record = self._ack_record("ack", [message_id], done)
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        reply = self._call(
            record,
            lambda: self.stub.Ack(
                pb.AckRequest(token=self.token, message_id=message_id, ack_type=ack_type),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        if reply is not None:
            record["results"] = [int(reply.code)]
        return self._write(record)

    def batch_ack(self) -> bool:
        ids = self.rng.sample(sorted(self.held), self.rng.randint(1, min(6, len(self.held))))
        done = self.rng.random() < 0.7
        record = self._ack_record("batch_ack", ids, done)
        ack_type = pb.ACK_TYPE_DONE if done else pb.ACK_TYPE_ERROR
        reply = self._call(
            record,
            lambda: self.stub.BatchAck(
                pb.BatchAckRequest(token=self.token, message_ids=ids, ack_type=ack_type),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        if reply is not None and reply.code == pb.CODE_OK:
            if [r.message_id for r in reply.results] != ids:
                record["st"] = "failed"  # results not in request order
            record["results"] = [int(r.code) for r in reply.results]
        return self._write(record)

    def _key(self, j: int) -> str:
        return f"c{self.client}-k{j}"

    def map_put(self) -> bool:
        name, key = MAPS[self.client % len(MAPS)], self._key(self.rng.randrange(KEYS_PER_CLIENT))
        value = self._tag()
        record: Record = {"op": "map_put", "map": name, "pairs": [[key, value]]}
        self._call(
            record,
            lambda: self.stub.MapPut(
                pb.MapPutRequest(token=self.token, map=name, key=key, value=value),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        return self._write(record)

    def map_batch_put(self) -> bool:
        name = MAPS[self.client % len(MAPS)]
        keys = [
            self._key(j) for j in self.rng.sample(range(KEYS_PER_CLIENT), self.rng.randint(2, 4))
        ]
        pairs = [[key, f"{self._tag()}.{n}"] for n, key in enumerate(keys)]
        record: Record = {"op": "map_batch_put", "map": name, "pairs": pairs}
        self._call(
            record,
            lambda: self.stub.MapBatchPut(
                pb.MapBatchPutRequest(
                    token=self.token,
                    map=name,
                    size=len(pairs),
                    list=[pb.KeyValue(key=k, value=v) for k, v in pairs],
                ),
                timeout=CALL_TIMEOUT_S,
            ),
        )
        return self._write(record)


def client_main(args: argparse.Namespace) -> int:
    """A client process: log in, say `ready` on stdout, run the load until it ends."""
    rng = random.Random(args.seed)
    with (
        Path(args.log).open("w", encoding="utf-8") as out,
        grpc.insecure_channel(args.target) as channel,
    ):
        stub = Stub(channel)
        record: Record = {"op": "login", "seq": 0, "t0": time.monotonic()}
        try:
            token = login(stub)
        except grpc.RpcError as exc:  # the server died before the load began
            record.update(st="unknown", grpc=exc.code().name, t1=time.monotonic())
            out.write(json.dumps(record) + "\n")
            print("ready", flush=True)
            return 0
        record.update(st="ok", t1=time.monotonic())
        out.write(json.dumps(record) + "\n")
        out.flush()
        print("ready", flush=True)
        client = LoadClient(stub, token, rng, out, args.round, args.client)
        client.run(args.max_ops, time.monotonic() + args.max_seconds)
    return 0


# The history and its proofs -------------------------------------------------------------


@dataclass
class Delivery:
    message_id: int
    element: str
    count: int
    queue: str
    t0: float
    where: str  # "r3-c1 poll" or "final drain"


@dataclass
class ServerState:
    """What the server holds right after a restart (before any client ran)."""

    ready: dict[str, int]
    in_flight: dict[str, int]
    maps: dict[str, dict[str, str]]
    drained: dict[str, list[Delivery]] | None = None  # per queue, in drain order


class History:
    """Every client log so far, indexed for the checks."""

    def __init__(self, records: list[Record]) -> None:
        self.records = sorted(records, key=lambda r: (r["round"], r["client"], r["seq"]))
        self.adds = [r for r in self.records if r["op"] in ("add", "add_all")]
        self.acks = [r for r in self.records if r["op"] in ("ack", "batch_ack")]
        self.writes = [r for r in self.records if r["op"] in ("map_put", "map_batch_put")]
        self.deliveries: list[Delivery] = []
        for r in self.records:
            if r["op"] in ("poll", "pull") and r["st"] == "ok":
                where = f"r{r['round']}-c{r['client']} {r['op']} seq {r['seq']}"
                for message_id, element, count in r.get("got", []):
                    self.deliveries.append(
                        Delivery(message_id, element, count, r["q"], r["t0"], where)
                    )
        # The outcome of acks per id.
        self.done_ok: dict[int, tuple[float, int]] = {}  # id -> (answer time, count acked)
        self.done_unknown: set[int] = set()
        self.nacked_ok = 0
        for r in self.acks:
            if r["st"] == "unknown":
                if r["done"]:
                    self.done_unknown.update(r["ids"])
                continue
            for message_id, count, code in zip(
                r["ids"], r["counts"], r.get("results", []), strict=False
            ):
                if code == pb.CODE_OK and r["done"]:
                    self.done_ok[message_id] = (r["t1"], count)
                elif code == pb.CODE_OK:
                    self.nacked_ok += 1

    @classmethod
    def load(cls, logs: Path) -> History:
        records: list[Record] = []
        for path in sorted(logs.glob("r*-c*.jsonl")):
            round_no, client = (int(part[1:]) for part in path.stem.split("-"))
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                record.update(round=round_no, client=client)
                records.append(record)
        return cls(records)

    # Adds ---------------------------------------------------------------------------

    def ok_ids(self) -> dict[int, tuple[str, str]]:
        """id -> (queue, element) for every add answered OK."""
        return {
            message_id: (r["q"], element)
            for r in self.adds
            if r["st"] == "ok"
            for message_id, element in zip(r["ids"], r["elements"], strict=True)
        }

    def check_adds(self) -> list[str]:
        problems: list[str] = []
        owner: dict[int, Record] = {}
        last_id: dict[tuple[int, int], int] = {}
        for r in self.adds:
            if r["st"] != "ok":
                continue
            ids, who = r["ids"], f"r{r['round']}-c{r['client']} {r['op']} seq {r['seq']}"
            if len(ids) != len(r["elements"]) or ids != sorted(set(ids)):
                problems.append(f"{who}: ids {ids} not one increasing id per element")
            for message_id in ids:
                if message_id in owner:
                    first = owner[message_id]
                    problems.append(
                        f"id {message_id} given twice: r{first['round']}-c{first['client']} "
                        f"seq {first['seq']} and {who}"
                    )
                owner[message_id] = r
            client = (r["round"], r["client"])
            if ids and client in last_id and ids[0] <= last_id[client]:
                problems.append(f"{who}: id {ids[0]} not above the client's previous id")
            if ids:
                last_id[client] = ids[-1]
        # Real-time order across clients and restarts: an add answered before another was
        # sent has the smaller ids.
        answered = sorted(
            (r["t1"], max(r["ids"])) for r in self.adds if r["st"] == "ok" and r["ids"]
        )
        ends = [t for t, _ in answered]
        highest = list(_running_max(top for _, top in answered))
        for r in self.adds:
            if r["st"] != "ok" or not r["ids"]:
                continue
            before = bisect.bisect_left(ends, r["t0"])
            if before and highest[before - 1] >= min(r["ids"]):
                problems.append(
                    f"r{r['round']}-c{r['client']} seq {r['seq']}: id {min(r['ids'])} is not "
                    f"above id {highest[before - 1]} answered before it was sent"
                )
        return problems

    def element_owner(self) -> dict[str, tuple[Record, int]]:
        """element -> (the add that sent it, its index in that add)."""
        return {e: (r, n) for r in self.adds for n, e in enumerate(r["elements"])}

    # Deliveries and acks --------------------------------------------------------------

    def check_deliveries(self, deliveries: list[Delivery]) -> list[str]:
        problems: list[str] = []
        owner = self.element_owner()
        element_of: dict[int, str] = {}
        id_of: dict[str, int] = {}
        counts: dict[tuple[int, int], str] = {}
        for d in deliveries:
            found = owner.get(d.element)
            if found is None:
                problems.append(f"{d.where}: id {d.message_id} holds {d.element!r}, never added")
                continue
            add, n = found
            if add["st"] == "failed":
                problems.append(f"{d.where}: {d.element!r} delivered, but its add failed")
            if add["st"] == "ok" and add["ids"][n] != d.message_id:
                problems.append(
                    f"{d.where}: {d.element!r} delivered as id {d.message_id}, "
                    f"added as {add['ids'][n]}"
                )
            if add["q"] != d.queue:
                problems.append(f"{d.where}: {d.element!r} of {add['q']} delivered from {d.queue}")
            if element_of.setdefault(d.message_id, d.element) != d.element:
                problems.append(f"{d.where}: id {d.message_id} holds two elements")
            if id_of.setdefault(d.element, d.message_id) != d.message_id:
                problems.append(f"{d.where}: {d.element!r} delivered under two ids")
            if d.count < 1:
                problems.append(f"{d.where}: id {d.message_id} delivery_count {d.count}")
            if (d.message_id, d.count) in counts:
                problems.append(
                    f"{d.where}: id {d.message_id} delivered twice with delivery_count "
                    f"{d.count} (also {counts[d.message_id, d.count]})"
                )
            counts[d.message_id, d.count] = d.where
            acked = self.done_ok.get(d.message_id)
            if acked is not None and (d.t0 > acked[0] or d.count > acked[1]):
                problems.append(
                    f"{d.where}: id {d.message_id} delivered (count {d.count}) after a done-ack "
                    f"of its delivery {acked[1]} answered OK"
                )
        for r in self.records:
            if r["op"] == "pull" and r["st"] == "ok":
                ids = [g[0] for g in r.get("got", [])]
                if ids != sorted(ids):
                    problems.append(
                        f"r{r['round']}-c{r['client']} pull: ids {ids} not oldest first"
                    )
        return problems

    def check_acks(self) -> list[str]:
        """Each client acks only what it holds, so every ack it answers must be found."""
        problems: list[str] = []
        for r in self.acks:
            if r["st"] == "unknown":
                continue
            results = r.get("results", [])
            if r["st"] == "failed" or results != [pb.CODE_OK] * len(r["ids"]):
                problems.append(
                    f"r{r['round']}-c{r['client']} {r['op']} seq {r['seq']} of held ids "
                    f"{r['ids']}: code {r.get('code')}, results {results}"
                )
        return problems

    def check_answers(self) -> list[str]:
        """Every call of this load is well-formed: an answer outside EXPECTED is a bug."""
        return [
            f"r{r['round']}-c{r['client']} {r['op']} seq {r['seq']}: answered code {r.get('code')}"
            for r in self.records
            if r["st"] == "failed" and r["op"] not in ("ack", "batch_ack")
        ]

    def check(self) -> list[str]:
        return (
            self.check_adds()
            + self.check_deliveries(self.deliveries)
            + self.check_acks()
            + self.check_answers()
        )

    # State after a restart ------------------------------------------------------------

    def check_state(self, state: ServerState) -> list[str]:
        problems = [
            f"{queue}: {n} messages in flight right after a restart"
            for queue, n in state.in_flight.items()
            if n
        ]
        ok_ids = self.ok_ids()
        gone_maybe = set(self.done_ok) | self.done_unknown
        for queue in QUEUES:
            mine = [i for i, (q, _) in ok_ids.items() if q == queue]
            lower = sum(1 for i in mine if i not in gone_maybe)
            upper = sum(1 for i in mine if i not in self.done_ok) + sum(
                len(r["elements"]) for r in self.adds if r["st"] == "unknown" and r["q"] == queue
            )
            ready = state.ready.get(queue, 0)
            if not lower <= ready <= upper:
                problems.append(f"{queue}: Size {ready} outside [{lower}, {upper}] the logs allow")
        problems += self.check_maps(state.maps)
        if state.drained is not None:
            problems += self.check_drained(state.drained)
        return problems

    def check_maps(self, maps: dict[str, dict[str, str]]) -> list[str]:
        problems: list[str] = []
        writes: dict[tuple[str, str], list[tuple[str, str, Record]]] = defaultdict(list)
        for r in self.writes:  # in (round, client, seq) order; a key has one writer a round
            for key, value in r["pairs"]:
                writes[r["map"], key].append((value, r["st"], r))
        for name, entries in maps.items():
            for key in entries:
                if (name, key) not in writes:
                    problems.append(f"map {name}: key {key!r} was never written")
        last_of: dict[tuple[str, str], int] = {}
        for (name, key), history in writes.items():
            history.sort(key=lambda w: (w[2]["round"], w[2]["seq"]))
            last_of[name, key] = id(history[-1][2])
            oks = [n for n, (_, st, _) in enumerate(history) if st == "ok"]
            allowed: set[str | None] = {history[oks[-1]][0]} if oks else {None}
            after = history[oks[-1] + 1 :] if oks else history
            allowed |= {value for value, st, _ in after if st == "unknown"}
            actual = maps.get(name, {}).get(key)
            if actual not in allowed:
                problems.append(
                    f"map {name} key {key}: holds {actual!r}, "
                    f"expected one of {sorted(map(str, allowed))}"
                )
        for r in self.writes:
            if r["op"] != "map_batch_put" or r["st"] != "unknown":
                continue
            tail = [(k, v) for k, v in r["pairs"] if last_of[r["map"], k] == id(r)]
            applied = [maps.get(r["map"], {}).get(k) == v for k, v in tail]
            if any(applied) and not all(applied):
                problems.append(
                    f"r{r['round']}-c{r['client']} MapBatchPut seq {r['seq']} applied in part: "
                    f"{dict(zip([k for k, _ in tail], applied, strict=True))}"
                )
        return problems

    def check_drained(self, drained: dict[str, list[Delivery]]) -> list[str]:
        everything = [d for queue in QUEUES for d in drained.get(queue, [])]
        problems = self.check_deliveries(self.deliveries + everything)
        for queue, items in drained.items():
            ids = [d.message_id for d in items]
            if ids != sorted(ids):
                problems.append(f"{queue}: the final drain was not in id order")
        left = {d.message_id: d for d in everything}
        seen_count: dict[int, int] = {}
        for d in self.deliveries:
            seen_count[d.message_id] = max(seen_count.get(d.message_id, 0), d.count)
        for message_id, d in left.items():
            if d.count <= seen_count.get(message_id, 0):
                problems.append(
                    f"id {message_id}: delivery_count {d.count} at the end, but it was "
                    f"delivered with {seen_count[message_id]} before"
                )
        for message_id in self.ok_ids():
            gone = message_id in self.done_ok or message_id in self.done_unknown
            if message_id not in left and not gone:
                problems.append(f"id {message_id}: added (answered OK) and lost")
        for message_id in self.done_ok:
            if message_id in left:
                problems.append(f"id {message_id}: acked done (answered OK) and still there")
        seen = {d.element for d in self.deliveries + everything}
        for r in self.adds:
            if r["st"] != "ok" and r["op"] == "add_all":
                present = [e in seen for e in r["elements"]]
                if any(present) and not all(present):
                    problems.append(
                        f"r{r['round']}-c{r['client']} AddAll seq {r['seq']} "
                        f"({r['st']}) applied in part"
                    )
        return problems


def _running_max(values: Iterable[int]) -> Iterable[int]:
    top = -math.inf
    for v in values:
        top = max(top, v)
        yield int(top)


# Reading the server's state -----------------------------------------------------------


def read_state(stub: Stub, token: str, drain: bool, max_messages: int) -> ServerState:
    """Sizes, in-flight counts and maps; with drain, every queue emptied by PullElements."""
    state = ServerState({}, {}, {})
    for queue in QUEUES:
        size = stub.Size(pb.SizeRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S)
        unchecked = stub.GetUncheckNum(
            pb.GetUncheckNumRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S
        )
        if size.code != pb.CODE_OK or unchecked.code != pb.CODE_OK:
            raise RuntimeError(f"{queue}: Size {size.code}, GetUncheckNum {unchecked.code}")
        state.ready[queue], state.in_flight[queue] = size.size, unchecked.ack_num
    for name in MAPS:
        got = stub.MapGetAll(pb.MapGetAllRequest(token=token, map=name), timeout=CALL_TIMEOUT_S)
        if got.code not in (pb.CODE_OK, pb.CODE_MAP_NOT_FOUND):
            raise RuntimeError(f"map {name}: MapGetAll answered {got.code}")
        state.maps[name] = dict(got.map)
    if drain:
        state.drained = {}
        for queue in QUEUES:
            items: list[Delivery] = []
            for _ in range(max_messages + 1):  # each page takes at least one message
                page = stub.PullElements(
                    pb.PullElementsRequest(token=token, queue_name=queue, number=1000),
                    timeout=CALL_TIMEOUT_S,
                )
                if page.code == pb.CODE_QUEUE_EMPTY:
                    break
                if page.code != pb.CODE_OK:
                    raise RuntimeError(f"{queue}: PullElements answered {page.code}")
                items += [
                    Delivery(e.message_id, e.element, e.delivery_count, queue, math.inf, "drain")
                    for e in page.element_info
                ]
            state.drained[queue] = items
    return state


# The loop ------------------------------------------------------------------------------


@dataclass
class Options:
    work_dir: Path
    rounds: int = 5
    clients: int = 3
    seed: int = 0
    max_kill_delay_s: float = 1.5  # the kill lands uniformly in [0, this] after clients start
    budget_s: float = 3600.0  # no new round starts after this
    client_max_s: float = 120.0  # a client stops by itself after this (the kill comes first)
    client_max_ops: int = 100_000
    say: Callable[[str], None] = lambda line: None


@dataclass
class Report:
    seed: int
    rounds: int = 0
    kills: int = 0
    client_processes: int = 0
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)  # "add ok", "poll unknown", ...
    figures: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by_status: Counter[str] = Counter()
        for key, n in self.ops.items():
            by_status[key.split()[1]] += n
        lines = [
            f"crash loop (seed {self.seed}): {self.rounds} rounds, {self.kills} SIGKILLs, "
            f"{self.client_processes} client processes, {self.seconds:.1f} s",
            f"operations: {sum(self.ops.values())} "
            f"({', '.join(f'{n} {st}' for st, n in sorted(by_status.items()))})",
            "  " + ", ".join(f"{k} {n}" for k, n in sorted(self.ops.items())),
            "  " + ", ".join(f"{k} {n}" for k, n in self.figures.items()),
            f"violations: {len(self.problems)}",
        ]
        lines += [f"  {p}" for p in self.problems[:50]]
        return "\n".join(lines)


def _start_clients(
    options: Options, target: str, logs: Path, round_no: int, rng: random.Random
) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent)])}
    procs = []
    for client in range(options.clients):
        stem = logs / f"r{round_no:03d}-c{client}"
        with stem.with_suffix(".err").open("w") as err:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "client",
                        "--target",
                        target,
                        "--log",
                        str(stem.with_suffix(".jsonl")),
                        "--round",
                        str(round_no),
                        "--client",
                        str(client),
                        "--seed",
                        str(rng.getrandbits(32)),
                        "--max-seconds",
                        str(options.client_max_s),
                        "--max-ops",
                        str(options.client_max_ops),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=env,
                )
            )
    return procs


def _wait_ready(procs: list[subprocess.Popen[str]], timeout_s: float) -> None:
    """Block until every client printed `ready` (logged in) or exited."""
    with selectors.DefaultSelector() as selector:
        for proc in procs:
            assert proc.stdout is not None
            selector.register(proc.stdout, selectors.EVENT_READ)
        waiting = len(procs)
        deadline = time.monotonic() + timeout_s
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("crash loop clients did not log in")
            for key, _ in selector.select(remaining):
                selector.unregister(key.fileobj)
                waiting -= 1  # a line ("ready") or end of file (it died; its log tells)


def _finish_clients(procs: list[subprocess.Popen[str]], logs: Path, round_no: int) -> list[str]:
    problems = []
    for client, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=CLIENT_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=30)
            problems.append(f"r{round_no}-c{client}: did not stop after the kill")
        assert proc.stdout is not None
        proc.stdout.close()
        err = (logs / f"r{round_no:03d}-c{client}.err").read_text()
        if code != 0 or "Traceback" in err:
            problems.append(f"r{round_no}-c{client}: exited {code}: {err[-2000:]}")
    return problems


def _state(server: ServerProcess, drain: bool, max_messages: int) -> ServerState:
    with grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        token = login(stub)
        state = read_state(stub, token, drain, max_messages)
        stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)
        return state


def _create_queues(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        token = login(stub)
        for queue in QUEUES:
            reply = stub.NewQueue(
                pb.NewQueueRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S
            )
            if reply.code not in (pb.CODE_OK, pb.CODE_QUEUE_ALREADY_EXISTS):
                raise RuntimeError(f"NewQueue {queue}: {reply.code} {reply.message}")
        stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)


def run(options: Options) -> Report:
    """Run the crash loop in options.work_dir and check everything; see the module doc."""
    started = time.monotonic()
    rng = random.Random(options.seed)
    report = Report(seed=options.seed)
    data, logs = options.work_dir / "data", options.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_args = ("--rsa-bits", "2048")
    env = {"QM_ADMIN_PASSWORD": PASSWORD}
    server = ServerProcess(data, *server_args, env=env)
    try:
        for round_no in range(options.rounds):
            if time.monotonic() - started > options.budget_s:
                options.say(f"time budget spent after {round_no} rounds")
                break
            server = ServerProcess(data, *server_args, env=env).start()
            if round_no == 0:
                _create_queues(server)
            else:
                history = History.load(logs)
                state = _state(server, drain=False, max_messages=0)
                report.problems += [
                    f"after restart {round_no}: {p}" for p in history.check_state(state)
                ]
            procs = _start_clients(options, server.target, logs, round_no, rng)
            report.client_processes += len(procs)
            try:
                _wait_ready(procs, READY_TIMEOUT_S)
                time.sleep(rng.uniform(0, options.max_kill_delay_s))  # the random moment
            finally:
                server.kill()
            report.kills += 1
            report.problems += _finish_clients(procs, logs, round_no)
            report.rounds += 1
            options.say(
                f"round {round_no + 1}/{options.rounds}: killed; "
                f"{sum(1 for _ in logs.glob('*.jsonl'))} client logs, "
                f"{len(report.problems)} violations so far"
            )
        history = History.load(logs)
        server = ServerProcess(data, *server_args, env=env).start()
        state = _state(server, drain=True, max_messages=len(history.element_owner()))
        exit_code = server.terminate()
        if exit_code != 0:
            report.problems.append(f"qm-server exited {exit_code} on SIGTERM")
        problems = history.check() + [f"final: {p}" for p in history.check_state(state)]
        report.problems += list(dict.fromkeys(problems))  # a fault may show in two checks
        server_log = server.log()
        for marker in ("Traceback", "internal error"):
            if marker in server_log:
                report.problems.append(f"the server log holds {marker!r}")
        _figures(report, history, state)
    finally:
        server.stop()
        report.seconds = time.monotonic() - started
    return report


def _figures(report: Report, history: History, state: ServerState) -> None:
    for r in history.records:
        report.ops[f"{r['op']} {r['st']}"] += 1
    unknown_adds = [r for r in history.adds if r["st"] == "unknown"]
    seen = {d.element for d in history.deliveries}
    assert state.drained is not None
    seen |= {d.element for items in state.drained.values() for d in items}
    report.figures = {
        "messages added (OK)": len(history.ok_ids()),
        "adds with lost answer": len(unknown_adds),
        "of which applied": sum(1 for r in unknown_adds if r["elements"][0] in seen),
        "deliveries": len(history.deliveries),
        "redeliveries": sum(1 for d in history.deliveries if d.count > 1),
        "max delivery_count": max((d.count for d in history.deliveries), default=0),
        "acked done (OK)": len(history.done_ok),
        "done-acks with lost answer": len(history.done_unknown),
        "nacked (OK)": history.nacked_ok,
        "left at the end": sum(len(items) for items in state.drained.values()),
        "map writes": len(history.writes),
    }


# Command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crash_loop", description="SIGKILL qm-server under mixed load, round after round"
    )
    commands = parser.add_subparsers(dest="command")
    client = commands.add_parser("client", help="(internal) one load client process")
    client.add_argument("--target", required=True)
    client.add_argument("--log", required=True)
    client.add_argument("--round", type=int, required=True)
    client.add_argument("--client", type=int, required=True)
    client.add_argument("--seed", type=int, required=True)
    client.add_argument("--max-seconds", type=float, default=120.0)
    client.add_argument("--max-ops", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--max-kill-delay", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--budget", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument("--work-dir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "client":
        return client_main(args)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(31)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="qm-crash-loop-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work_dir}, seed {seed}, started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    report = run(
        Options(
            work_dir=work_dir,
            rounds=args.rounds,
            clients=args.clients,
            seed=seed,
            max_kill_delay_s=args.max_kill_delay,
            budget_s=args.budget,
            say=lambda line: print(line, flush=True),
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    "seed": report.seed,
                    "rounds": report.rounds,
                    "kills": report.kills,
                    "client_processes": report.client_processes,
                    "seconds": round(report.seconds, 1),
                    "ops": dict(report.ops),
                    "figures": report.figures,
                    "violations": report.problems,
                },
                indent=2,
            )
        )
    else:
        print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
