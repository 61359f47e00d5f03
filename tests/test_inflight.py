"""The in-flight map's journal: a failed transaction leaves it as it was committed."""

from __future__ import annotations

from qm_server.store.inflight import InFlight


def snapshot(in_flight: InFlight) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    return in_flight.drop_session(1), in_flight.drop_session(2), in_flight.count(10)


def test_rollback_undoes_holds_and_drops_since_the_last_commit() -> None:
    committed = InFlight()
    committed.hold(1, 10, [1, 2])
    committed.hold(2, 10, [3])
    expected = snapshot(committed)

    in_flight = InFlight()
    in_flight.hold(1, 10, [1, 2])
    in_flight.hold(2, 10, [3])
    in_flight.commit()
    assert in_flight.drop(2, [1, 5]) == [None, None]  # held by the session with id 1 / unknown
    assert in_flight.drop(1, [1]) == [10]
    in_flight.hold(2, 20, [4])
    in_flight.drop_queue(10)
    assert in_flight.count(10) == 0
    in_flight.rollback()
    assert in_flight.count(20) == 0
    assert snapshot(in_flight) == expected == ([(1, 10), (2, 10)], [(3, 10)], 0)
