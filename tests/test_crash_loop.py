"""SIGKILL qm-server at random moments under mixed load from client processes; prove that
nothing answered OK was lost, no id repeats, acked messages stay gone and maps hold what
was written. The logic is in tests/crashloop.py; scripts/crash_loop runs more rounds.

The checker's own tests below feed it made-up histories with one fault each, so that a
clean crash-loop run means something."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from crashloop import Delivery, History, Options, ServerState, run

from qm.v1 import queue_manager_pb2 as pb


def test_crash_loop(tmp_path: Path) -> None:
    report = run(
        Options(work_dir=tmp_path, rounds=5, clients=3, seed=20_260_101, max_kill_delay_s=1.0)
    )
    print(report.summary())
    assert report.problems == [], report.summary()
    assert (report.rounds, report.kills, report.client_processes) == (5, 5, 15)
    # The load really ran between the kills.
    assert report.figures["messages added (OK)"] >= 50, report.summary()
    assert report.figures["acked done (OK)"] >= 10, report.summary()
    assert report.figures["deliveries"] >= 20, report.summary()


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
    drained = [Delivery(i, e, c, "cl-a", math.inf, "drain") for i, e, c in left]
    return ServerState(
        ready={"cl-a": len(drained)}, in_flight={}, maps=maps or {}, drained={"cl-a": drained}
    )


def problems(records: list[dict[str, Any]], state: ServerState) -> list[str]:
    history = History(records)
    return history.check() + history.check_state(state)


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


def test_checker_flags_a_wrong_map_value() -> None:
    def put(seq: int, value: str, st: str) -> dict[str, Any]:
        return record("map_put", st, seq, seq, map="clm-0", pairs=[["k", value]])

    records = [put(1, "v1", "ok"), put(2, "v2", "ok"), put(3, "v3", "unknown")]
    for value in ("v2", "v3"):
        assert problems(records, final(maps={"clm-0": {"k": value}})) == []
    for wrong in ({"k": "v1"}, {}, {"k": "v2", "x": "y"}):
        assert problems(records, final(maps={"clm-0": wrong})), wrong
