"""SIGKILL qm-server at random moments under mixed load from client processes; prove that
nothing answered OK was lost, no id repeats, acked messages stay gone and maps hold what
was written, and, on a queue with an ack deadline and a dead-letter queue, that leases
run out and messages move to the dead-letter queue without one being lost between the
two, in both, or counted down. The runner is tests/crashloop.py, the load
tests/crashloop_client.py and the proofs tests/crashloop_checker.py; scripts/crash_loop
runs more rounds. The same loop runs on three nodes sharing a private PostgreSQL instance
(crashloop_pg.py), with node pauses and a database crash besides the kills.

The checker's own tests below feed it made-up histories with one fault each, so that a
clean crash-loop run means something."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pg_fixtures
import pytest
from crashloop import Options, run
from crashloop_checker import Delivery, History, LifecycleState, ServerState
from crashloop_pg import LOST_CLAIM_HOLD_S, SharedStoreHistory
from pg_instance import PgInstance

from qm.v1 import queue_manager_pb2 as pb


def test_crash_loop(tmp_path: Path) -> None:
    report = run(
        Options(work_dir=tmp_path, rounds=6, clients=4, seed=20_260_101, max_kill_delay_s=1.5)
    )
    print(report.summary())
    assert report.problems == [], report.summary()
    assert (report.rounds, report.kills, report.client_processes) == (6, 6, 24)
    # The load really ran between the kills, and what the checker excuses or suspects
    # really happened: lost answers (to the kills and to short deadlines), redeliveries,
    # done-acks whose answer was lost, and each kind of call of the mix.
    figures = report.figures
    assert figures["messages added (OK)"] >= 50, report.summary()
    assert figures["acked done (OK)"] >= 10, report.summary()
    exercised = (
        "answers lost",
        "of which to a short deadline",
        "adds with lost answer",
        "redeliveries",
        "done-acks with lost answer",
        "of which on Subscribe streams",
        "nacked (OK)",
        "logouts",
        "sessions expired",
        "queues destroyed",
        "calls denied to the worker",
        "calls of the worker",
        "map writes",
        "lifecycle redeliveries",
        "dead-letter moves",
        "of which after ack error",
        "of which after session end",
    )
    assert [name for name in exercised if figures[name] == 0] == [], report.summary()
    # Leases ran out while their sessions lived: told to a late ack, or seen in the cause
    # of a dead letter (the long rounds give them the time).
    expiries = figures["late acks answered LEASE_EXPIRED"] + figures["of which after lease expiry"]
    assert expiries > 0, report.summary()


def test_crash_loop_on_postgresql(tmp_path: Path) -> None:
    """Three nodes on a private PostgreSQL instance (crashloop_pg.py): a node paused in
    the first round, the database crashed in the second, a node SIGKILLed mid-load in
    each and the rest at its end; the clients move to another node or wait out the
    outage, and every proof holds."""
    reason = PgInstance.unavailable() or pg_fixtures.unavailable()
    if reason:
        pytest.skip(reason)
    report = run(
        Options(
            work_dir=tmp_path, rounds=2, clients=4, seed=20_261_203, max_kill_delay_s=1.5, nodes=3
        )
    )
    print(report.summary())
    assert report.problems == [], report.summary()
    assert (report.rounds, report.kills, report.client_processes) == (2, 6, 8)
    figures = report.figures
    faults = ("node SIGKILLs mid-load", "node pauses (SIGSTOP)", "database crashes and restarts")
    assert [figures[f] for f in faults] == [2, 1, 1], report.summary()
    exercised = (
        "messages added (OK)",
        "acked done (OK)",
        "answers lost",
        "redeliveries",
        "database outage answers",
        "OK answers after an outage answer",
        "moves to another node",
        "lifecycle redeliveries",
    )
    assert [name for name in exercised if figures[name] == 0] == [], report.summary()


def record(
    op: str, st: str, seq: int, t: float, *, client: int = 0, **fields: Any
) -> dict[str, Any]:
    return {
        "op": op,
        "st": st,
        "seq": seq,
        "t0": t,
        "t1": t + 0.5,
        "round": 0,
        "client": client,
        **fields,
    }


def add(seq: int, t: float, ids: list[int], st: str = "ok", **kw: Any) -> dict[str, Any]:
    elements = [f"e{seq}.{n}" for n in range(max(len(ids), kw.pop("n", 1)))]
    return record("add_all", st, seq, t, q="cl-a", elements=elements, ids=ids, **kw)


def poll(seq: int, t: float, message_id: int, element: str, count: int) -> dict[str, Any]:
    return record("poll", "ok", seq, t, q="cl-a", code=0, got=[[message_id, element, count]])


def ack(seq: int, t: float, message_id: int, count: int, st: str = "ok") -> dict[str, Any]:
    results = [pb.CODE_OK] if st == "ok" else []
    return record("ack", st, seq, t, ids=[message_id], counts=[count], done=True, results=results)


def final(
    *left: tuple[int, str, int], maps: dict[str, dict[str, str]] | None = None
) -> ServerState:
    drained = [Delivery(i, e, c, "cl-a", math.inf, math.inf, "drain") for i, e, c in left]
    return ServerState(
        ready={"cl-a": len(drained)}, in_flight={}, maps=maps or {}, drained={"cl-a": drained}
    )


def problems(records: list[dict[str, Any]], state: ServerState) -> list[str]:
    history = History(records)
    return list(dict.fromkeys(history.check() + history.check_state(state)))


def test_checker_accepts_a_clean_history() -> None:
    records = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), ack(3, 2, 1, 1), add(4, 3, [2])]
    assert problems(records, final((2, "e4.0", 1))) == []


def test_checker_flags_a_lost_message() -> None:
    assert problems([add(1, 0, [1]), add(2, 1, [2])], final((2, "e2.0", 1))) == [
        "cl-a: Size 1 outside [2, 2] the logs allow",
        "id 1: added (answered OK) and lost",
    ]


def test_checker_excuses_a_done_ack_with_a_lost_answer() -> None:
    records = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), ack(3, 2, 1, 1, st="unknown")]
    assert problems(records, final()) == []


def test_checker_flags_an_acked_message_delivered_again() -> None:
    records = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), ack(3, 2, 1, 1)]
    found = problems(records, final((1, "e1.0", 2)))
    assert "id 1: acked done (answered OK) and still there" in found


def test_checker_flags_a_repeated_or_decreasing_id() -> None:
    found = problems([add(1, 0, [5]), add(2, 1, [5])], final((5, "e1.0", 1)))
    assert any("id 5 given twice" in p for p in found), found
    found = problems([add(1, 0, [5]), add(2, 1, [4])], final((4, "e2.0", 1), (5, "e1.0", 1)))
    assert any("not above" in p for p in found), found


def test_checker_flags_a_double_delivery_and_a_stale_count() -> None:
    other = record("poll", "ok", 1, 1.5, client=1, q="cl-a", code=0, got=[[1, "e1.0", 1]])
    records = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), other]
    found = problems(records, final((1, "e1.0", 1)))
    assert any("delivered twice with delivery_count 1" in p for p in found), found
    assert any("delivery_count 1 at the end" in p for p in found), found


def test_checker_flags_a_partial_add_all() -> None:
    records = [add(1, 0, [], st="unknown", n=3)]
    assert problems(records, final((1, "e1.0", 1), (2, "e1.2", 1))) == [
        "r0-c0 AddAll seq 1 (unknown) applied in part"
    ]
    assert problems(records, final()) == []
    assert problems(records, final((1, "e1.0", 1), (2, "e1.1", 1), (3, "e1.2", 1))) == []


def test_checker_holds_a_code_unavailable_answer_to_having_applied_nothing() -> None:
    """A lost answer excuses what CODE_UNAVAILABLE (`unavailable`) must not: an add found
    at the end, or a map write that stuck."""
    lost, refused = add(1, 0, [], st="unknown"), add(1, 0, [], st="unavailable")
    assert problems([lost], final((1, "e1.0", 1))) == []
    found = problems([{**refused, "grpc": "CODE_UNAVAILABLE"}], final((1, "e1.0", 1)))
    assert "drain: 'e1.0' delivered, but its add was answered CODE_UNAVAILABLE" in found
    put = record("map_put", "unknown", 1, 1, map="clm-0", pairs=[["k", "v"]])
    assert problems([put], final(maps={"clm-0": {"k": "v"}})) == []
    put["st"] = "unavailable"
    assert problems([put], final(maps={"clm-0": {"k": "v"}}))


def test_checker_flags_a_wrong_map_value() -> None:
    def put(seq: int, value: str, st: str) -> dict[str, Any]:
        return record("map_put", st, seq, seq, map="clm-0", pairs=[["k", value]])

    records = [put(1, "v1", "ok"), put(2, "v2", "ok"), put(3, "v3", "unknown")]
    for value in ("v2", "v3"):
        assert problems(records, final(maps={"clm-0": {"k": value}})) == []
    for wrong in ({"k": "v1"}, {}, {"k": "v2", "x": "y"}):
        assert problems(records, final(maps={"clm-0": wrong})), wrong


def test_checker_stops_excusing_a_lost_done_ack_once_its_message_comes_back() -> None:
    """The done-ack of delivery 1 lost its answer; delivery 2 shows it did not remove the
    message, so the message must still be there."""
    records = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), ack(3, 2, 1, 1, st="unknown")]
    again = record("poll", "ok", 1, 5, client=1, q="cl-a", code=0, got=[[1, "e1.0", 2]])
    assert problems([*records, again], final()) == [
        "cl-a: Size 0 outside [1, 1] the logs allow",
        "id 1: added (answered OK) and lost",
    ]
    assert problems([*records, again], final((1, "e1.0", 3))) == []


def nack(seq: int, t: float, message_id: int, count: int) -> dict[str, Any]:
    return record("ack", "ok", seq, t, ids=[message_id], counts=[count], done=False, results=[0])


def test_checker_flags_a_delivery_while_another_session_holds_it() -> None:
    """Client 0 holds id 1 from 1.5 until its nack at 3; a delivery to client 1 wholly
    inside that interval is a second holder, whatever its delivery_count."""
    held = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), nack(3, 3, 1, 1)]

    def other(t: float) -> dict[str, Any]:
        return record("poll", "ok", 1, t, client=1, q="cl-a", code=0, got=[[1, "e1.0", 2]])

    found = problems([*held, other(2)], final((1, "e1.0", 3)))
    assert found == [
        "r0-c1 poll seq 1: id 1 delivered (count 2) while r0-c0 poll seq 2 held it "
        "(count 1, held for 1.500 s after it arrived)"
    ]
    assert problems([*held, other(3.5)], final((1, "e1.0", 3))) == []


def test_checker_flags_a_claim_that_passes_over_an_older_ready_message() -> None:
    """Id 1 was added (answered) before the poll was sent and nobody had it: the poll must
    not hand out id 2 first, unless a claim whose answer was lost may hold id 1."""
    records = [add(1, 0, [1]), add(2, 1, [2]), poll(3, 2, 2, "e2.0", 1)]
    left = final((1, "e1.0", 1), (2, "e2.0", 2))
    assert problems(records, left) == [
        "r0-c0 poll seq 3: handed out id 2 while older id 1 of cl-a was ready"
    ]
    lost = record("poll", "unknown", 1, 1.8, client=1, q="cl-a")
    assert problems([*records, lost], left) == []


def test_on_a_shared_store_a_lost_claim_excuses_fifo_while_its_session_may_hold() -> None:
    """On several nodes a claim whose answer was lost holds what it took until its
    session expires, which may be rounds later: it excuses a pass over an older id that
    long, and no longer."""
    records = [add(1, 0, [1]), add(2, 1, [2]), {**poll(3, 40, 2, "e2.0", 1), "round": 2}]
    left = final((1, "e1.0", 1), (2, "e2.0", 2))
    lost = record("poll", "unknown", 1, 0.5, client=1, q="cl-a")
    assert problems([*records, lost], left) == [
        "r2-c0 poll seq 3: handed out id 2 while older id 1 of cl-a was ready"
    ]
    shared = SharedStoreHistory([*records, lost])
    assert shared.check() + shared.check_state(left) == []
    late = {**records[2], "t0": 1 + LOST_CLAIM_HOLD_S, "t1": 2 + LOST_CLAIM_HOLD_S}
    shared = SharedStoreHistory([*records[:2], late, lost])
    assert shared.check_fifo(shared.deliveries) == [
        "r2-c0 poll seq 3: handed out id 2 while older id 1 of cl-a was ready"
    ]


def test_checker_flags_a_delivery_count_that_skips() -> None:
    """Delivery 1, a nack, then delivery 3: one redelivery went missing, unless a claim
    whose answer was lost may have taken it in between."""
    records = [add(1, 0, [1]), poll(2, 1, 1, "e1.0", 1), nack(3, 2, 1, 1), poll(4, 3, 1, "e1.0", 3)]
    assert problems(records, final((1, "e1.0", 4))) == [
        "r0-c0 poll seq 4: id 1 delivery_count 3 after 1, with 0 claims of lost answer between"
    ]
    lost = record("poll", "unknown", 1, 2.5, client=1, q="cl-a")
    assert problems([*records, lost], final((1, "e1.0", 4))) == []


def test_checker_flags_an_answer_the_load_does_not_expect() -> None:
    denied = record("denied", "failed", 1, 0, q="cl-a", code=pb.CODE_OK)
    assert problems([denied], final()) == ["r0-c0 denied seq 1: answered code 0 "]


# The lifecycle queue (crashloop_checker.check_lifecycle) ---------------------------------

EXPIRY = "max_deliveries after lease expiry"


def ladd(seq: int, t: float, ids: list[int]) -> dict[str, Any]:
    elements = [f"l{seq}.{n}" for n in range(len(ids))]
    return record("ladd", "ok", seq, t, q="cl-l", elements=elements, ids=ids, code=0)


def lpoll(seq: int, t: float, message_id: int, count: int) -> dict[str, Any]:
    return record("lpoll", "ok", seq, t, q="cl-l", code=0, got=[[message_id, "l1.0", count]])


def lack(
    seq: int, t: float, message_id: int, count: int, code: int, polled: float
) -> dict[str, Any]:
    return record(
        "lack",
        "ok",
        seq,
        t,
        ids=[message_id],
        counts=[count],
        done=True,
        polled=polled,
        results=[code],
        code=code,
    )


def lifecycle_final(
    left: list[tuple[int, str, int]], dead: list[tuple[int, int, str]]
) -> ServerState:
    """The lifecycle queue at the end: `left` (id, element, count) drained from it, and
    `dead` (id, delivery count, cause) of element "l1.0" in the dead-letter queue."""
    state = final()
    letters = [
        {
            "id": i,
            "original_queue": "cl-l",
            "delivery_count": n,
            "cause": cause,
            "element": "l1.0",
        }
        for i, n, cause in dead
    ]
    drained = [Delivery(i, e, c, "cl-l", math.inf, math.inf, "drain") for i, e, c in left]
    state.lifecycle = LifecycleState(drained, letters, len(letters), len(letters), 0)
    return state


# Id 1 hangs past its lease (acked late: LEASE_EXPIRED), is delivered again, and that
# lease runs out too: dead-lettered. Id 2 is never taken.
HUNG = [
    ladd(1, 0, [1, 2]),
    lpoll(2, 1, 1, 1),
    lack(3, 2.6, 1, 1, pb.CODE_LEASE_EXPIRED, polled=1),
    lpoll(4, 3, 1, 2),
]


def test_checker_accepts_a_clean_lifecycle() -> None:
    assert problems(HUNG, lifecycle_final([(2, "l1.1", 1)], [(1, 2, EXPIRY)])) == []


def test_checker_flags_a_message_lost_between_its_queue_and_the_dead_letter_queue() -> None:
    assert problems(HUNG, lifecycle_final([(2, "l1.1", 1)], [])) == [
        "id 1: added to cl-l (answered OK), never acked done, and in neither queue at the end"
    ]


def test_checker_flags_a_message_in_both_queues() -> None:
    found = problems(HUNG, lifecycle_final([(1, "l1.0", 3), (2, "l1.1", 1)], [(1, 2, EXPIRY)]))
    assert found == ["id 1: both in cl-l and in cl-dlq"]


def test_checker_flags_an_early_expiry_and_a_dead_letter_under_max_deliveries() -> None:
    early = [*HUNG[:2], lack(3, 1.0, 1, 1, pb.CODE_LEASE_EXPIRED, polled=1), HUNG[3]]
    found = problems(early, lifecycle_final([(2, "l1.1", 1)], [(1, 2, EXPIRY)]))
    assert found == [
        "r0-c0 lack seq 3: LEASE_EXPIRED 0.500 s after the poll, under the 1.0 s lease"
    ]
    found = problems(HUNG[:2], lifecycle_final([(2, "l1.1", 1)], [(1, 1, EXPIRY)]))
    assert found == ["dead letter 1: delivery_count 1, under max_deliveries 2 or the 1 seen"]


def test_checker_flags_a_delivery_count_that_goes_down() -> None:
    lower = [*HUNG, lpoll(5, 5, 1, 1)]
    found = problems(lower, lifecycle_final([(1, "l1.0", 2), (2, "l1.1", 1)], []))
    assert found == [
        "r0-c0 lpoll seq 5: id 1 delivery_count 1 after 1 at r0-c0 lpoll seq 2",
        "r0-c0 lpoll seq 5: id 1 delivery_count 1 after 2 at r0-c0 lpoll seq 4",
        "id 1: delivery_count 2 in the drain, 2 seen before",
    ]


def test_checker_flags_an_acked_lifecycle_message_still_there() -> None:
    acked = [*HUNG, lack(5, 3.2, 1, 2, pb.CODE_OK, polled=3)]
    found = problems(acked, lifecycle_final([(2, "l1.1", 1)], [(1, 2, EXPIRY)]))
    assert found == ["id 1: acked done (answered OK) and still there"]


def test_checker_holds_an_extension_to_the_lease_it_set() -> None:
    """An ExtendLease answered OK at 2 started a new lease: LEASE_EXPIRED for the message
    at 2.6 is early; after 3 it is not."""

    def extend(seq: int, t: float, code: int, polled: float) -> dict[str, Any]:
        return record(
            "lextend", "ok", seq, t, code=0, ids=[1], lease_ms=1000, polled=polled, results=[code]
        )

    extended = [*HUNG[:2], extend(3, 1.5, pb.CODE_OK, polled=1)]
    end = lifecycle_final([(1, "l1.0", 2), (2, "l1.1", 1)], [])
    late = [*extended, extend(4, 2.6, pb.CODE_LEASE_EXPIRED, polled=1.5)]
    assert problems(late, end) == []
    early = [*extended, extend(4, 1.9, pb.CODE_LEASE_EXPIRED, polled=1.5)]
    assert problems(early, end) == [
        "r0-c0 lextend seq 4: LEASE_EXPIRED 0.900 s after the poll, under the 1.0 s lease"
    ]
