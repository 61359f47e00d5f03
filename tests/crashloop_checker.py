"""The crash loop's proofs: every client log so far against what the server holds.

Each rule is sound: it flags only what no order of the logged calls, with their lost
answers taking effect or not, can explain. Times are `time.monotonic()` of the client
processes (one clock for the machine); a call took effect at some instant between its
`t0` (sent) and `t1` (answered).

- Adds: ids unique, one per element, increasing within an AddAll, within a client, and in
  real time (an add answered before another was sent has the smaller ids).
- Deliveries: every delivered element was added, into that queue, under the id its add
  answered; an AddAll with a lost answer took effect entirely or not at all. An add
  answered with another code, CODE_UNAVAILABLE included, took no effect at all; so did
  a claim, an ack or a map write answered CODE_UNAVAILABLE (`unavailable`): none of them
  excuses what only a lost answer excuses.
- In flight for one session at a time, on time intervals: a delivery is certainly held
  from its answer until its ack was sent, its stream closed or its session was last seen
  alive; no other delivery of the id may happen wholly inside that interval. (A repeated
  (id, delivery_count) is flagged too.)
- FIFO across calls: a claim that handed out id x must not pass over an older id of the
  queue that was certainly ready for the whole call (added with an OK answer before it,
  delivered to nobody before its answer, no claim with a lost answer in the round, and
  no claim nobody saw running meanwhile: a Subscribe stream's push claimed as the stream
  ended, a poll whose session expired as it claimed).
- Each redelivery raises delivery_count by exactly one: between two observed deliveries
  of an id the count grows by one, plus at most one for each claim on its queue whose
  answer was lost, or that nobody saw, meanwhile.
- A message acked done with an OK answer is never delivered again. A lost-answer done-ack
  excuses its message's absence at the end only while nothing shows it failed: once the
  message is delivered again (a higher delivery_count), that ack no longer excuses it.
- Every add answered OK is still there at the end unless excused by a done-ack.
- Map keys hold the value of their last write answered OK or of a write whose answer was
  lost; a MapBatchPut with a lost answer took effect for all its keys or none.
- Every answered call got a code this well-formed load expects.

The lifecycle queue (crashloop_client.LIFECYCLE_SETTINGS), proved by `check_lifecycle`:
- Nothing lost between a queue and its dead-letter queue: every message added to it with
  an OK answer is at the end acked done, still in it, or in the dead-letter queue with
  its history (original queue, deliveries, cause); none is in both; none acked done with
  an OK answer is in either; each holds the element its add sent.
- A message moves only past max_deliveries: its history's delivery_count reaches it.
- Delivery counts never go down: a delivery answered before another was sent has the
  smaller count; the drain's count is above every count seen, a dead letter's at least.
- No lease runs out early: an ack or ExtendLease answered LEASE_EXPIRED was answered at
  least the lease after its poll (or the extension before it) was sent. No delivery
  follows a done-ack answered OK.
- GetQueueInfo agrees: the queue's dead_lettered and the dead-letter queue's ready count
  the dead letters listed, and nothing is left delayed.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crashloop_client import DEAD_LETTER_QUEUE, LEASE_S, LIFECYCLE_QUEUE, LIFECYCLE_SETTINGS, QUEUES

from qm.v1 import queue_manager_pb2 as pb

Record = dict[str, Any]
CLAIMS = ("poll", "pull", "subscribe")


@dataclass
class Delivery:
    message_id: int
    element: str
    count: int
    queue: str
    t0: float  # the claim was sent (or the stream opened)
    t1: float  # the element arrived
    where: str  # "r3-c1 poll seq 7" or "drain"
    session: tuple[int, int, int] | None = None  # (round, client, session); None: drain
    held_until: float = -math.inf  # certainly still held by its session until then


@dataclass
class LifecycleState:
    """The lifecycle queue at the end: drained, and the dead letters it left."""

    drained: list[Delivery]
    dead_letters: list[dict[str, Any]]  # id, original_queue, delivery_count, cause, element
    dead_lettered: int = 0  # GetQueueInfo(cl-l).dead_lettered
    dead_letter_queue_ready: int = 0  # GetQueueInfo(cl-dlq).ready
    delayed: int = 0  # of both


RELEASE_CAUSES = (
    "max_deliveries after ack error",
    "max_deliveries after lease expiry",
    "max_deliveries after session end",
    "max_deliveries after extend to 0",
)


@dataclass
class ServerState:
    """What the server holds right after a restart (before any client ran)."""

    ready: dict[str, int]
    in_flight: dict[str, int]
    maps: dict[str, dict[str, str]]
    drained: dict[str, list[Delivery]] | None = None  # per queue, in drain order
    lifecycle: LifecycleState | None = None  # with drained


def _who(r: Record) -> str:
    return f"r{r['round']}-c{r['client']} {r['op']} seq {r['seq']}"


def _session(r: Record) -> tuple[int, int, int]:
    return (r["round"], r["client"], r.get("session", 0))


class History:
    """Every client log so far, indexed for the checks."""

    def __init__(self, records: list[Record]) -> None:
        self.records = sorted(records, key=lambda r: (r["round"], r["client"], r["seq"]))
        self.adds = [r for r in self.records if r["op"] in ("add", "add_all")]
        self.acks = [r for r in self.records if r["op"] in ("ack", "batch_ack")]
        self.writes = [r for r in self.records if r["op"] in ("map_put", "map_batch_put")]
        self.lost_claims = [r for r in self.records if r["op"] in CLAIMS and r["st"] == "unknown"]
        # Claims nobody saw that end within their call: a Subscribe stream's push claimed
        # while the stream ended, a poll whose session expired while it claimed. Each may
        # raise a message's delivery_count unseen, and hold it while the call lasts.
        self.unseen_claims = self.lost_claims + [
            r
            for r in self.records
            if r["op"] == "subscribe" or (r["op"] in CLAIMS and r["st"] in ("expired", "failed"))
        ]
        # The last moment each session was certainly alive: a call it made was answered.
        self.alive_until: dict[tuple[int, int, int], float] = defaultdict(lambda: -math.inf)
        for r in self.records:
            if r["st"] == "ok" and r["op"] not in ("expire", "login"):
                key = _session(r)
                self.alive_until[key] = max(self.alive_until[key], r["t0"])
        self.deliveries = self._deliveries()
        # The outcome of done-acks per id.
        self.done_ok: dict[int, tuple[float, int]] = {}  # id -> (answer time, count acked)
        self.done_unknown: dict[int, list[int]] = defaultdict(list)  # id -> counts acked
        self.nacked_ok = 0
        for r in self.acks:
            if r["st"] == "unknown" and r["done"]:
                for message_id, count in zip(r["ids"], r["counts"], strict=True):
                    self.done_unknown[message_id].append(count)
            if r["st"] not in ("ok", "failed"):
                continue
            for message_id, count, code in zip(
                r["ids"], r["counts"], r.get("results", []), strict=False
            ):
                if code == pb.CODE_OK and r["done"]:
                    self.done_ok[message_id] = (r["t1"], count)
                elif code == pb.CODE_OK:
                    self.nacked_ok += 1
        for r in self.records:
            if r["op"] != "subscribe":
                continue
            counts = {g[0]: g[2] for g in r["got"]}
            refused = {message_id for message_id, _ in r.get("ack_results", [])}
            for message_id in r["acked"]:
                if r["st"] == "ok" and message_id not in refused:
                    self.done_ok[message_id] = (r["t1"], counts[message_id])
                elif r["st"] != "ok":
                    self.done_unknown[message_id].append(counts[message_id])

    def _deliveries(self) -> list[Delivery]:
        found: list[Delivery] = []
        released: dict[tuple[tuple[int, int, int], int], list[float]] = defaultdict(list)
        for r in self.acks:
            for message_id in r["ids"]:
                released[_session(r), message_id].append(r["t0"])
        for r in self.records:
            if r["op"] in ("poll", "pull") and r["st"] == "ok":
                for message_id, element, count in r.get("got", []):
                    d = Delivery(
                        message_id, element, count, r["q"], r["t0"], r["t1"], _who(r), _session(r)
                    )
                    acks = [t for t in released[_session(r), message_id] if t >= d.t0]
                    d.held_until = min(acks) if acks else self.alive_until[_session(r)]
                    found.append(d)
            elif r["op"] == "subscribe":
                close = r.get("t_close", -math.inf)
                for message_id, element, count, arrived in r["got"]:
                    d = Delivery(
                        message_id, element, count, r["q"], r["t0"], arrived, _who(r), _session(r)
                    )
                    d.held_until = r["t_ack"] if message_id in r["acked"] else close
                    found.append(d)
        return found

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
        """id -> (queue, element) for every add into a shared queue answered OK."""
        return {
            message_id: (r["q"], element)
            for r in self.adds
            if r["st"] == "ok" and r["q"] in QUEUES
            for message_id, element in zip(r["ids"], r["elements"], strict=True)
        }

    def check_adds(self) -> list[str]:
        problems: list[str] = []
        owner: dict[int, Record] = {}
        last_id: dict[tuple[int, int], int] = {}
        for r in self.adds:
            if r["st"] != "ok":
                continue
            ids, who = r["ids"], _who(r)
            if len(ids) != len(r["elements"]) or ids != sorted(set(ids)):
                problems.append(f"{who}: ids {ids} not one increasing id per element")
            for message_id in ids:
                if message_id in owner:
                    first = owner[message_id]
                    problems.append(f"id {message_id} given twice: {_who(first)} and {who}")
                owner[message_id] = r
            client = (r["round"], r["client"])
            if ids and client in last_id and ids[0] <= last_id[client]:
                problems.append(f"{who}: id {ids[0]} not above the client's previous id")
            if ids:
                last_id[client] = ids[-1]
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
                    f"{_who(r)}: id {min(r['ids'])} is not above id {highest[before - 1]} "
                    "answered before it was sent"
                )
        return problems

    def element_owner(self) -> dict[str, tuple[Record, int]]:
        """element -> (the add that sent it, its index in that add)."""
        return {e: (r, n) for r in self.adds for n, e in enumerate(r["elements"])}

    # Deliveries ---------------------------------------------------------------------

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
            if add["st"] in ("failed", "unavailable"):
                problems.append(
                    f"{d.where}: {d.element!r} delivered, but its add was answered "
                    f"{add.get('grpc', add.get('code'))}"
                )
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
                    problems.append(f"{_who(r)}: ids {ids} not oldest first")
        return (
            problems
            + self.check_one_holder(deliveries)
            + self.check_fifo(deliveries)
            + self.check_counts(deliveries)
        )

    def check_one_holder(self, deliveries: list[Delivery]) -> list[str]:
        """No delivery of an id happens while another delivery of it is certainly held."""
        problems: list[str] = []
        by_id: dict[int, list[Delivery]] = defaultdict(list)
        for d in deliveries:
            by_id[d.message_id].append(d)
        for message_id, ds in by_id.items():
            for a in ds:
                for b in ds:
                    if a is not b and a.t1 <= b.t0 and b.t1 <= a.held_until:
                        problems.append(
                            f"{b.where}: id {message_id} delivered (count {b.count}) while "
                            f"{a.where} held it (count {a.count}, held for "
                            f"{a.held_until - a.t1:.3f} s after it arrived)"
                        )
        return problems

    def check_fifo(self, deliveries: list[Delivery]) -> list[str]:
        """A claim passes over no older id that was certainly ready all through it."""
        problems: list[str] = []
        first_seen: dict[int, float] = {}
        for d in deliveries:
            first_seen[d.message_id] = min(first_seen.get(d.message_id, math.inf), d.t0)
        added_at = {
            message_id: r["t1"]
            for r in self.adds
            if r["st"] == "ok" and r["q"] in QUEUES
            for message_id in r["ids"]
        }
        queue_of = self.ok_ids()
        claims: dict[str, list[Delivery]] = defaultdict(list)  # where -> its deliveries
        for d in deliveries:
            if d.session is not None and d.queue in QUEUES:
                claims[d.where].append(d)
        for where, ds in claims.items():
            newest = max(ds, key=lambda d: d.message_id)
            assert newest.session is not None
            if self.lost_claim_may_hold(newest, newest.session[0]):
                continue  # a claim whose answer was lost may hold any older id
            t0, t1 = newest.t0, max(d.t1 for d in ds)
            if any(
                r["q"] == newest.queue and r["t0"] < t1 and r["t1"] > t0 and r["st"] != "unknown"
                for r in self.unseen_claims
                if _who(r) != where
            ):
                continue  # a claim nobody saw may hold an older id while this one ran
            passed = [
                older
                for older, at in added_at.items()
                if older < newest.message_id
                and queue_of[older][0] == newest.queue
                and at < t0
                and first_seen.get(older, math.inf) > t1
            ]
            if passed:
                problems.append(
                    f"{where}: handed out id {newest.message_id} while older id "
                    f"{min(passed)} of {newest.queue} was ready"
                )
        return problems

    def lost_claim_may_hold(self, d: Delivery, round_no: int) -> bool:
        """Whether a lost claim may hold older ids of d's queue: until its round's restart."""
        return any(r["round"] == round_no and r["q"] == d.queue for r in self.lost_claims)

    def check_counts(self, deliveries: list[Delivery]) -> list[str]:
        """delivery_count grows by one per delivery, seen or lost."""
        problems: list[str] = []
        by_id: dict[int, list[Delivery]] = defaultdict(list)
        for d in deliveries:
            if d.queue in QUEUES:
                by_id[d.message_id].append(d)
        for message_id, ds in by_id.items():
            ds.sort(key=lambda d: (d.count, d.t0))
            before: Delivery | None = None
            for d in ds:
                since = -math.inf if before is None else before.t0
                lost = sum(
                    1
                    for r in self.unseen_claims
                    if r["q"] == d.queue and r["t0"] < d.t1 and r["t1"] > since
                )
                step = d.count - (0 if before is None else before.count)
                if step > 1 + lost:
                    problems.append(
                        f"{d.where}: id {message_id} delivery_count {d.count} after "
                        f"{0 if before is None else before.count}, with {lost} claims of "
                        "lost answer between"
                    )
                before = d
        return problems

    def check_acks(self) -> list[str]:
        """Each client acks only what its session holds: every answered ack must find it."""
        problems: list[str] = []
        for r in self.acks:
            if r["st"] not in ("ok", "failed"):
                continue
            results = r.get("results", [])
            if r["st"] == "failed" or results != [pb.CODE_OK] * len(r["ids"]):
                problems.append(
                    f"{_who(r)} of held ids {r['ids']}: code {r.get('code')}, results {results}"
                )
        for r in self.records:
            if r["op"] == "subscribe" and r.get("ack_results"):
                problems.append(f"{_who(r)}: stream acks refused {r['ack_results']}")
        return problems

    def check_answers(self) -> list[str]:
        """Every call of this load is well-formed: an answer outside the expected is a bug."""
        return [
            f"{_who(r)}: answered code {r.get('code')} {r.get('codes', '')}"
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

    def excused(self, message_id: int, last_count: int) -> bool:
        """Gone by a done-ack: answered OK, or lost for its latest delivery."""
        if message_id in self.done_ok:
            return True
        return any(count >= last_count for count in self.done_unknown.get(message_id, []))

    def last_counts(self, extra: Iterable[Delivery] = ()) -> dict[int, int]:
        last: dict[int, int] = {}
        for d in [*self.deliveries, *extra]:
            last[d.message_id] = max(last.get(d.message_id, 0), d.count)
        return last

    def check_state(self, state: ServerState) -> list[str]:
        problems = [
            f"{queue}: {n} messages in flight right after a restart"
            for queue, n in state.in_flight.items()
            if n
        ]
        ok_ids = self.ok_ids()
        last = self.last_counts()
        for queue in QUEUES:
            mine = [i for i, (q, _) in ok_ids.items() if q == queue]
            lower = sum(1 for i in mine if not self.excused(i, last.get(i, 0)))
            upper = sum(1 for i in mine if i not in self.done_ok) + sum(
                len(r["elements"]) for r in self.adds if r["st"] == "unknown" and r["q"] == queue
            )
            ready = state.ready.get(queue, 0)
            if not lower <= ready <= upper:
                problems.append(f"{queue}: Size {ready} outside [{lower}, {upper}] the logs allow")
        problems += self.check_maps(state.maps)
        if state.drained is not None:
            problems += self.check_drained(state.drained)
        if state.lifecycle is not None:
            problems += self.check_lifecycle(state.lifecycle)
        return problems

    # The lifecycle queue ----------------------------------------------------------------

    def lifecycle_deliveries(self) -> list[Delivery]:
        return [
            Delivery(message_id, element, count, r["q"], r["t0"], r["t1"], _who(r), _session(r))
            for r in self.records
            if r["op"] == "lpoll" and r["st"] == "ok"
            for message_id, element, count in r.get("got", [])
        ]

    def lifecycle_acks(self) -> list[Record]:
        return [r for r in self.records if r["op"] == "lack"]

    def check_lifecycle_history(self) -> list[str]:
        """What the logs alone show: no early expiry, counts that only grow."""
        problems: list[str] = []
        extensions = [r for r in self.records if r["op"] == "lextend"]
        for r in self.lifecycle_acks() + extensions:
            # `polled`: when the lease began at the earliest (the poll, or an extension).
            if r.get("results") == [pb.CODE_LEASE_EXPIRED] and r["t1"] - r["polled"] < LEASE_S:
                problems.append(
                    f"{_who(r)}: LEASE_EXPIRED {r['t1'] - r['polled']:.3f} s after the poll, "
                    f"under the {LEASE_S} s lease"
                )
        by_id: dict[int, list[Delivery]] = defaultdict(list)
        for d in self.lifecycle_deliveries():
            by_id[d.message_id].append(d)
        for ds in by_id.values():
            for a in ds:
                for b in ds:
                    if a.t1 < b.t0 and b.count <= a.count:
                        problems.append(
                            f"{b.where}: id {b.message_id} delivery_count {b.count} after "
                            f"{a.count} at {a.where}"
                        )
        done = self.lifecycle_done()[0]
        for d in self.lifecycle_deliveries():
            if d.message_id in done and d.t0 > done[d.message_id]:
                problems.append(f"{d.where}: id {d.message_id} delivered after its done-ack")
        return problems

    def lifecycle_done(self) -> tuple[dict[int, float], set[int]]:
        """Ids acked done with an OK answer (-> when), and with a lost answer."""
        ok: dict[int, float] = {}
        unknown: set[int] = set()
        for r in self.lifecycle_acks():
            if not r["done"]:
                continue
            if r["st"] == "unknown":
                unknown.update(r["ids"])
            elif r.get("results") == [pb.CODE_OK]:
                ok[r["ids"][0]] = r["t1"]
        return ok, unknown

    def check_lifecycle(self, end: LifecycleState) -> list[str]:
        problems = self.check_lifecycle_history()
        added = {
            message_id: element
            for r in self.records
            if r["op"] == "ladd" and r["st"] == "ok"
            for message_id, element in zip(r["ids"], r["elements"], strict=True)
        }
        sent = {e for r in self.records if r["op"] == "ladd" for e in r["elements"]}
        done_ok, done_unknown = self.lifecycle_done()
        left = {d.message_id: d for d in end.drained}
        dead = {int(d["id"]): d for d in end.dead_letters}
        seen: dict[int, int] = {}
        for d in self.lifecycle_deliveries():
            seen[d.message_id] = max(seen.get(d.message_id, 0), d.count)
        for i in sorted(set(left) & set(dead)):
            problems.append(f"id {i}: both in {LIFECYCLE_QUEUE} and in {DEAD_LETTER_QUEUE}")
        for message_id in sorted(added):
            there = message_id in left or message_id in dead
            if not there and message_id not in done_ok and message_id not in done_unknown:
                problems.append(
                    f"id {message_id}: added to {LIFECYCLE_QUEUE} (answered OK), never acked "
                    "done, and in neither queue at the end"
                )
        for message_id in sorted(done_ok.keys() & (left.keys() | dead.keys())):
            problems.append(f"id {message_id}: acked done (answered OK) and still there")
        for message_id, element in [
            *((i, d.element) for i, d in left.items()),
            *((i, str(d["element"])) for i, d in dead.items()),
        ]:
            if element not in sent or added.get(message_id, element) != element:
                problems.append(f"id {message_id}: holds {element!r}, not what its add sent")
        for message_id, d in left.items():
            if d.count <= seen.get(message_id, 0):
                problems.append(
                    f"id {message_id}: delivery_count {d.count} in the drain, "
                    f"{seen[message_id]} seen before"
                )
        limit = LIFECYCLE_SETTINGS.max_deliveries
        for message_id, letter in dead.items():
            history = (letter["original_queue"], letter["cause"])
            if history[0] != LIFECYCLE_QUEUE or history[1] not in RELEASE_CAUSES:
                problems.append(f"dead letter {message_id}: history {history}")
            count = int(letter["delivery_count"])
            if count < max(limit, seen.get(message_id, 0)):
                problems.append(
                    f"dead letter {message_id}: delivery_count {count}, under max_deliveries "
                    f"{limit} or the {seen.get(message_id, 0)} seen"
                )
        counts = (end.dead_lettered, end.dead_letter_queue_ready, end.delayed)
        if counts != (len(dead), len(dead), 0):
            problems.append(
                f"GetQueueInfo: dead_lettered, ready in {DEAD_LETTER_QUEUE}, delayed {counts}, "
                f"with {len(dead)} dead letters listed"
            )
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
            # A write whose answer was lost may land after a later one's OK answer: its
            # call may still be on its way through the server when the next is sent.
            allowed |= {value for value, st, _ in history if st == "unknown"}
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
                    f"{_who(r)} MapBatchPut applied in part: "
                    f"{dict(zip([k for k, _ in tail], applied, strict=True))}"
                )
        return problems

    def check_drained(self, drained: dict[str, list[Delivery]]) -> list[str]:
        everything = [d for queue in QUEUES for d in drained.get(queue, [])]
        problems = self.check_deliveries(self.deliveries + everything)
        for queue in QUEUES:
            ids = [d.message_id for d in drained.get(queue, [])]
            if ids != sorted(ids):
                problems.append(f"{queue}: the drain after the restart is not oldest first")
        seen_count = self.last_counts()
        for d in everything:
            if d.count <= seen_count.get(d.message_id, 0):
                problems.append(
                    f"id {d.message_id}: delivery_count {d.count} at the end, but it was "
                    f"delivered with {seen_count[d.message_id]} before"
                )
        left = {d.message_id for d in everything}
        last = self.last_counts(everything)
        for message_id in self.ok_ids():
            if message_id not in left and not self.excused(message_id, last.get(message_id, 0)):
                problems.append(f"id {message_id}: added (answered OK) and lost")
        for message_id in self.done_ok:
            if message_id in left:
                problems.append(f"id {message_id}: acked done (answered OK) and still there")
        seen = {d.element for d in self.deliveries + everything}
        for r in self.adds:
            if r["st"] != "ok" and r["op"] == "add_all" and r["q"] in QUEUES:
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
